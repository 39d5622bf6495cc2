"""The engine tests' tiny checkpoint and 24 ragged prompts, for the EP tests that compare against the plain engine."""
from tests.engine.conftest import ragged_prompts, tiny_model, tiny_model_dir  # noqa: F401

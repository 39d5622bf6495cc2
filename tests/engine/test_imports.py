"""The engine's import boundary: no Ray or web stack anywhere, the model only where it runs."""
import ast
from pathlib import Path

# engine/ may import model/ only where it runs the network or sizes its KV cache; the rest is model-independent.
MODEL_DEPENDENT = {"model_runner.py", "decode_graphs.py", "engine.py", "kv_budget.py"}


def test_engine_imports_no_ray_or_web_stack_and_model_only_in_the_runner():
    engine_dir = Path(__file__).resolve().parents[2] / "engine"
    for path in sorted(engine_dir.glob("*.py")):
        forbidden = {"ray", "fastapi", "pydantic", "cluster", "deploy"}
        if path.name not in MODEL_DEPENDENT:
            forbidden.add("model")
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"

"""Model fixtures for the engine's end-to-end tests: one tiny checkpoint, fp32, shared by the session."""
import pytest
import torch

from model.loader import load_model
from model.tiny import TinySpec, write_tiny

SPEC = TinySpec(seed=11, layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=64, experts=4,
                top_k=2, vocab=1024, sliding_window=16, shards=2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("engine-tiny"), SPEC)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return load_model(tiny_model_dir, torch.float32, experts="dense")     # the grouped-GEMM path a GPU takes


@pytest.fixture(scope="session")
def ragged_prompts():
    """24 prompts of lengths 1 to 200, several longer than the sliding window (16)."""
    g = torch.Generator().manual_seed(3)
    lengths = [1, 2, 3, 5, 8, 15, 16, 17, 24, 31, 33, 40, 47, 64, 65, 80, 99, 111, 128, 150, 163, 177, 190, 200]
    return [torch.randint(0, SPEC.vocab, (n,), generator=g).tolist() for n in lengths]

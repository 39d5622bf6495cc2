"""Tiny checkpoints written once per test session by the project's own writer (model/tiny.py)."""
import pytest

from model.tiny import TinySpec, write_tiny

# Three shapes the acceptance asks for: top-k == experts, head_dim 8 and 64, GQA groups > 1, vocab >= 1000.
SPECS = {
    "topk_all": TinySpec(seed=1, layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=64,
                         experts=4, top_k=4, vocab=1024, sliding_window=8, shards=3),
    "hd8": TinySpec(seed=2, layers=4, hidden=32, heads=8, kv_heads=2, head_dim=8, intermediate=32,
                    experts=6, top_k=2, vocab=1000, sliding_window=6, shards=2),
    "hd64": TinySpec(seed=3, layers=2, hidden=96, heads=4, kv_heads=1, head_dim=64, intermediate=64,
                     experts=5, top_k=3, vocab=1100, sliding_window=16, shards=1),
}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """name -> directory, written on first use."""
    cache = {}

    def get(name: str, **changes):
        key = (name, tuple(sorted(changes.items())))
        if key not in cache:
            spec = SPECS[name].__class__(**{**SPECS[name].__dict__, **changes})
            cache[key] = write_tiny(tmp_path_factory.mktemp(name), spec)
        return cache[key]
    return get

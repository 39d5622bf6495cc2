"""CountedExperts (the single-rank backend): same outputs as the backend it wraps, and counts only the real rows of
the forward a step ran (a CUDA graph's padding rows never reach the router's load)."""
import torch

from cluster.counted_experts import CountedExperts
from cluster.ep_experts import EPStats
from model.config import ModelConfig
from model.loader import load_model
from model.moe import LocalExperts, route
from model.packed_experts import PackedMXFP4Experts
from model.tiny import TinySpec, write_tiny

SPEC = TinySpec(seed=31, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=64, experts=6, top_k=2,
                vocab=1024, sliding_window=8, shards=1)


def test_wrapped_backends_load_and_compute_like_the_plain_model(tmp_path):
    path = write_tiny(tmp_path / "m", SPEC)
    cfg = ModelConfig.from_dir(path)
    ids = torch.randint(0, SPEC.vocab, (40,), generator=torch.Generator().manual_seed(1))
    want = load_model(path).prefix_logits(ids)
    for inner in (lambda i: LocalExperts(cfg, torch.float32), lambda i: PackedMXFP4Experts(cfg, torch.float32,
                                                                                           layer_idx=i)):
        stats = EPStats(cfg.num_hidden_layers, cfg.num_local_experts, "cpu")
        model = load_model(path, experts=lambda i: CountedExperts(inner(i), i, stats))
        torch.testing.assert_close(model.prefix_logits(ids), want, rtol=0, atol=1e-5)
        assert model.model.layers[1].mlp.experts.slot_experts() == list(range(6))


def test_counts_only_the_real_rows_of_the_forward_the_step_ran(tmp_path, monkeypatch):
    """A captured graph's ids stay its own (an eager forward of as many rows in between does not replace them); a
    replay counts its real rows only; an eager step counts the last eager forward."""
    from cluster import counted_experts
    cfg = ModelConfig.from_dir(write_tiny(tmp_path / "m", SPEC))
    stats = EPStats(1, 6, "cpu")
    experts = CountedExperts(LocalExperts(cfg, torch.float32).requires_grad_(False), 0, stats)
    torch.nn.init.normal_(experts.inner.gate_up_proj)
    g = torch.Generator().manual_seed(2)
    t8, t5 = torch.randn(8, 64, generator=g), torch.randn(5, 64, generator=g)
    (w8, ids8), (w8b, ids8b), (w5, ids5) = (route(torch.randn(n, 6, generator=g), 2) for n in (8, 8, 5))
    monkeypatch.setattr(counted_experts, "capturing", lambda: True)
    experts(t8, ids8, w8)                              # "captured": the graph of 8 rows
    monkeypatch.setattr(counted_experts, "capturing", lambda: False)
    experts(t8, ids8b, w8b)                            # an eager forward of 8 rows (a prefill chunk of 8 tokens)
    experts.count(8, 3, graphed=True)                  # a replay of the 8-row graph with 3 real rows
    assert torch.equal(stats.counts[0], torch.bincount(ids8[:3].flatten(), minlength=6))
    experts(t5, ids5, w5)
    experts.count(5, 5, graphed=False)
    assert torch.equal(stats.counts[0], torch.bincount(torch.cat([ids8[:3], ids5]).flatten(), minlength=6))
    experts.count(4, 4, graphed=True)                  # no graph of 4 rows: nothing to count
    experts.count(8, 0, graphed=True)
    assert int(stats.counts[0].sum()) == 16

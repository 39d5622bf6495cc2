"""Gate and experts: top-k then softmax over the k logits, interleaved gate/up, clamps, the +1 (spec §2.4)."""
import math

import torch

from model.config import ModelConfig
from model.moe import LocalExperts, route, swiglu


def test_route_softmax_over_selected_logits_only():
    logits = torch.tensor([[1.0, 3.0, 2.0, -5.0]])
    w, ids = route(logits, 2)
    assert ids.tolist() == [[1, 2]]
    e = math.exp(1.0)
    assert torch.allclose(w, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))   # not renormalised over all 4


def test_swiglu_interleave_clamps_and_plus_one():
    # columns: gate0, up0, gate1, up1, gate2, up2
    gu = torch.tensor([[1.0, 0.5, 10.0, -10.0, -10.0, 10.0]])
    y = swiglu(gu, alpha=1.702, limit=7.0)[0]
    silu = lambda g: g * (1 / (1 + math.exp(-1.702 * g)))
    assert abs(y[0].item() - silu(1.0) * 1.5) < 1e-6                # +1 on the linear branch
    assert abs(y[1].item() - silu(7.0) * (-7.0 + 1)) < 1e-5          # gate clamped to 7, up to -7
    assert abs(y[2].item() - silu(-10.0) * (7.0 + 1)) < 1e-6         # gate NOT clamped from below


def tiny_config(E=4):
    return ModelConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=4, intermediate_size=6, num_local_experts=E,
                       num_experts_per_tok=2)


def random_experts(cfg, n, first=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = LocalExperts(cfg, torch.float32, n, first)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return ex


def test_local_experts_equal_a_per_token_loop():
    cfg = tiny_config()
    ex = random_experts(cfg, 4)
    t = torch.randn(7, 8)
    w, ids = route(torch.randn(7, 4), 2)
    out = ex(t, ids, w)
    for i in range(7):
        ref = sum(w[i, k] * ex.expert_forward(ids[i, k].item(), t[i:i + 1])[0] for k in range(2))
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_partial_experts_sum_to_the_whole():
    """Experts [0, 2) plus [2, 4) held by two processes add up to all four (what EP relies on)."""
    cfg = tiny_config()
    whole = random_experts(cfg, 4)
    lo, hi = LocalExperts(cfg, torch.float32, 2, 0), LocalExperts(cfg, torch.float32, 2, 2)
    with torch.no_grad():
        for name, p in whole.named_parameters():
            getattr(lo, name).copy_(p[:2])
            getattr(hi, name).copy_(p[2:])
    t = torch.randn(9, 8)
    w, ids = route(torch.randn(9, 4), 2)
    assert torch.allclose(lo(t, ids, w) + hi(t, ids, w), whole(t, ids, w), atol=1e-5)
    assert not torch.allclose(lo(t, ids, w), whole(t, ids, w))

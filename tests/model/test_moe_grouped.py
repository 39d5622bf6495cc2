"""LocalExperts' grouped path (two torch._grouped_mm calls) equals the reference loop (one expert_forward per hit
expert): all experts held, a partial range as an EP rank holds it, no pair held, and when it must not run."""
import pytest
import torch

from model.config import ModelConfig
from model.moe import LocalExperts, grouped_mm_supported, route

H, I, E, K = 32, 16, 6, 2


def config():
    return ModelConfig(vocab_size=10, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=4, intermediate_size=I, num_local_experts=E,
                       num_experts_per_tok=K)


def experts(num=E, first=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = LocalExperts(config(), torch.float32, num, first)
    with torch.no_grad():
        for name, p in ex.named_parameters():
            full = torch.randn((E,) + p.shape[1:], generator=g) * (0.3 if "proj" in name else 1.0)
            p.copy_(full[first:first + num])                     # same weights per logical expert at any range
    return ex.requires_grad_(False)


def routed(T, seed=1):
    g = torch.Generator().manual_seed(seed)
    weights, ids = route(torch.randn(T, E, generator=g), K)
    return torch.randn(T, H, generator=g) * 3, ids, weights


def loop(ex, t, ids, w):
    """The reference path, forced: inputs that need grad make grouped_ok false."""
    with torch.enable_grad():
        return ex(t.clone().requires_grad_(), ids, w).detach()


pytestmark = pytest.mark.skipif(not grouped_mm_supported(torch.device("cpu"), torch.float32, (H, 2 * I, I)),
                                reason="torch._grouped_mm unavailable on this CPU build")


@pytest.mark.parametrize("T", [1, 3, 17, 64])
def test_grouped_equals_loop_all_experts(T):
    ex = experts()
    t, ids, w = routed(T)
    with torch.no_grad():
        assert ex.grouped_ok(t)
        grouped = ex(t, ids, w)
    assert not ex.grouped_ok(t.clone().requires_grad_())
    assert (grouped - loop(ex, t, ids, w)).abs().max().item() < 1e-5
    assert grouped.abs().max() > 0.1


@pytest.mark.parametrize("first, num", [(0, 2), (2, 3), (5, 1)])
def test_grouped_partial_ranges_equal_loop_and_sum_to_the_whole(first, num):
    whole, part = experts(), experts(num, first)
    t, ids, w = routed(40)
    with torch.no_grad():
        got = part(t, ids, w)
        rest = [experts(n, f)(t, ids, w) for f, n in ((0, first), (first + num, E - first - num)) if n]
        total = whole(t, ids, w)
    assert (got - loop(part, t, ids, w)).abs().max().item() < 1e-5
    assert (got + sum(rest) - total).abs().max().item() < 1e-4          # EP ranks add up to EP=1


def test_no_pair_held_gives_zeros():
    part = experts(1, 5)
    t, _, w = routed(4)
    ids = torch.zeros(4, K, dtype=torch.long)                           # every pair goes to expert 0
    with torch.no_grad():
        assert torch.equal(part(t, ids, w), torch.zeros(4, H))


def test_subclass_overriding_expert_forward_keeps_the_loop():
    class Doubled(LocalExperts):
        def expert_forward(self, e, x):
            return 2 * super().expert_forward(e, x)
    ex, base = Doubled(config(), torch.float32).requires_grad_(False), experts()
    ex.load_state_dict(base.state_dict())
    t, ids, w = routed(9)
    with torch.no_grad():
        assert not ex.grouped_ok(t)
        assert torch.allclose(ex(t, ids, w), 2 * base(t, ids, w), atol=1e-5)


def test_unaligned_widths_are_not_grouped():
    assert not grouped_mm_supported(torch.device("cpu"), torch.float32, (8, 12, 6))     # 6 * 4 bytes % 16 != 0
    assert not grouped_mm_supported(torch.device("cpu"), torch.float64, (8, 16, 8))

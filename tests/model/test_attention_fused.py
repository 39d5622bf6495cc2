"""The attention fast paths: KV-head-major sink attention equals the plain per-head formula, and the fused q/k/v
projection equals three linears without duplicating weights, follows in-place writes and replaced parameters,
and leaves trainable parameters alone."""
import torch
from torch import nn

from model.attention import Attention, DenseMetadata, sink_attention
from model.config import ModelConfig


def reference(q, k, v, sinks, allowed, sm_scale):
    """gpt-oss-spec.md §2.3 written per head with einsum: q [B, T, n, D], k/v [B, S, kv, D], allowed [B, T, S]."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)              # query head h -> h // g
    scores = torch.einsum("btnd,bsnd->bnts", q, k) * sm_scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    sink = sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat((scores, sink), -1), -1)[..., :-1]
    return torch.einsum("bnts,bsnd->btnd", probs, v)


def test_sink_attention_equals_the_per_head_formula():
    g = torch.Generator().manual_seed(0)
    B, T, S, n, kv, D = 3, 5, 9, 8, 2, 16
    q, k, v = (torch.randn(B, L, h, D, generator=g) for L, h in ((T, n), (S, kv), (S, kv)))
    sinks = torch.randn(n, generator=g)
    allowed = torch.rand(B, T, S, generator=g) > 0.3
    allowed[:, :, 0] = True
    got = sink_attention(q, k, v, sinks, allowed, 0.25)
    assert (got - reference(q, k, v, sinks, allowed, 0.25)).abs().max().item() < 1e-5
    one = sink_attention(q[0], k[0], v[0], sinks, allowed[0], 0.25)                    # no batch dims
    assert (one - got[0]).abs().max().item() < 1e-6
    assert sink_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), sinks.bfloat16(), allowed, 0.25).dtype \
        == torch.bfloat16


def layer(seed=0):
    cfg = ModelConfig(vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, intermediate_size=32, num_local_experts=2,
                      num_experts_per_tok=1, sliding_window=None)
    attn = Attention(cfg, 0, torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return attn


def run(attn, x):
    md = DenseMetadata([x.shape[0]])
    cos, sin = torch.ones(x.shape[0], 4), torch.zeros(x.shape[0], 4)            # identity rotation
    return attn(x, cos, sin, md)


def test_fused_projection_equals_three_linears_and_shares_memory():
    attn, x = layer(), torch.randn(6, 32)
    trained = run(attn, x)                                    # trainable parameters: three linears
    assert attn._fused_weight is None
    attn.requires_grad_(False)
    fused = run(attn, x)
    assert (fused - trained).abs().max().item() < 1e-5
    storage = attn._fused_weight.untyped_storage().data_ptr()
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.untyped_storage().data_ptr() == storage   # views of the fused weight, not copies
        assert proj.bias.untyped_storage().data_ptr() == attn._fused_bias.untyped_storage().data_ptr()


def test_fused_projection_follows_in_place_writes_and_replaced_parameters():
    attn, x = layer().requires_grad_(False), torch.randn(6, 32)
    before = run(attn, x)
    with torch.no_grad():
        attn.k_proj.weight.mul_(2.0)                          # in place: visible through the fused view
    doubled = run(attn, x)
    assert not torch.allclose(doubled, before)
    fresh = layer().requires_grad_(False)
    with torch.no_grad():
        fresh.k_proj.weight.mul_(2.0)
    assert (doubled - run(fresh, x)).abs().max().item() < 1e-5
    attn.v_proj.weight = nn.Parameter(torch.zeros_like(attn.v_proj.weight), requires_grad=False)
    attn.v_proj.bias = nn.Parameter(torch.zeros_like(attn.v_proj.bias), requires_grad=False)
    zero_v = run(attn, x)                                     # replaced: fused again, values are now 0
    assert torch.allclose(zero_v, attn.o_proj.bias.expand_as(zero_v), atol=1e-6)


def test_trainable_parameters_get_gradients():
    attn = layer()
    run(attn, torch.randn(5, 32)).square().sum().backward()
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
    assert attn._fused_weight is None

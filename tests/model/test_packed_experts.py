"""PackedMXFP4Experts (experts kept as MXFP4 bytes, dequantised per hit expert) equals LocalExperts loaded from the
same tiny MXFP4 checkpoint, alone and inside the whole model, and holds 17/32 byte per expert weight."""
import pytest
import torch

from model import mxfp4
from model.checkpoint import Checkpoint
from model.loader import load_model
from model.moe import LocalExperts, route
from model.packed_experts import PackedMXFP4Experts, dequantize_rows


def backends(path, layer, lo, hi):
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    local = LocalExperts(cfg, torch.float32, hi - lo, lo)
    with torch.no_grad():
        for key, value in ckpt.experts(layer, lo, hi, torch.float32).items():
            getattr(local, key).copy_(value)
    packed = PackedMXFP4Experts(cfg, torch.float32, hi - lo, lo, layer_idx=layer)
    packed.load_from(ckpt, torch.float32)
    return cfg, local.requires_grad_(False), packed


def routed(cfg, T, seed):
    g = torch.Generator().manual_seed(seed)
    weights, ids = route(torch.randn(T, cfg.num_local_experts, generator=g), cfg.num_experts_per_tok)
    return torch.randn(T, cfg.hidden_size, generator=g), ids, weights                 # [T, H], [T, K], [T, K]


@pytest.mark.parametrize("name", ["topk_all", "hd8", "hd64"])
@pytest.mark.parametrize("T", [1, 5, 33])
def test_packed_equals_local_experts(tiny_dirs, name, T):
    path = tiny_dirs(name)
    cfg, local, packed = backends(path, layer=1, lo=0, hi=Checkpoint(path).config.num_local_experts)
    t, ids, w = routed(cfg, T, seed=T)
    with torch.no_grad():
        want, got = local(t, ids, w), packed(t, ids, w)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_partial_range_holds_only_its_experts(tiny_dirs):
    path = tiny_dirs("hd8")                                                    # 6 experts, top-2
    cfg, local, packed = backends(path, layer=0, lo=2, hi=5)
    t, ids, w = routed(cfg, 40, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(packed(t, ids, w), local(t, ids, w), rtol=1e-5, atol=1e-5)
        none_held = torch.zeros_like(ids)                                       # every pair to expert 0
        assert packed(t, none_held, w).abs().max() == 0


def test_bf16_weights_equal_the_reference_dequantisation(tiny_dirs):
    ckpt = Checkpoint(tiny_dirs("hd64"))
    packed = ckpt.packed_experts(0, 0, 2)
    blocks, scales = packed["down_proj_blocks"][1], packed["down_proj_scales"][1]     # [H, I/32, 16], [H, I/32]
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize_rows(blocks, scales, dtype), mxfp4.dequantize(blocks, scales, dtype))


def test_whole_model_logits_equal_the_default_loader(tiny_dirs):
    path = tiny_dirs("topk_all")
    cfg = Checkpoint(path).config
    reference = load_model(path, torch.float32)
    model = load_model(path, torch.float32,
                       experts=lambda i: PackedMXFP4Experts(cfg, torch.float32, layer_idx=i))
    assert all(isinstance(layer.mlp.experts, PackedMXFP4Experts) for layer in model.model.layers)
    ids = torch.randint(0, cfg.vocab_size, (37,), generator=torch.Generator().manual_seed(0))
    want, got = reference.prefix_logits(ids), model.prefix_logits(ids)                  # [T, V] fp32
    assert want.abs().max() > 1.0
    assert (got - want).abs().max().item() < 1e-5


def test_packed_bytes_are_17_32_of_a_byte_per_weight(tiny_dirs):
    cfg, _, packed = backends(tiny_dirs("hd64"), layer=0, lo=0, hi=5)
    H, I = cfg.hidden_size, cfg.intermediate_size
    weights = 5 * (H * 2 * I + I * H)
    assert packed.packed_bytes() == weights * 17 // 32
    buffers = {name: b for name, b in packed.named_buffers()}
    assert {b.dtype for n, b in buffers.items() if not n.endswith("_bias")} == {torch.uint8}
    assert not list(packed.parameters())                                                # nothing dense
    dense = sum(b.nbytes for n, b in buffers.items() if n.endswith("_bias"))
    assert sum(b.nbytes for b in buffers.values()) == weights * 17 // 32 + dense

"""PackedMXFP4Experts (experts kept as MXFP4 bytes) equals LocalExperts loaded from the same tiny MXFP4 checkpoint,
alone and inside the whole model, on both paths (the per-expert torch loop and the fused Triton kernel, run by
Triton's interpreter on CPU); the kernel path reads no value on the host; 17/32 byte per expert weight."""
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from model import mxfp4, mxfp4_kernel
from model.checkpoint import Checkpoint
from model.loader import load_model
from model.moe import LocalExperts, route
from model.packed_experts import PackedMXFP4Experts, dequantize_rows
from tests.sync_guard import HostSyncError, HostSyncGuard

needs_triton = pytest.mark.skipif(not mxfp4_kernel.KERNEL_AVAILABLE, reason="triton is not installed")
PATHS = [pytest.param(False, id="loop"), pytest.param(True, id="kernel", marks=needs_triton)]
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"       # CPU: Triton's interpreter (tests/conftest.py)


def call(module, *inputs):
    """module(*inputs) on CPU, or where the kernel runs when the module (or any submodule) forces the kernel path
    (a GPU, else Triton's interpreter on CPU); the result on CPU."""
    if any(getattr(m, "use_kernel", None) for m in module.modules()):
        module.to(KERNEL_DEVICE)
        inputs = [i.to(KERNEL_DEVICE) for i in inputs]
    return module(*inputs).cpu()


def backends(path, layer, lo, hi, use_kernel=None):
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    local = LocalExperts(cfg, torch.float32, hi - lo, lo)
    with torch.no_grad():
        for key, value in ckpt.experts(layer, lo, hi, torch.float32).items():
            getattr(local, key).copy_(value)
    packed = PackedMXFP4Experts(cfg, torch.float32, hi - lo, lo, layer_idx=layer, use_kernel=use_kernel)
    packed.load_from(ckpt, torch.float32)
    return cfg, local.requires_grad_(False), packed


def routed(cfg, T, seed):
    g = torch.Generator().manual_seed(seed)
    weights, ids = route(torch.randn(T, cfg.num_local_experts, generator=g), cfg.num_experts_per_tok)
    return torch.randn(T, cfg.hidden_size, generator=g), ids, weights                 # [T, H], [T, K], [T, K]


@pytest.mark.parametrize("use_kernel", PATHS)
@pytest.mark.parametrize("name", ["topk_all", "hd8", "hd64"])
@pytest.mark.parametrize("T", [1, 5, 33])
def test_packed_equals_local_experts(tiny_dirs, name, T, use_kernel):
    path = tiny_dirs(name)
    cfg, local, packed = backends(path, layer=1, lo=0, hi=Checkpoint(path).config.num_local_experts,
                                  use_kernel=use_kernel)
    t, ids, w = routed(cfg, T, seed=T)
    with torch.no_grad():
        want, got = local(t, ids, w), call(packed, t, ids, w)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_kernel", PATHS)
def test_partial_range_holds_only_its_experts(tiny_dirs, use_kernel):
    path = tiny_dirs("hd8")                                                    # 6 experts, top-2
    cfg, local, packed = backends(path, layer=0, lo=2, hi=5, use_kernel=use_kernel)
    t, ids, w = routed(cfg, 40, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(call(packed, t, ids, w), local(t, ids, w), rtol=1e-5, atol=1e-5)
        none_held = torch.zeros_like(ids)                                       # every pair to expert 0
        assert call(packed, t, none_held, w).abs().max() == 0


def test_bf16_weights_equal_the_reference_dequantisation(tiny_dirs):
    ckpt = Checkpoint(tiny_dirs("hd64"))
    packed = ckpt.packed_experts(0, 0, 2)
    blocks, scales = packed["down_proj_blocks"][1], packed["down_proj_scales"][1]     # [H, I/32, 16], [H, I/32]
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize_rows(blocks, scales, dtype), mxfp4.dequantize(blocks, scales, dtype))


@pytest.mark.parametrize("use_kernel", PATHS)
def test_whole_model_logits_equal_the_default_loader(tiny_dirs, use_kernel):
    path = tiny_dirs("topk_all")
    cfg = Checkpoint(path).config
    reference = load_model(path, torch.float32, experts="dense")
    model = load_model(path, torch.float32,
                       experts=lambda i: PackedMXFP4Experts(cfg, torch.float32, layer_idx=i, use_kernel=use_kernel))
    assert all(isinstance(layer.mlp.experts, PackedMXFP4Experts) for layer in model.model.layers)
    ids = torch.randint(0, cfg.vocab_size, (37,), generator=torch.Generator().manual_seed(0))
    want = reference.prefix_logits(ids)                                                # [T, V] fp32
    got = call(_PrefixLogits(model), ids)
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


class _PrefixLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model.prefix_logits(ids)


def test_auto_path_choice(tiny_dirs):
    _, _, packed = backends(tiny_dirs("hd8"), layer=0, lo=0, hi=6)
    t = torch.zeros(2, 32)
    assert not packed.kernel_path(t)                                                    # CPU tensors: the loop
    packed.use_kernel = True
    assert packed.kernel_path(t)


@needs_triton
@pytest.mark.parametrize("variant", ["dequant", "dot_scaled"])
def test_bf16_kernel_path_equals_the_loop(tiny_dirs, variant):
    path = tiny_dirs("hd64")                                                            # 5 experts, top-3
    cfg = Checkpoint(path).config
    packed = PackedMXFP4Experts(cfg, torch.bfloat16, 4, 1, layer_idx=1)                 # expert 0 not held
    packed.load_from(Checkpoint(path), torch.bfloat16)
    t, ids, w = routed(cfg, 21, seed=7)
    t = t.bfloat16()
    with torch.no_grad():
        want = packed(t, ids, w)
        packed.use_kernel, packed.kernel_variant = True, variant
        got = call(packed, t, ids, w)
    assert got.dtype == torch.bfloat16 and want.abs().max() > 0.1
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


@needs_triton
def test_kernel_path_issues_no_syncing_op(tiny_dirs, monkeypatch):
    """The real forward (kernel run) under HostSyncGuard, and on a GPU also CUDA's sync debug mode. The guard is
    lifted for the launch alone: on a GPU that is one kernel launch issuing no torch op, but Triton's CPU
    interpreter emulates it by copying tensors through numpy, which says nothing about a GPU. The guard catches
    the loop path, so the test can fail."""
    cfg, local, packed = backends(tiny_dirs("hd8"), layer=0, lo=2, hi=5, use_kernel=True)
    packed.to(KERNEL_DEVICE)
    guard, launch = HostSyncGuard(), mxfp4_kernel._launch

    def launch_unguarded(*args, **meta):
        guard.__exit__(None, None, None)
        try:
            launch(*args, **meta)
        finally:
            guard.__enter__()
    t, ids, w = routed(cfg, 13, seed=2)
    args = [a.to(KERNEL_DEVICE) for a in (t, ids, w)]
    with torch.no_grad():
        packed(*args)                                                   # compiles the kernel on a GPU
        monkeypatch.setattr(mxfp4_kernel, "_launch", launch_unguarded)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with guard:
                got = packed(*args)
        finally:
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")
        assert guard.ops > 20
        torch.testing.assert_close(got.cpu(), local(t, ids, w), rtol=1e-5, atol=1e-5)
        packed.use_kernel = False
        with pytest.raises(HostSyncError), HostSyncGuard():
            packed(*args)


@needs_triton
def test_kernel_path_reads_no_value_on_the_host(tiny_dirs, monkeypatch):
    """Stricter: under FakeTensorMode tensors have no values, so any host read (.item(), .tolist(), int(t),
    nonzero, bincount, a boolean mask index...) raises, which a dispatch-level guard cannot see on CPU (`tolist`
    never dispatches). The launch is stubbed (no kernel can run on fake tensors); its grid must come from shapes."""
    _, _, packed = backends(tiny_dirs("hd8"), layer=0, lo=2, hi=5, use_kernel=True)
    grids = []
    monkeypatch.setattr(mxfp4_kernel, "_launch", lambda grid, *args, **meta: grids.append(grid))
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        t = mode.from_tensor(torch.empty(13, 32))
        ids = mode.from_tensor(torch.zeros(13, 2, dtype=torch.int64))
        w = mode.from_tensor(torch.empty(13, 2))
        out = packed(t, ids, w)
        assert out.shape == (13, 32) and len(grids) == 2                                    # gate_up, down
        packed.use_kernel = False                                                           # the control
        with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
            packed(t, ids, w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_triton
def test_kernel_path_replays_in_a_cuda_graph(tiny_dirs):
    """Captured once, replayed after the tokens, expert ids and weights change in place: equals the loop path."""
    cfg, _, packed = backends(tiny_dirs("hd64"), layer=0, lo=1, hi=5, use_kernel=True)
    packed.to("cuda")
    static = [a.cuda() for a in routed(cfg, 9, seed=1)]
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            packed(*static)                                             # compile / warm up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = packed(*static)
        for a, new in zip(static, routed(cfg, 9, seed=2)):
            a.copy_(new)
        graph.replay()
        packed.use_kernel = False
        want = packed(*static)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)

"""Prefill-chunk attention over the paged cache == dense sink attention over each sequence's visible keys, for the
torch fallback and the Triton kernel (Triton's interpreter on CPU); PagedMetadata through the kernel == through the
torch parts on a mixed step, and == a full forward of the tiny model; the kernel path's host side never syncs.

Every cache slot no query may see holds nan, table columns past a sequence's blocks hold garbage (NULL_BLOCK,
out-of-range ids), and rows of q that no sequence owns hold queries, so a read outside the visible keys or a write
outside the owned rows shows up as nan, a wrong value or a nonzero row.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from engine.config import NULL_BLOCK
from model import prefill_attention
from model.attention import sink_attention, window_mask
from model.config import ModelConfig
from model.loader import load_model
from model.paged_attention import FULL, SLIDING, PagedKVCache, PagedMetadata, SeqSpan
from model.prefill_attention import KERNEL_AVAILABLE
from tests.model.test_decode_attention import on_kernel_device
from tests.sync_guard import HostSyncGuard

needs_triton = pytest.mark.skipif(not KERNEL_AVAILABLE, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

paged_prefill_attention = on_kernel_device(prefill_attention.paged_prefill_attention)
prefill_attention_triton = on_kernel_device(prefill_attention.prefill_attention_triton, always_kernel=True)


@dataclass
class Case:
    q: torch.Tensor                 # [T, n, D]
    k_heads: torch.Tensor           # [k, slots, D]
    v_heads: torch.Tensor
    block_tables: torch.Tensor      # int32 [N, M]
    q_start: torch.Tensor           # int32 [N]
    q_len: torch.Tensor
    ctx_start: torch.Tensor
    sinks: torch.Tensor             # [n]
    window: int | None
    block_size: int
    slots: list[torch.Tensor]       # per sequence the slot of every position 0 .. ctx + q_len - 1 (true blocks)

    @property
    def sm_scale(self) -> float:
        return self.q.shape[-1] ** -0.5

    def args(self):
        return (self.q, self.k_heads, self.v_heads, self.block_tables, self.q_start, self.q_len, self.ctx_start,
                self.sinks, self.window, self.sm_scale, self.block_size)


def make_case(seqs, window, *, kv=2, g=2, D=16, B=4, dtype=torch.float32, seed=0, sinks=None) -> Case:
    """seqs: [(ctx_start, q_len)]. Shuffled blocks; only keys some query sees are finite; blocks wholly before the
    first query's window are NULL_BLOCK; q rows are laid out in reverse sequence order with an unowned row
    between sequences and at both ends."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(c + L) // B) for c, L in seqs]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    k_heads = torch.full((kv, num_blocks * B, D), float("nan"), dtype=dtype)
    v_heads = torch.full_like(k_heads, float("nan"))
    rows, slots = [], []
    for (ctx, L), nb in zip(seqs, need):
        table, perm = perm[:nb], perm[nb:]
        lo = 0 if window is None else max(0, ctx - window + 1)
        pos_slots = torch.tensor([table[p // B] * B + p % B for p in range(ctx + L)], dtype=torch.long)
        for x in (k_heads, v_heads):
            x[:, pos_slots[lo:]] = torch.randn(kv, ctx + L - lo, D, generator=gen).to(dtype)
        rows.append([NULL_BLOCK if (b + 1) * B <= lo else blk for b, blk in enumerate(table)])   # recycled
        slots.append(pos_slots)
    M = max(map(len, rows)) + 2
    tables = torch.randint(-3, num_blocks + 3, (len(seqs), M), generator=gen, dtype=torch.int32)
    for i, r in enumerate(rows):
        tables[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
    starts, row = [0] * len(seqs), 1
    for i in reversed(range(len(seqs))):
        starts[i], row = row, row + seqs[i][1] + 1
    n = kv * g
    q = torch.randn(row, n, D, generator=gen).to(dtype)
    sinks = (torch.randn(n, generator=gen) if sinks is None else sinks).to(dtype)
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32)                                      # noqa: E731
    return Case(q, k_heads, v_heads, tables, as_int(starts), as_int([L for _, L in seqs]),
                as_int([c for c, _ in seqs]), sinks, window, B, slots)


def reference(case: Case) -> torch.Tensor:
    """fp32 [T, n, D]: `sink_attention` per sequence over its keys gathered densely, causal + window mask; zeros in
    rows no sequence owns."""
    out = torch.zeros(case.q.shape)
    for first, L, ctx, slots in zip(case.q_start.tolist(), case.q_len.tolist(), case.ctx_start.tolist(),
                                    case.slots):
        lo = 0 if case.window is None else max(0, ctx - case.window + 1)
        k, v = (x[:, slots[lo:]].transpose(0, 1).float() for x in (case.k_heads, case.v_heads))    # [S, k, D]
        allowed = window_mask(torch.arange(ctx, ctx + L), torch.arange(lo, ctx + L), case.window)  # [L, S]
        out[first:first + L] = sink_attention(case.q[first:first + L].float(), k, v, case.sinks.float(), allowed,
                                              case.sm_scale)
    return out


def check(out: torch.Tensor, case: Case, ref: torch.Tensor | None = None):
    ref = reference(case) if ref is None else ref
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert torch.isfinite(out).all()
    tol = 1e-5 if case.q.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


# (seqs [(ctx_start, q_len)], window, kwargs): chunks from 0 and after a cached prefix, decode-like q_len 1, q_len 0,
# chunks longer than the window, chunks crossing blocks, GQA g = 1, 2, 3, 4, 8, D 16 / 64, B 4 / 16.
CASES = {
    "full_ragged_prefix": ([(0, 13), (9, 7), (20, 1), (0, 2), (6, 0)], None, dict(kv=2, g=4, D=16, B=4)),
    "window_chunk_longer": ([(0, 30), (17, 25), (40, 1), (5, 3)], 8, dict(kv=1, g=2, D=16, B=4)),
    "window_gptoss_group": ([(0, 40), (50, 20), (3, 1)], 16, dict(kv=1, g=8, D=64, B=16)),
    "window_odd_mha": ([(11, 9), (0, 6)], 5, dict(kv=4, g=1, D=16, B=4)),
    "full_block16_g3": ([(7, 33), (0, 5), (30, 1)], None, dict(kv=1, g=3, D=64, B=16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_torch_fallback_matches_dense(name):
    seqs, window, kw = CASES[name]
    case = make_case(seqs, window, **kw)
    check(paged_prefill_attention(*case.args(), impl="torch"), case)


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_dense(name):
    seqs, window, kw = CASES[name]
    case = make_case(seqs, window, **kw)
    ref = reference(case)
    check(paged_prefill_attention(*case.args(), impl="triton"), case, ref)
    # Small tiles: several query tiles per sequence (the map from program to tile), several key tiles per query
    # tile, tiles with fewer queries than BQ.
    check(prefill_attention_triton(*case.args(), block_q=4, keys_per_tile=16), case, ref)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("name", ["full_ragged_prefix", "window_chunk_longer"])
def test_bf16_within_bf16_tolerance(name, impl):
    seqs, window, kw = CASES[name]
    case = make_case(seqs, window, dtype=torch.bfloat16, seed=5, **kw)
    check(paged_prefill_attention(*case.args(), impl=impl), case)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_extreme_sinks(impl):
    """A sink of +1e4 takes all the weight (output 0); -1e4 takes none (plain causal softmax over the keys)."""
    sinks = torch.tensor([1e4, -1e4, 0.5, -1e4, 1e4, 2.0, -30.0, 30.0])
    case = make_case([(3, 9), (0, 1)], 6, kv=2, g=4, D=16, B=4, sinks=sinks, seed=3)
    out = paged_prefill_attention(*case.args(), impl=impl)
    check(out, case)
    assert (out[:, sinks == 1e4] == 0).all()
    first, slots = case.q_start[0].item(), case.slots[0]                           # positions 3 .. 11, window 6
    k, v = (x[0, slots].float() for x in (case.k_heads, case.v_heads))             # head 1 -> KV head 0: [12, D]
    for i, p in enumerate(range(3, 12)):
        keys = slice(max(0, p - 5), p + 1)
        plain = torch.softmax(case.q[first + i, 1] @ k[keys].T * case.sm_scale, -1) @ v[keys]
        torch.testing.assert_close(out[first + i, 1], plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_int64_indices_strided_query_invalid_ids(impl):
    """int64 starts/lengths/tables, q a view into fused qkv rows, and a malformed table (NULL_BLOCK and an id past
    the cache inside the visible keys): those keys drop out for every query."""
    case = make_case([(6, 14), (0, 3)], None, kv=2, g=2, D=16, B=4, seed=4)
    num_blocks = case.k_heads.shape[1] // 4
    case.block_tables[0, 1], case.block_tables[0, 3] = NULL_BLOCK, num_blocks + 7           # positions 4..7, 12..15
    ref = reference(make_case([(6, 14), (0, 3)], None, kv=2, g=2, D=16, B=4, seed=4))       # same data
    dropped = reference_without(case, 0, [*range(4, 8), *range(12, 16)])
    T, n, D = case.q.shape
    qkv = torch.randn(T, n + 4, D)                                                        # [T, n + 2k, D]
    qkv[:, :n] = case.q
    case.q = qkv[:, :n]
    case.block_tables, case.q_start, case.q_len, case.ctx_start = (x.long() for x in (
        case.block_tables, case.q_start, case.q_len, case.ctx_start))
    out = paged_prefill_attention(*case.args(), impl=impl)
    check(out, case, dropped)
    assert not torch.allclose(out, ref)                                                   # the ids mattered


def reference_without(case: Case, seq: int, positions: list[int]) -> torch.Tensor:
    """The dense reference with some key positions of one sequence masked out for every query."""
    out = reference(case)
    first, L, ctx = case.q_start[seq].item(), case.q_len[seq].item(), case.ctx_start[seq].item()
    k, v = (x[:, case.slots[seq]].transpose(0, 1).float() for x in (case.k_heads, case.v_heads))  # [S, k, D]
    kpos = torch.arange(ctx + L)
    allowed = window_mask(torch.arange(ctx, ctx + L), kpos, case.window) & ~torch.isin(kpos, torch.tensor(positions))
    out[first:first + L] = sink_attention(case.q[first:first + L].float(), k, v, case.sinks.float(), allowed,
                                          case.sm_scale)
    return out


@needs_triton
def test_kernel_grid_bound_with_many_short_sequences():
    """Every sequence one query past a tile: ceil(q_len / BQ) tiles each, still within T // BQ + N programs."""
    case = make_case([(i, 5) for i in range(9)], 4, kv=1, g=2, D=16, B=4, seed=8)
    check(prefill_attention_triton(*case.args(), block_q=4, keys_per_tile=16), case)


def test_dispatcher():
    case = make_case([(2, 5)], None)
    auto = prefill_attention.paged_prefill_attention(*case.args())
    assert torch.equal(auto, paged_prefill_attention(*case.args(), impl="torch"))     # CPU tensors: the fallback
    with pytest.raises(ValueError, match="impl"):
        prefill_attention.paged_prefill_attention(*case.args(), impl="cuda")
    cache = PagedKVCache(_config(1, 2, 16, 4), {FULL: 4, SLIDING: 4}, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="impl"):
        PagedMetadata(cache, [SeqSpan(0, 2, {FULL: [0], SLIDING: [1]})], "cpu", impl="cuda")


def _config(kv, g, D, window) -> ModelConfig:
    return ModelConfig(vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=kv * g,
                       num_key_value_heads=kv, head_dim=D, intermediate_size=16, num_local_experts=1,
                       num_experts_per_tok=1, sliding_window=window)          # layer 0 sliding, layer 1 full


def _mixed_step(device, B=4, W=6, kv=2, g=2, D=16):
    """A cache of random contents and a mixed step: a chunk from 0, a chunk after a cached prefix longer than the
    window, decodes (one before, one between chunks), sliding tables NULL before the first query's window."""
    gen = torch.Generator().manual_seed(11)
    cache = PagedKVCache(_config(kv, g, D, W), {FULL: 40, SLIDING: 40}, B, torch.float32, device)
    for x in cache.k_heads + cache.v_heads:
        x.copy_(torch.randn(x.shape, generator=gen))
    perm = torch.randperm(40, generator=gen).tolist()
    spans, used = [], 0
    for start, num in [(17, 1), (0, 11), (5, 1), (9, 14), (30, 1)]:
        nb = -(-(start + num) // B)
        table, used = perm[used:used + nb], used + nb
        lo = max(0, start - W + 1)
        sliding = [NULL_BLOCK if (b + 1) * B <= lo else blk for b, blk in enumerate(table)]
        spans.append(SeqSpan(start, num, {FULL: table, SLIDING: sliding}))
    return cache, spans, gen


@needs_triton
def test_paged_metadata_kernel_equals_torch_parts_on_a_mixed_step():
    """PagedMetadata(impl="triton") (one kernel call for the whole step) == PagedMetadata(impl="torch") (decode
    and chunk parts, gathered), layer by layer on sliding and full layers; the writes are the same k/v."""
    cache, spans, gen = _mixed_step(DEVICE)
    kernel, parts = (PagedMetadata(cache, spans, DEVICE, impl=impl) for impl in ("triton", "torch"))
    assert kernel._parts == [] and len(parts._parts) == 2
    T, (kv, _, D), n = sum(s.num_tokens for s in spans), cache.k_heads[0].shape, 4
    sinks = torch.randn(n, generator=gen).to(DEVICE)
    for layer in range(len(cache.groups)):
        window = cache.windows[layer]
        q, k, v = (torch.randn(T, h, D, generator=gen).to(DEVICE) for h in (n, kv, kv))
        expected = parts.attend(layer, q, k, v, sinks, window, D ** -0.5)
        got = kernel.attend(layer, q, k, v, sinks, window, D ** -0.5)                       # rewrites the same k/v
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@needs_triton
def test_kernel_path_equals_full_forward(tiny_dirs):
    """The tiny model (window 8; sliding, full, sliding layers) stepped through PagedMetadata(impl="triton"):
    chunked prefill, a mixed step, decodes == one full forward (fp32)."""
    model = load_model(tiny_dirs("topk_all"), torch.float32, DEVICE)
    B, blocks = 4, 32
    cache = PagedKVCache(model.config, {FULL: blocks, SLIDING: blocks}, B, torch.float32, DEVICE)
    perm = torch.randperm(blocks, generator=torch.Generator().manual_seed(0)).tolist()
    g = torch.Generator().manual_seed(1)
    seqs = {"a": (torch.randint(0, 1024, (27,), generator=g), {FULL: perm[:7], SLIDING: perm[7:14]}),
            "b": (torch.randint(0, 1024, (18,), generator=g), {FULL: perm[14:19], SLIDING: perm[19:24]})}
    steps = [{"a": (0, 13)}, {"a": (13, 11), "b": (0, 5)}, {"b": (5, 12), "a": (24, 1)}, {"a": (25, 1)},
             {"a": (26, 1), "b": (17, 1)}]
    got = {name: [] for name in seqs}
    for step in steps:
        spans = [SeqSpan(start, num, seqs[name][1]) for name, (start, num) in step.items()]
        ids = torch.cat([seqs[name][0][start:start + num] for name, (start, num) in step.items()]).to(DEVICE)
        md = PagedMetadata(cache, spans, DEVICE, impl="triton")
        logits = model.compute_logits(model(ids, md.positions, md)).cpu()
        off = 0
        for name, (start, num) in step.items():
            got[name].append(logits[off:off + num])
            off += num
    tol = 1e-5 if DEVICE == "cpu" else 1e-4                 # 4e-6 measured on CPU; CUDA's exp/matmuls differ
    for name, (ids, _) in seqs.items():
        ref = model.prefix_logits(ids.to(DEVICE)).cpu()
        assert (torch.cat(got[name]) - ref).abs().max().item() < tol, name


class _RecordingKernel:
    """Stands in for the compiled kernel: records the launch grid and arguments, launches nothing."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


@needs_triton
def test_kernel_path_host_side_never_syncs(monkeypatch):
    """PagedMetadata.attend on the kernel path (cache writes, argument preparation, grid from shapes) issues no op
    that reads device data back; the indices are built from host lists before the forward."""
    cache, spans, gen = _mixed_step("cpu")
    recorder = _RecordingKernel()
    monkeypatch.setattr(prefill_attention, "_prefill_kernel", recorder)
    md = PagedMetadata(cache, spans, "cpu", impl="triton")
    T, N, D = sum(s.num_tokens for s in spans), len(spans), 16
    q, k, v = (torch.randn(T, h, D, generator=gen) for h in (4, 2, 2))
    with HostSyncGuard() as guard:
        for layer in range(len(cache.groups)):
            md.attend(layer, q, k, v, torch.zeros(4), cache.windows[layer], D ** -0.5)
    assert guard.ops > 5 and len(recorder.launches) == 2
    grid, args, kwargs = recorder.launches[0]
    assert grid == (T // kwargs["BQ"] + N, 2)
    q_start, q_len, ctx_start = args[4:7]
    assert q_start.tolist() == [0, 1, 12, 13, 27] and q_len.tolist() == [1, 11, 1, 14, 1]
    assert ctx_start.tolist() == [s.start for s in spans]

"""Decode attention over the paged cache == dense sink attention over each sequence's visible keys, for the torch
fallback and the Triton kernel (Triton's interpreter on CPU); == PagedMetadata on decode spans; the fallback
never syncs with the host.

Every cache slot no query may see holds nan, and unused table columns hold garbage (NULL_BLOCK, out-of-range ids),
so a read outside the visible keys shows up as nan or a wrong value.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from engine.config import NULL_BLOCK
from model.attention import sink_attention
from model.config import ModelConfig
from model import decode_attention
from model.decode_attention import KERNEL_AVAILABLE
from model.paged_attention import FULL, SLIDING, PagedKVCache, PagedMetadata, SeqSpan
from tests.sync_guard import HostSyncGuard

needs_triton = pytest.mark.skipif(not KERNEL_AVAILABLE, reason="triton is not installed")


def on_kernel_device(fn, always_kernel=False):
    """CPU inputs run the kernel in Triton's interpreter (tests/conftest.py); on a GPU machine there is none, so the
    kernel's CPU inputs move to CUDA and its output comes back (inputs already on CUDA are left alone)."""
    def call(*args, **kwargs):
        kernel = always_kernel or kwargs.get("impl") == "triton"
        if kernel and torch.cuda.is_available() and not args[0].is_cuda:
            args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
            return fn(*args, **kwargs).cpu()
        return fn(*args, **kwargs)
    return call


paged_decode_attention = on_kernel_device(decode_attention.paged_decode_attention)
decode_attention_triton = on_kernel_device(decode_attention.decode_attention_triton, always_kernel=True)


@dataclass
class Case:
    q: torch.Tensor                 # [N, n, D]
    k_heads: torch.Tensor           # [k, slots, D]
    v_heads: torch.Tensor
    block_tables: torch.Tensor      # int32 [N, M]
    table_start: torch.Tensor       # int32 [N]
    seq_lens: torch.Tensor          # int32 [N]
    sinks: torch.Tensor             # [n]
    window: int | None
    block_size: int
    visible: list[torch.Tensor]     # per sequence the slots of its visible keys, in position order

    @property
    def sm_scale(self) -> float:
        return self.q.shape[-1] ** -0.5

    def args(self):
        return (self.q, self.k_heads, self.v_heads, self.block_tables, self.table_start, self.seq_lens, self.sinks,
                self.window, self.sm_scale, self.block_size)

    def to(self, device) -> "Case":
        moved = {name: getattr(self, name).to(device) for name in
                 ("q", "k_heads", "v_heads", "block_tables", "table_start", "seq_lens", "sinks")}
        return Case(**moved, window=self.window, block_size=self.block_size, visible=self.visible)


def make_case(seq_lens, window, *, kv=2, g=2, D=16, B=4, dtype=torch.float32, seed=0, from_window=True,
              columns=None, num_blocks=None, sinks=None) -> Case:
    """Shuffled blocks; blocks wholly before the window are NULL_BLOCK; from_window=False passes the table from
    column 0 (NULL entries inside it) instead of from the window's first block. Rows with seq_len 0 are padding."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-L // B) for L in seq_lens]
    num_blocks = num_blocks or sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    k_heads = torch.full((kv, num_blocks * B, D), float("nan"), dtype=dtype)
    v_heads = torch.full_like(k_heads, float("nan"))
    rows, starts, visible = [], [], []
    for L, nb in zip(seq_lens, need):
        table, perm = perm[:nb], perm[nb:]
        lo = 0 if window is None else max(0, L - window)
        slots = torch.tensor([table[p // B] * B + p % B for p in range(lo, L)], dtype=torch.long)
        for x in (k_heads, v_heads):
            x[:, slots] = torch.randn(kv, len(slots), D, generator=gen).to(dtype)
        table = [NULL_BLOCK if (b + 1) * B <= lo else blk for b, blk in enumerate(table)]   # recycled blocks
        start = (lo // B if from_window else 0) if L else -3                                 # padding: garbage
        rows.append(table[max(start, 0):])
        starts.append(start)
        visible.append(slots)
    M = columns or max(len(r) for r in rows) + 1
    tables = torch.randint(-3, num_blocks + 3, (len(seq_lens), M), generator=gen, dtype=torch.int32)
    for i, r in enumerate(rows):
        tables[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
    n = kv * g
    q = torch.randn(len(seq_lens), n, D, generator=gen).to(dtype)
    sinks = (torch.randn(n, generator=gen) if sinks is None else sinks).to(dtype)
    return Case(q, k_heads, v_heads, tables, torch.tensor(starts, dtype=torch.int32),
                torch.tensor(seq_lens, dtype=torch.int32), sinks, window, B, visible)


def reference(case: Case) -> torch.Tensor:
    """fp32 [N, n, D]: `sink_attention` per sequence over its visible keys gathered densely."""
    out = []
    for i, slots in enumerate(case.visible):
        k, v = (x[:, slots].transpose(0, 1).float() for x in (case.k_heads, case.v_heads))     # [S, k, D]
        allowed = torch.ones(1, len(slots), dtype=torch.bool)
        out.append(sink_attention(case.q[i:i + 1].float(), k, v, case.sinks.float(), allowed, case.sm_scale))
    return torch.cat(out)


def check(out: torch.Tensor, case: Case, ref: torch.Tensor | None = None):
    ref = reference(case) if ref is None else ref
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert torch.isfinite(out).all()
    tol = 1e-5 if case.q.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    assert (out[case.seq_lens == 0] == 0).all()


# (seq_lens, window, kwargs): L < W, L == W, L >> W, L not a multiple of B, padding rows, GQA g = 1, 2, 4, 8.
CASES = {
    "full_ragged": ([1, 9, 0, 22], None, dict(kv=2, g=4, D=32, B=4)),
    "window_all_regimes": ([5, 8, 37, 0, 13], 8, dict(kv=1, g=2, D=16, B=4)),
    "window_table_from_0": ([5, 8, 37, 0, 13], 8, dict(kv=1, g=2, D=16, B=4, from_window=False)),
    "window_eq_block_gptoss_group": ([16, 50, 3], 16, dict(kv=1, g=8, D=64, B=16)),
    "window_odd_mha": ([30, 7], 5, dict(kv=4, g=1, D=16, B=4)),
    "full_block16": ([40, 0], None, dict(kv=2, g=2, D=64, B=16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_torch_fallback_matches_dense(name):
    seq_lens, window, kw = CASES[name]
    case = make_case(seq_lens, window, **kw)
    check(paged_decode_attention(*case.args(), impl="torch"), case)


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_dense(name):
    seq_lens, window, kw = CASES[name]
    case = make_case(seq_lens, window, **kw)
    ref = reference(case)
    check(paged_decode_attention(*case.args(), impl="triton"), case, ref)
    # Split-K (flash-decoding) with small tiles: several tiles per split, splits with no keys, a merge.
    check(decode_attention_triton(*case.args(), num_splits=3, keys_per_tile=16), case, ref)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("name", ["full_ragged", "window_all_regimes"])
def test_bf16_within_bf16_tolerance(name, impl):
    seq_lens, window, kw = CASES[name]
    case = make_case(seq_lens, window, dtype=torch.bfloat16, seed=5, **kw)
    check(paged_decode_attention(*case.args(), impl=impl), case)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_extreme_sinks(impl):
    """A sink of +1e4 takes all the weight (output 0); -1e4 takes none (plain softmax over the keys)."""
    sinks = torch.tensor([1e4, -1e4, 0.5, -1e4, 1e4, 2.0, -30.0, 30.0])
    case = make_case([6, 19, 0], 8, kv=2, g=4, D=16, B=4, sinks=sinks, seed=3)
    out = paged_decode_attention(*case.args(), impl=impl)
    check(out, case)
    assert (out[:, sinks == 1e4] == 0).all()
    L, slots = 19, case.visible[1]
    k, v = (x[:, slots].float() for x in (case.k_heads, case.v_heads))                     # [k, S, D]
    plain = torch.softmax(case.q[1, 1] @ k[0].T * case.sm_scale, -1) @ v[0]                # head 1 -> KV head 0
    assert len(slots) == 8 and L == 19
    torch.testing.assert_close(out[1, 1], plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_invalid_ids_inside_the_window_are_skipped(impl):
    """A malformed table (NULL_BLOCK or an id past the cache inside the visible keys): those keys drop out."""
    case = make_case([22, 9], None, kv=1, g=2, D=16, B=4, seed=9)
    num_blocks = case.k_heads.shape[1] // 4
    case.block_tables[0, 2], case.block_tables[0, 4] = NULL_BLOCK, num_blocks + 7            # positions 8..11, 16..19
    case.visible[0] = torch.cat([case.visible[0][:8], case.visible[0][12:16], case.visible[0][20:]])
    check(paged_decode_attention(*case.args(), impl=impl), case)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_int64_indices_and_strided_query(impl):
    """DecodeMetadata's calling convention: int64 tables/starts/lengths, q a view into the fused qkv rows."""
    case = make_case([7, 26, 0], 8, kv=2, g=2, D=16, B=4, seed=4)
    ref = reference(case)
    N, n, D = case.q.shape
    qkv = torch.randn(N, n + 4, D)                                                       # [N, n + 2k, D]
    qkv[:, :n] = case.q
    case.q = qkv[:, :n]
    case.block_tables, case.table_start, case.seq_lens = (x.long() for x in (
        case.block_tables, case.table_start, case.seq_lens))
    check(paged_decode_attention(*case.args(), impl=impl), case, ref)


@needs_triton
def test_kernel_splits_cover_long_sequence():
    """Many tiles per split, split count not dividing the tiles, window far behind the end."""
    case = make_case([150, 61, 0], 40, kv=1, g=4, D=16, B=4, seed=7)
    ref = reference(case)
    for splits in (1, 2, 5):
        check(decode_attention_triton(*case.args(), num_splits=splits, keys_per_tile=16), case, ref)


def test_dispatcher():
    case = make_case([3, 9], None)
    auto = paged_decode_attention(*case.args())
    assert torch.equal(auto, paged_decode_attention(*case.args(), impl="torch"))     # CPU tensors: the fallback
    with pytest.raises(ValueError, match="impl"):
        paged_decode_attention(*case.args(), impl="cuda")


def _config(kv, g, D, window) -> ModelConfig:
    return ModelConfig(vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=kv * g,
                       num_key_value_heads=kv, head_dim=D, intermediate_size=16, num_local_experts=1,
                       num_experts_per_tok=1, sliding_window=window)          # layer 0 sliding, layer 1 full


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_equals_paged_metadata_on_decode_spans(impl):
    """PagedMetadata.attend (writes the newest k/v, then attends) == paged_decode_attention on the same cache."""
    kv, g, D, B, W = 2, 2, 16, 4, 6
    config = _config(kv, g, D, W)
    gen = torch.Generator().manual_seed(11)
    cache = PagedKVCache(config, {FULL: 24, SLIDING: 24}, B, torch.float32, "cpu")
    for x in cache.k_heads + cache.v_heads:
        x.copy_(torch.randn(x.shape, generator=gen))
    seq_lens = [1, 6, 13, 22]
    perm = torch.randperm(24, generator=gen).tolist()
    spans, used = [], 0
    for L in seq_lens:
        nb = -(-L // B)
        table, used = perm[used:used + nb], used + nb
        sliding = [NULL_BLOCK if (b + 1) * B <= max(0, L - W) else blk for b, blk in enumerate(table)]
        spans.append(SeqSpan(L - 1, 1, {FULL: table, SLIDING: sliding}))
    md = PagedMetadata(cache, spans, "cpu")
    N, n = len(spans), kv * g
    sinks = torch.randn(n, generator=gen)
    for layer, group in enumerate(cache.groups):
        window = cache.windows[layer]
        q, k, v = (torch.randn(N, h, D, generator=gen) for h in (n, kv, kv))
        expected = md.attend(layer, q, k, v, sinks, window, D ** -0.5)                      # [N, n, D]
        starts = [0 if window is None else max(0, L - window) // B for L in seq_lens]
        rows = [s.block_tables[group][st:] for s, st in zip(spans, starts)]
        M = max(map(len, rows))
        tables = torch.tensor([r + [NULL_BLOCK] * (M - len(r)) for r in rows], dtype=torch.int32)
        got = paged_decode_attention(q, cache.k_heads[layer], cache.v_heads[layer], tables,
                                     torch.tensor(starts, dtype=torch.int32),
                                     torch.tensor(seq_lens, dtype=torch.int32), sinks, window, D ** -0.5, B,
                                     impl=impl)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 8])
def test_torch_fallback_never_syncs_with_host(window):
    case = make_case([5, 37, 0, 13], window, kv=1, g=2)
    with HostSyncGuard() as guard:
        out = paged_decode_attention(*case.args(), impl="torch")
    assert guard.ops > 10
    check(out, case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_cuda_graph_replay_reads_new_lengths(impl):
    """Captured once, replayed after the tables, lengths and queries change in place: matches the new reference."""
    shape = dict(kv=8, g=8, D=64, B=16, dtype=torch.bfloat16, columns=12, num_blocks=40)
    first = make_case([30, 100, 0, 7], 128, seed=1, **shape).to("cuda")
    second = make_case([150, 17, 64, 0], 128, seed=2, **shape).to("cuda")
    static = first
    fn = (lambda: paged_decode_attention(*static.args(), impl=impl))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()                                                         # compile / warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for name in ("q", "k_heads", "v_heads", "block_tables", "table_start", "seq_lens", "sinks"):
        getattr(static, name).copy_(getattr(second, name))
    graph.replay()
    torch.cuda.synchronize()
    check(out.cpu(), second.to("cpu"))


@pytest.mark.parametrize("name", ["full_ragged", "window_all_regimes", "window_table_from_0"])
def test_torch_fallback_reading_masked_keys_from_a_zero_slot(name):
    """With the cache's always-zero slot (PagedKVCache.zero_slot), masked keys are read from there instead of being
    zeroed after the gather: the same output, though every other invisible slot holds nan."""
    seq_lens, window, kw = CASES[name]
    case = make_case(seq_lens, window, **kw)
    B, (kv, _, D) = case.block_size, case.k_heads.shape
    zeros = torch.zeros(kv, B, D, dtype=case.k_heads.dtype)
    k, v = torch.cat([case.k_heads, zeros], 1), torch.cat([case.v_heads, zeros], 1)
    zero_slot = case.k_heads.shape[1]
    args = (case.q, k, v, *case.args()[3:])
    check(paged_decode_attention(*args, impl="torch", zero_slot=zero_slot), case)

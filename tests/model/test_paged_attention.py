"""Paged attention equals dense attention: chunked prefill then single-token decodes through scattered blocks
give the logits of one full forward (fp32), on sliding and full layers, with sinks."""
import torch

from model.loader import load_model
from model.paged_attention import FULL, SLIDING, PagedKVCache, PagedMetadata, SeqSpan


def run_paged(model, cache, seqs, chunks):
    """seqs: {name: (ids, tables)}; chunks: list of steps, each {name: (start, n)} -> logits per name per step."""
    out = {name: [] for name in seqs}
    for step in chunks:
        spans = [SeqSpan(start, n, seqs[name][1]) for name, (start, n) in step.items()]
        ids = torch.cat([seqs[name][0][start:start + n] for name, (start, n) in step.items()])
        md = PagedMetadata(cache, spans, "cpu")
        logits = model.compute_logits(model(ids, md.positions, md))
        off = 0
        for name, (start, n) in step.items():
            out[name].append(logits[off:off + n])
            off += n
    return {name: torch.cat(v) for name, v in out.items()}


def test_prefill_then_decode_equals_full_forward(tiny_dirs):
    model = load_model(tiny_dirs("topk_all"))                      # window 8, layers sliding/full/sliding
    B, blocks = 4, 64
    cache = PagedKVCache(model.config, {FULL: blocks, SLIDING: blocks}, B, torch.float32, "cpu")
    perm = torch.randperm(blocks, generator=torch.Generator().manual_seed(0)).tolist()
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 1024, (37,), generator=g)
    b = torch.randint(0, 1024, (21,), generator=g)
    seqs = {"a": (a, {FULL: perm[:10], SLIDING: perm[10:20]}),
            "b": (b, {FULL: perm[20:26], SLIDING: perm[26:32]})}
    steps = [{"a": (0, 13)}, {"a": (13, 11), "b": (0, 5)}, {"a": (24, 1), "b": (5, 16)}]
    steps += [{"a": (p, 1)} for p in range(25, 37)]
    got = run_paged(model, cache, seqs, steps)
    for name, (ids, _) in seqs.items():
        ref = model.prefix_logits(ids)
        assert got[name].shape == ref.shape
        assert (got[name] - ref).abs().max().item() < 1e-5, name


def test_recycled_sliding_blocks_are_never_read(tiny_dirs):
    """Entries before the window may be -1 (recycled): results are unchanged."""
    model = load_model(tiny_dirs("topk_all"))
    B = 4
    cache = PagedKVCache(model.config, {FULL: 16, SLIDING: 16}, B, torch.float32, "cpu")
    ids = torch.randint(0, 1024, (30,), generator=torch.Generator().manual_seed(2))
    tables = {FULL: list(range(8)), SLIDING: list(range(8, 16))}
    run_paged(model, cache, {"s": (ids, tables)}, [{"s": (0, 29)}])
    tables[SLIDING][:5] = [-1] * 5                                   # positions < 20 are outside the window of 29
    cache.k[0][8:13] = float("nan")                                  # and their old contents are garbage
    last = run_paged(model, cache, {"s": (ids, tables)}, [{"s": (29, 1)}])["s"]
    assert (last[0] - model.prefix_logits(ids)[-1]).abs().max().item() < 1e-5

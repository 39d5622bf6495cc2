"""PagedMetadata splits a step into decodes and prefill chunks: every shape of step still equals a full forward.
Equal-length chunks take the no-gather path, ragged chunks are padded, decodes listed after chunks are scattered
back to their rows, and the KV cache views index the same memory the attention reads."""
import torch

from model.loader import load_model
from model.paged_attention import FULL, SLIDING, PagedKVCache, PagedMetadata, SeqSpan
from tests.model.test_paged_attention import run_paged


def setup(tiny_dirs, lengths, seed=0):
    model = load_model(tiny_dirs("topk_all"))                      # window 8, layers sliding/full/sliding
    B, blocks = 4, 96
    cache = PagedKVCache(model.config, {FULL: blocks, SLIDING: blocks}, B, torch.float32, "cpu")
    perm = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    g = torch.Generator().manual_seed(seed + 1)
    seqs = {}
    for i, (name, n) in enumerate(lengths.items()):
        ids = torch.randint(0, 1024, (n,), generator=g)
        seqs[name] = (ids, {FULL: perm[24 * i:24 * i + 12], SLIDING: perm[24 * i + 12:24 * i + 24]})
    return model, cache, seqs


def check(model, got, seqs):
    for name, (ids, _) in seqs.items():
        ref = model.prefix_logits(ids)
        assert got[name].shape == ref.shape
        assert (got[name] - ref).abs().max().item() < 1e-5, name


def test_equal_chunks_then_chunks_around_a_decode(tiny_dirs):
    model, cache, seqs = setup(tiny_dirs, {"a": 30, "b": 20, "c": 14})
    steps = [{"a": (0, 10), "b": (0, 10), "c": (0, 10)},          # equal chunks: one part, no gather
             {"a": (10, 12), "b": (10, 1), "c": (10, 4)},          # a one-token row between two ragged chunks
             {"a": (22, 8), "b": (11, 1)}]
    steps += [{"b": (p, 1)} for p in range(12, 20)]                # decodes only
    check(model, run_paged(model, cache, seqs, steps), seqs)


def test_cache_views_index_the_memory_attention_reads(tiny_dirs):
    model, cache, seqs = setup(tiny_dirs, {"a": 9})
    ids, tables = seqs["a"]
    md = PagedMetadata(cache, [SeqSpan(0, 9, tables)], "cpu")
    model(ids, md.positions, md)
    block, slot = tables[FULL][1], 2                              # position 6 = block 1, slot 2
    layer = cache.groups.index(FULL)
    assert cache.k[layer].shape == (96, 4, 2, 16)                 # [blocks, B, kv, D]
    assert torch.equal(cache.k[layer][block, slot], cache.k_heads[layer][:, block * 4 + slot])
    assert cache.k[layer][block, slot].abs().sum() > 0            # written by the forward

"""The EP layer between real ranks (gloo, one process each, no Ray): the fixed-capacity path (one dispatch and one
combine all-to-all a layer, routing riding with the rows) and the variable path it replaces give what the experts
give in one process, for ranks with different token counts (one with none), with and without redundant experts,
before and after a rebalance; the step's rows are agreed once and rounded to a graph size."""
import pytest
import torch

from cluster.ep_experts import EPExperts, EPStats
from cluster.ep_step import EPStep
from cluster.expert_placement import ExpertPlacement, num_physical_slots, rebalance
from model.config import ModelConfig
from model.moe import LocalExperts, route
from model.tiny import TinySpec, write_tiny
from bench.ep_ranks import run_ranks

BASE = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=64, vocab=1024, sliding_window=8,
            shards=1)
TOKENS = [5, 0, 17, 3]                   # tokens per rank: uneven, one rank without any
GRAPH_SIZES = [1, 2, 4, 8, 16, 24]


def reference_experts(cfg: ModelConfig, layer: int) -> LocalExperts:
    """Every expert of `layer`, random weights seeded by the layer (the same on every rank)."""
    g = torch.Generator().manual_seed(100 + layer)
    ref = LocalExperts(cfg, torch.float32).requires_grad_(False)
    for p in ref.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return ref


def rank_layers(cfg, refs, rank, ep_size, placement, dispatch):
    stats = EPStats(cfg.num_hidden_layers, cfg.num_local_experts, "cpu")
    layers = [EPExperts(cfg, i, rank, ep_size, placement, stats, torch.float32, dispatch=dispatch)
              .requires_grad_(False) for i in range(cfg.num_hidden_layers)]
    for layer, ref in zip(layers, refs):
        for s, e in enumerate(layer.slot_experts()):
            for name, p in layer.slots.named_parameters():
                p[s].copy_(getattr(ref, name)[e])
    return layers, stats


def placements(cfg, ep_size: int):
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    redundant = ExpertPlacement.initial(L, E, ep_size, 3)
    load = torch.rand(L, E, generator=torch.Generator().manual_seed(7)) * 100
    moved = rebalance(load, ep_size, num_physical_slots(E, ep_size, 3), previous=redundant)
    assert moved != redundant
    return {"plain": ExpertPlacement.initial(L, E, ep_size, 0), "redundant": redundant, "rebalanced": moved}


def _check_rank(rank: int, ep_size: int, model_dir: str) -> None:
    cfg = ModelConfig.from_dir(model_dir)
    L, E, K, H = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok, cfg.hidden_size
    refs = [reference_experts(cfg, i) for i in range(L)]
    T = TOKENS[rank]
    g = torch.Generator().manual_seed(rank)
    inputs = [(torch.randn(T, H, generator=g), *route(torch.randn(T, E, generator=g), K)) for _ in range(L)]
    want = [ref(t, ids, w) for ref, (t, w, ids) in zip(refs, inputs)]
    for name, placement in placements(cfg, ep_size).items():
        for dispatch, attached in (("fixed", False), ("fixed", True), ("variable", False)):
            layers, stats = rank_layers(cfg, refs, rank, ep_size, placement, dispatch)
            if attached:                             # as a runner does: agree first, count after the step
                stats.step.sizes, stats.step.attached = GRAPH_SIZES, True
                assert stats.step.agree(T) == (24 if ep_size > 2 else 8)        # max 17 -> 24; max 5 -> 8
            got = [layer(t, ids, w) for layer, (t, w, ids) in zip(layers, inputs)]
            what = f"rank {rank}, {name}, {dispatch}{' attached' if attached else ''}"
            for i in range(L):
                torch.testing.assert_close(got[i], want[i], rtol=0, atol=1e-5, msg=what)
            assert stats.collectives == (2 if dispatch == "fixed" else 4) * L, what
            if dispatch == "fixed" and not attached:
                assert stats.step.rows == max(TOKENS[:ep_size]) and stats.step.agreements == 1, what
            if attached:
                assert int(stats.counts.sum()) == 0, what                   # counted after the step, by `count`
                for layer in layers:
                    layer.count(T, T, False)
            for i, (_, _, ids) in enumerate(inputs):
                assert torch.equal(stats.counts[i], torch.bincount(ids.flatten(), minlength=E)), what


@pytest.mark.parametrize("ep_size,experts,top_k", [(2, 6, 2), (4, 8, 4)])
def test_ep_layers_equal_the_local_experts_on_every_rank(tmp_path, ep_size, experts, top_k):
    path = write_tiny(tmp_path / "m", TinySpec(seed=4, experts=experts, top_k=top_k, **BASE))
    run_ranks(_check_rank, ep_size, str(path))


def test_step_rows_round_up_to_a_graph_size_and_bound_every_forward():
    step = EPStep()                                      # no process group: a group of one
    assert step.rows_for(0, 5, captured=False) == 5 and step.agreements == 1      # layer 0 agrees, no runner
    step.sizes, step.attached = GRAPH_SIZES, True
    assert [step.agree(n) for n in (0, 1, 3, 9, 24, 25, 300)] == [1, 1, 4, 16, 24, 25, 300]
    assert step.rows_for(0, 7, captured=False) == 300 and step.agreements == 8    # attached: layer 0 does not
    assert step.rows_for(1, 8, captured=True) == 8                                # a graph's rows are its own
    step.agree(4)
    with pytest.raises(RuntimeError, match="agreed on 4"):
        step.rows_for(0, 5, captured=False)

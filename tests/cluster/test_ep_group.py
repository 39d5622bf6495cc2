"""Expert parallelism across Ray actors: EP 1 == 2 == 4 on the 24 ragged prompts (the engine tests' set), with and
without redundant experts and across a rebalance, each rank holds only its share of experts, a dead rank fails the
step quickly with an error naming it."""
import time

import pytest
import torch

from cluster.ep_group import EPConfig, EPGroup, EPStepError
from engine.engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from model.loader import load_model
from model.tiny import TinySpec, write_tiny

ENGINE = EngineConfig(max_num_seqs=16, max_num_batched_tokens=64, block_size=4, max_model_len=256)
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Experts 6 (not a multiple of 4) and 8 (a multiple of 2 and 4)."""
    base = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=64, top_k=2, vocab=1024,
                sliding_window=16, shards=2)
    return {e: write_tiny(tmp_path_factory.mktemp(f"ep{e}"), TinySpec(seed=20 + e, experts=e, **base))
            for e in (6, 8)}


@pytest.fixture(scope="module")
def prompts(ragged_prompts):
    return ragged_prompts


def local_tokens(path, prompts):
    return [o[0].output_token_ids for o in LLMEngine(load_model(path), ENGINE).generate(prompts, GREEDY)]


def run_group(group: EPGroup, prompts, params=GREEDY, on_results=None):
    return [outs[0].output_token_ids for outs in group.generate(prompts, params, on_results=on_results)]


def rebalance_once_at(step: int, moved: list):
    """on_results hook: rebalance once, as soon as the group has passed `step` (mid-generation)."""
    def hook(group, _results):
        if not moved and group.num_steps >= step:
            moved.append(group.rebalance())
    return hook


@pytest.mark.parametrize("experts", [6, 8])
def test_ep_1_2_4_give_identical_greedy_outputs(ray_cluster, checkpoints, prompts, experts):
    path = checkpoints[experts]
    local = local_tokens(path, prompts)
    for ep_size in (1, 2, 4):
        group = EPGroup(str(path), EPConfig(ep_size=ep_size, collective_timeout_s=20), ENGINE)
        ran_on: set[int] = set()
        try:
            assert run_group(group, prompts, on_results=lambda g, rs: ran_on.update(
                r.rank for r in rs if any(o.new_token_ids for o in r.outputs))) == local, f"ep_size={ep_size}"
            # data-parallel attention: every rank generated tokens for requests of its own
            assert ran_on == set(range(ep_size))
        finally:
            group.shutdown()


def test_each_rank_holds_only_its_share_of_experts(ray_cluster, checkpoints):
    path = checkpoints[6]
    full = sum(p.numel() for n, p in load_model(path, experts="dense").named_parameters() if ".experts." in n)
    per_expert = full // 6
    group = EPGroup(str(path), EPConfig(ep_size=4, experts="dense"), ENGINE)
    try:
        counts = group.num_expert_params()
    finally:
        group.shutdown()
    assert counts == [2 * per_expert] * 4            # ceil(6 / 4) = 2 slots per rank, never all 6 experts


@pytest.mark.parametrize("ep_size", [2, 4])
def test_redundant_experts_and_a_rebalance_mid_generation_change_no_token(ray_cluster, checkpoints, prompts,
                                                                          ep_size):
    path = checkpoints[8]
    local = local_tokens(path, prompts)
    config = EPConfig(ep_size=ep_size, redundant_experts=2, rebalance_interval_steps=0, collective_timeout_s=20)
    group = EPGroup(str(path), config, ENGINE)
    try:
        reference = run_group(group, prompts)
        moved = []
        got = run_group(group, prompts, on_results=rebalance_once_at(group.num_steps + 6, moved))
        stats = ray_cluster.get(group.router.stats.remote())
        placement = ray_cluster.get(group.router.placement.remote())[1]
    finally:
        group.shutdown()
    assert reference == local and got == local
    assert moved and moved[0] > 0                     # weights really moved between ranks
    load = torch.as_tensor(stats["window_tokens"]).float()          # [L, E]
    for layer in range(load.shape[0]):
        hot, cold = load[layer].argmax().item(), load[layer].argmin().item()
        assert placement.logcnt[layer, hot] > placement.logcnt[layer, cold]


def test_packed_slots_give_the_local_tokens_and_survive_a_rebalance(ray_cluster, checkpoints, prompts):
    """Ranks holding their slots as packed MXFP4 (what CUDA ranks do for MXFP4 checkpoints): the local engine's
    greedy tokens, a mid-generation rebalance reloads moved slots as packed bytes, each rank stores 17/32 byte per
    expert weight of its slots (plus biases), never a dense copy."""
    path = checkpoints[8]
    local = local_tokens(path, prompts)
    config = EPConfig(ep_size=2, redundant_experts=2, rebalance_interval_steps=0, collective_timeout_s=20,
                      experts="packed")
    group = EPGroup(str(path), config, ENGINE)
    try:
        stored = group.num_expert_params()
        before = ray_cluster.get([w.slot_experts.remote() for w in group.workers])
        moved = []
        got = run_group(group, prompts, on_results=rebalance_once_at(group.num_steps + 6, moved))
        after = ray_cluster.get([w.slot_experts.remote() for w in group.workers])
    finally:
        group.shutdown()
    assert got == local and moved and moved[0] > 0
    assert after != before                                             # the ranks applied the new map
    H = I = 64
    per_expert = (2 * I * H + H * I) * 17 // 32 + 2 * I + H          # blocks + scales, biases
    assert stored == [2 * 5 * per_expert] * 2                          # 2 layers x (8 + 2) / 2 slots per rank


def test_dead_rank_fails_the_group_quickly_and_names_it(ray_cluster, checkpoints, prompts):
    group = EPGroup(str(checkpoints[8]), EPConfig(ep_size=2, collective_timeout_s=5, elastic=False), ENGINE)
    try:
        group.add_requests([(f"r{i}", p, SamplingParams(max_tokens=500, ignore_eos=True))
                            for i, p in enumerate(prompts[:6])])
        assert group.results(timeout_s=30)                 # the ranks are stepping on their own
        ray_cluster.kill(group.workers[1])
        start = time.monotonic()
        with pytest.raises(EPStepError, match="rank 1 died"):
            while time.monotonic() - start < 30:
                group.results(timeout_s=1)
        assert time.monotonic() - start < 5 + 6
    finally:
        group.shutdown()
    rebuilt = EPGroup(str(checkpoints[8]), EPConfig(ep_size=2, collective_timeout_s=5), ENGINE)  # torn down, rebuilt
    try:
        assert len(run_group(rebuilt, prompts[:2])[1]) == GREEDY.max_tokens
    finally:
        rebuilt.shutdown()


def test_single_rank_counts_every_routed_token(ray_cluster, checkpoints, prompts):
    """ep_size 1 runs the local backend without collectives and still reports its expert load: per layer, top_k
    counts for every token it forwarded (prompts, and every generated token but the last)."""
    group = EPGroup(str(checkpoints[6]), EPConfig(ep_size=1, collective_timeout_s=20), ENGINE)
    totals = []
    try:
        run_group(group, prompts, on_results=lambda g, rs: totals.extend(
            r.expert_counts for r in rs if r.expert_counts is not None))
    finally:
        group.shutdown()
    counts = sum(totals)                                                        # [L, E]
    forwarded = sum(len(p) + GREEDY.max_tokens - 1 for p in prompts)
    assert counts.shape == (2, 6) and counts.sum(dim=1).tolist() == [2 * forwarded] * 2
    assert (counts > 0).sum() >= 8                                              # spread over the experts

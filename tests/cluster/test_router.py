"""ExpertRouter without Ray (window, triggers, versions, stats), then once as a Ray actor.

Load used throughout: one layer, E=6 experts, ep=4, 2 redundant (8 slots); per-step counts [6, 2, 1, 0, 0, 0] make
the window skewed like tests/cluster/test_expert_placement.py's running example.
"""
import pytest
import torch

from cluster.expert_placement import ExpertPlacement
from cluster.router import ExpertRouter, RouterConfig

STEP = torch.tensor([[6, 2, 1, 0, 0, 0]])


def make_router(**overrides) -> ExpertRouter:
    args = dict(num_layers=1, num_experts=6, ep_size=4, num_redundant=2, window_steps=3, rebalance_interval_steps=10)
    return ExpertRouter(RouterConfig(**{**args, **overrides}))


def test_config_validation_says_what_is_wrong():
    assert RouterConfig(2, 6, 4, 0).num_slots == 8
    assert RouterConfig(2, 6, 4, 0).window_steps == 1000
    with pytest.raises(ValueError, match="ep_size must be at least 1"):
        RouterConfig(2, 6, 0, 0)
    with pytest.raises(ValueError, match="num_redundant"):
        RouterConfig(2, 6, 4, -1)
    with pytest.raises(ValueError, match="rebalance_interval_steps"):
        RouterConfig(2, 6, 4, 0, rebalance_interval_steps=-5)
    with pytest.raises(ValueError, match="does not match the config"):
        ExpertRouter(RouterConfig(1, 6, 4, 2), ExpertPlacement.initial(1, 6, 2, 2))


def test_starts_from_the_initial_map_at_version_zero():
    router = make_router()
    version, placement = router.placement()
    assert version == 0 and placement == ExpertPlacement.initial(1, 6, 4, 2)
    assert router.placement_if_newer(0) is None
    assert router.balancedness() == [1.0]                          # no load yet


def test_window_slides_and_old_steps_drop_out():
    router = make_router(window_steps=3)
    for step in range(5):
        router.record(step, torch.tensor([[step, 1, 0, 0, 0, 0]]))
    stats = router.stats()
    assert stats["window_tokens"] == [[2 + 3 + 4, 3, 0, 0, 0, 0]]    # steps 2, 3, 4
    assert stats["window_records"] == 3 and stats["steps_seen"] == 5 and stats["last_step"] == 4
    router.record(10, torch.zeros(1, 6, dtype=torch.int64))         # a gap: everything before step 8 leaves
    assert router.stats()["window_tokens"] == [[0] * 6]


def test_record_many_equals_recording_one_by_one_and_steps_may_repeat():
    a, b = make_router(), make_router()
    records = [(0, STEP), (0, STEP), (1, [[1, 0, 0, 0, 0, 1]]), (2, STEP * 2)]
    for step, counts in records:
        a.record(step, counts)
    b.record_many(records)
    assert a.stats() == b.stats()
    assert b.stats()["window_tokens"] == [[25, 8, 4, 0, 0, 1]] and b.stats()["steps_seen"] == 3


def test_record_rejects_bad_counts_and_steps_going_backwards():
    router = make_router()
    router.record(5, STEP)
    with pytest.raises(ValueError, match="older than the last recorded step 5"):
        router.record(4, STEP)
    with pytest.raises(ValueError, match=r"shape \[1, 6\]"):
        router.record(6, torch.zeros(2, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer token counts"):
        router.record(6, STEP.float())
    with pytest.raises(ValueError, match="non-negative"):
        router.record(6, -STEP)


def test_maybe_rebalance_runs_every_interval_and_only_when_the_map_changes():
    router = make_router(window_steps=5, rebalance_interval_steps=10)
    router.record_many([(step, STEP) for step in range(10)])
    assert router.maybe_rebalance(5) is None                        # interval not reached
    new = router.maybe_rebalance(10)
    assert new is not None and router.placement() == (1, new)
    assert new.logcnt.tolist() == [[3, 1, 1, 1, 1, 1]]              # hottest expert 0 holds the most replicas
    assert router.placement_if_newer(0) == (1, new) and router.placement_if_newer(1) is None
    router.record_many([(step, STEP.flip(1)) for step in range(10, 15)])   # expert 5 is hot now
    assert router.maybe_rebalance(15) is None                       # only 5 steps since the last check
    newer = router.maybe_rebalance(20)
    assert newer is not None and newer.logcnt.tolist() == [[1, 1, 1, 1, 1, 3]] and router.placement()[0] == 2
    assert router.maybe_rebalance(30) is None                       # same load: same map, no new version
    assert router.placement()[0] == 2 and router.stats()["rebalances"] == 2


def test_maybe_rebalance_waits_for_data_and_interval_zero_never_triggers():
    router = make_router(rebalance_interval_steps=10)
    assert router.maybe_rebalance(10) is None                       # empty window: nothing to balance
    router.record(11, STEP)
    assert router.maybe_rebalance(11) is not None                   # the timer was not consumed by the empty try
    never = make_router(rebalance_interval_steps=0)
    never.record(0, STEP)
    assert never.maybe_rebalance(10_000) is None and never.placement()[0] == 0


def test_rebalance_on_request_improves_balancedness_and_reports_stats():
    router = make_router(window_steps=1000)
    router.record_many([(step, STEP) for step in range(10)])        # window [60, 20, 10, 0, 0, 0]
    assert router.balancedness() == [pytest.approx(22.5 / 40)]      # ranks [40, 10, 0, 40] under the initial map
    placement = router.rebalance()
    assert router.placement() == (1, placement)
    assert router.balancedness() == [pytest.approx(22.5 / 30)]      # ranks [30, 20, 20, 20]
    assert router.rebalance() == placement and router.placement()[0] == 1   # nothing new to do
    stats = router.stats()
    assert stats["version"] == 1 and stats["rebalances"] == 1
    assert stats["last_moves"] == placement.moves(ExpertPlacement.initial(1, 6, 4, 2)) > 0
    assert stats["balancedness"] == router.balancedness()


def test_rebalance_with_no_data_keeps_the_map():
    router = make_router()
    assert router.rebalance() == ExpertPlacement.initial(1, 6, 4, 2) and router.placement()[0] == 0


def test_router_runs_as_a_ray_actor(ray_cluster):
    ray = ray_cluster
    actor = ray.remote(ExpertRouter).remote(RouterConfig(1, 6, 4, 2, window_steps=100, rebalance_interval_steps=5))
    ray.get(actor.record_many.remote([(step, STEP) for step in range(5)]))
    new = ray.get(actor.maybe_rebalance.remote(5))
    version, placement = ray.get(actor.placement.remote())
    assert version == 1 and placement == new and new.logcnt.tolist() == [[3, 1, 1, 1, 1, 1]]
    stats = ray.get(actor.stats.remote())
    assert stats["window_tokens"] == [[30, 10, 5, 0, 0, 0]] and stats["balancedness"] == [pytest.approx(22.5 / 30)]

"""ExpertPlacement and the EPLB policy, hand-checkable cases first, then a randomized property sweep.

Running example (E=6 experts, ep=4, 2 redundant -> 2 slots per rank, 8 slots), load [60, 20, 10, 5, 3, 2]:
initial map [0 1 | 2 3 | 4 5 | 0 1] gives rank loads [40, 15, 5, 40] (balancedness 25/40); EPLB gives expert 0 three
replicas and ranks [0 2 | 0 3 | 0 4 | 1 5] with loads [30, 25, 23, 22] (balancedness 25/30).
"""
import pickle
import random

import pytest
import torch

from cluster.expert_placement import ExpertPlacement, _pack, num_physical_slots, rebalance

SKEWED = torch.tensor([[60.0, 20, 10, 5, 3, 2]])


def test_num_physical_slots_gives_every_rank_the_same_number_of_slots():
    assert num_physical_slots(6, 4, 0) == 8         # 6 experts on 4 ranks: 2 spare slots from rounding
    assert num_physical_slots(6, 4, 2) == 8
    assert num_physical_slots(128, 8, 16) == 144    # gpt-oss-120b on EP8 with 16 redundant: 18 per rank
    assert num_physical_slots(4, 8, 0) == 8         # more ranks than experts: one slot each
    with pytest.raises(ValueError, match="num_redundant"):
        num_physical_slots(6, 4, -1)


def test_initial_pads_an_uneven_split_with_replicas_of_the_first_experts():
    p = ExpertPlacement.initial(num_layers=2, num_experts=6, ep_size=4, num_redundant=0)
    assert (p.num_slots, p.slots_per_rank, p.num_layers, p.num_experts) == (8, 2, 2, 6)
    assert p.phy2log.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1]] * 2
    assert p.logcnt.tolist() == [[2, 2, 1, 1, 1, 1]] * 2
    assert p.log2phy[0].tolist() == [[0, 6], [1, 7], [2, -1], [3, -1], [4, -1], [5, -1]]
    assert p.slots_of_rank(3) == range(6, 8)
    assert [p.experts_of_rank(1, r) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [0, 1]]


def test_initial_without_spare_slots_is_the_contiguous_split():
    p = ExpertPlacement.initial(3, 8, 4, 0)
    assert p.phy2log.tolist() == [list(range(8))] * 3
    assert p.log2phy.shape == (3, 8, 1) and p.log2phy[..., 0].tolist() == [list(range(8))] * 3
    assert p.logcnt.min() == 1 and p.logcnt.max() == 1
    spare = ExpertPlacement.initial(1, 4, 2, 6)     # 10 slots: spares round-robin 0, 1, 2, 3, 0, 1
    assert spare.phy2log.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]]
    assert spare.logcnt.tolist() == [[3, 3, 2, 2]]


def check_consistent(p: ExpertPlacement) -> None:
    """log2phy lists exactly the slots whose phy2log is that expert, ascending, then -1 padding."""
    phy2log, log2phy, logcnt = p.phy2log.tolist(), p.log2phy.tolist(), p.logcnt.tolist()
    for row, table, counts in zip(phy2log, log2phy, logcnt):
        for e, (slots, n) in enumerate(zip(table, counts)):
            assert n >= 1
            assert slots[:n] == [s for s, held in enumerate(row) if held == e]
            assert slots[n:] == [-1] * (len(slots) - n)
    assert (p.logcnt.sum(1) == p.num_slots).all()


def test_log2phy_and_phy2log_agree_for_initial_and_rebalanced_maps():
    check_consistent(ExpertPlacement.initial(2, 6, 4, 2))
    check_consistent(rebalance(SKEWED, ep_size=4, num_slots=8))
    check_consistent(rebalance(torch.rand(5, 16) * 100, ep_size=4, num_slots=24))


def test_validation_messages_say_what_to_fix():
    with pytest.raises(ValueError, match="at least one physical slot.*\\[0, 3\\]"):
        ExpertPlacement.from_phy2log(torch.tensor([[0, 1, 2, 2]]), num_experts=4, ep_size=2)
    with pytest.raises(ValueError, match="split evenly over ep_size=4"):
        ExpertPlacement.from_phy2log(torch.tensor([[0, 1, 2, 3, 0, 1]]), num_experts=4, ep_size=4)
    with pytest.raises(ValueError, match="expert ids in"):
        ExpertPlacement.from_phy2log(torch.tensor([[0, 1, 2, 4]]), num_experts=4, ep_size=2)
    good = ExpertPlacement.initial(1, 4, 2, 2)
    with pytest.raises(ValueError, match="do not match phy2log"):
        ExpertPlacement(good.phy2log, good.log2phy.flip(2), good.logcnt, 2)
    with pytest.raises(ValueError, match="int64"):
        ExpertPlacement(good.phy2log.int(), good.log2phy, good.logcnt, 2)


def test_choose_slots_picks_only_replicas_of_the_chosen_expert_and_spreads_evenly():
    p = ExpertPlacement.initial(1, 6, 4, 0)                      # experts 0 and 1 in slots {0, 6} and {1, 7}
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [5, 4], [1, 0]])   # [T=6, K=2]
    slots = p.choose_slots(0, ids)
    assert (p.phy2log[0][slots] == ids).all()
    assert slots.tolist() == [[0, 7], [6, 2], [0, 7], [7, 0], [5, 4], [7, 0]]
    assert torch.equal(p.choose_slots(0, ids), slots)             # deterministic
    hot = torch.zeros(100, 1, dtype=torch.int64)                  # 100 tokens all to expert 0
    assert torch.bincount(p.choose_slots(0, hot).flatten(), minlength=8).tolist() == [50, 0, 0, 0, 0, 0, 50, 0]
    shifted = p.choose_slots(0, hot[:1], key=torch.tensor([1]))   # a rank offset moves token 0 to replica 1
    assert shifted.tolist() == [[6]]


def test_choose_slots_refuses_a_map_on_another_device():
    p = ExpertPlacement.initial(1, 4, 2, 0)
    with pytest.raises(ValueError, match="placement.to"):
        p.choose_slots(0, torch.zeros(2, 2, dtype=torch.int64, device="meta"))


@pytest.mark.gpu
@pytest.mark.gpu
def test_choose_slots_runs_on_the_gpu():
    p = rebalance(SKEWED, 4, 8).to("cuda")
    ids = torch.randint(0, 6, (64, 4), device="cuda")
    slots = p.choose_slots(0, ids)
    assert slots.is_cuda and (p.phy2log[0][slots] == ids).all()


def test_rank_loads_and_balancedness_of_the_initial_map():
    p = ExpertPlacement.initial(1, 6, 4, 2)
    assert p.rank_loads(0, SKEWED[0]).tolist() == [40.0, 15.0, 5.0, 40.0]
    assert p.balancedness(SKEWED).tolist() == [pytest.approx(25 / 40)]
    assert p.balancedness(torch.zeros(1, 6)).tolist() == [1.0]   # no load: nothing to balance
    with pytest.raises(ValueError, match="expert load must be"):
        p.balancedness(torch.zeros(2, 6))


def test_rebalance_replicates_the_hottest_expert_and_improves_balancedness():
    p = rebalance(SKEWED, ep_size=4, num_slots=8)
    assert p.logcnt.tolist() == [[3, 1, 1, 1, 1, 1]]
    assert p.phy2log.tolist() == [[0, 2, 0, 3, 0, 4, 1, 5]]
    assert p.rank_loads(0, SKEWED[0]).tolist() == [30.0, 25.0, 23.0, 22.0]
    assert p.balancedness(SKEWED).item() == pytest.approx(25 / 30)
    assert p.balancedness(SKEWED).item() > ExpertPlacement.initial(1, 6, 4, 2).balancedness(SKEWED).item() + 0.2


def test_rebalance_ties_favour_fewest_replicas_so_no_load_gives_the_initial_counts():
    zero = rebalance(torch.zeros(2, 4), ep_size=2, num_slots=10)
    assert zero.logcnt.tolist() == ExpertPlacement.initial(2, 4, 2, 6).logcnt.tolist() == [[3, 3, 2, 2]] * 2


def test_pack_fills_every_rank_exactly_and_swaps_away_an_avoidable_duplicate():
    # Greedy alone ends with both replicas of expert 4 on rank 0 (rank 1 is full); a swap fixes it.
    bins = _pack([10.0, 1.0, 1.0, 1.0, 0.5], [1, 1, 1, 1, 2], num_ranks=2, S=3)
    assert bins == [[0, 1, 4], [4, 2, 3]]
    # Expert 1 (10.5) gets the spare slot; its second replica goes to rank 0 (with expert 0, 10) rather than
    # next to its first copy on the lighter rank 1: [0 1 4 | 1 2 3], rank loads 16.25 and 7.25.
    p = rebalance(torch.tensor([[10.0, 10.5, 1, 1, 1]]), ep_size=2, num_slots=6)
    assert p.phy2log.tolist() == [[0, 1, 4, 1, 2, 3]]
    assert p.rank_loads(0, torch.tensor([10.0, 10.5, 1, 1, 1])).tolist() == [16.25, 7.25]
    # 5 replicas on 2 ranks: duplicates are unavoidable, every rank still gets exactly S.
    p = rebalance(torch.tensor([[100.0, 1.0]]), ep_size=2, num_slots=6)
    assert p.logcnt.tolist() == [[5, 1]]
    assert [p.experts_of_rank(0, r) for r in range(2)] == [[0, 0, 0], [0, 0, 1]]


def test_rebalance_is_deterministic():
    load = torch.tensor([[5.0, 5, 5, 5, 1, 1, 1, 1], [0, 0, 9, 9, 9, 0, 0, 1]])
    assert torch.equal(rebalance(load, 4, 12).phy2log, rebalance(load.clone(), 4, 12).phy2log)


def test_moves_counts_changed_slots_and_previous_map_reduces_them():
    init = ExpertPlacement.initial(1, 6, 4, 2)
    fresh = rebalance(SKEWED, 4, 8)
    kept = rebalance(SKEWED, 4, 8, previous=init)
    assert init.moves(init) == 0 and fresh.moves(init) == 6
    assert kept.phy2log.tolist() == [[0, 2, 0, 3, 4, 0, 5, 1]]    # same ranks' contents, old slots kept
    assert kept.moves(init) == 4
    assert kept.balancedness(SKEWED).item() == pytest.approx(25 / 30)
    assert rebalance(SKEWED, 4, 8, previous=kept) == kept          # same load again: nothing moves
    with pytest.raises(ValueError, match="different layouts"):
        init.moves(ExpertPlacement.initial(1, 6, 2, 2))


def test_a_layer_that_would_not_improve_keeps_its_previous_map():
    # [3, 3, 2, 2] on 2 ranks: greedy packs [0 2 | 1 3]; the previous [0 3 | 1 2] is just as balanced.
    # Layer 1 [1, 1, 8, 8] on [0 1 | 2 3] (loads 2, 16) improves to [0 2 | 1 3], experts 0 and 3 staying put.
    load = torch.tensor([[3.0, 3, 2, 2], [1, 1, 8, 8]])
    previous = ExpertPlacement.from_phy2log(torch.tensor([[0, 3, 1, 2], [0, 1, 2, 3]]), 4, 2)
    p = rebalance(load, ep_size=2, num_slots=4, previous=previous)
    assert p.phy2log.tolist() == [[0, 3, 1, 2], [0, 2, 1, 3]]
    assert p.moves(previous) == 2
    assert p.balancedness(load).tolist() == [1.0, 1.0]
    assert rebalance(load, ep_size=2, num_slots=4).phy2log[0].tolist() == [0, 2, 1, 3]   # without previous


def test_transfers_turn_the_old_map_into_the_new_one_preferring_local_copies():
    init = ExpertPlacement.initial(1, 6, 4, 2)
    kept = rebalance(SKEWED, 4, 8, previous=init)
    plan = init.transfers(kept)
    assert plan == [(0, 1, 2, 2), (0, 2, 0, 0), (0, 5, 0, 6), (0, 6, 5, 5)]
    swap = ExpertPlacement.from_phy2log(torch.tensor([[1, 0, 2, 3]]), 4, 2)
    assert ExpertPlacement.initial(1, 4, 2, 0).transfers(swap) == [(0, 0, 1, 1), (0, 1, 0, 0)]   # both local
    old = ExpertPlacement.from_phy2log(torch.tensor([[0, 1, 2, 0]]), 3, 2)     # expert 0 on both ranks
    new = ExpertPlacement.from_phy2log(torch.tensor([[0, 1, 0, 2]]), 3, 2)
    assert old.transfers(new) == [(0, 2, 0, 3), (0, 3, 2, 2)]                  # rank 1 copies its own expert 0


def test_placements_pickle_and_compare_by_map():
    p = rebalance(SKEWED, 4, 8)
    q = pickle.loads(pickle.dumps(p))
    assert q == p and q.to("cpu") == p and p != ExpertPlacement.initial(1, 6, 4, 2)


@pytest.mark.parametrize("seed", range(4))
def test_random_loads_give_valid_maps_without_avoidable_duplicates(seed):
    rng = random.Random(seed)
    for _ in range(50):
        E, R, red, L = rng.randint(2, 12), rng.randint(1, 6), rng.randint(0, 10), rng.randint(1, 3)
        P = num_physical_slots(E, R, red)
        load = torch.tensor([[rng.choice([0.0, 1.0, 2.0, 7.0, 100.0, rng.random() * 50]) for _ in range(E)]
                             for _ in range(L)])
        previous = ExpertPlacement.initial(L, E, R, red)
        for p in (rebalance(load, R, P), rebalance(load, R, P, previous=previous)):
            check_consistent(p)
            for layer in range(L):
                ranks = [p.experts_of_rank(layer, r) for r in range(R)]
                assert all(len(b) == P // R for b in ranks)
                if int(p.logcnt[layer].max()) <= R:
                    assert all(len(set(b)) == len(b) for b in ranks), (load, ranks)
        assert (p.balancedness(load) >= previous.balancedness(load) - 1e-12).all()

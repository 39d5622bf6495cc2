"""The pieces of elastic EP that need no Ray: the placement over survivors (covers every expert, keeps what
survivors hold, uses redundant copies before growing), the router following the group's size, the request book's
continuations, and refitting a rank's slots (copies local experts, reads only the missing ones)."""
import pytest
import torch

from cluster.ep_experts import EPExperts, EPStats
from cluster.expert_placement import ExpertPlacement, rebalance
from cluster.expert_slots import refit
from cluster.request_book import RequestBook
from cluster.router import ExpertRouter, RouterConfig
from cluster.survivor_placement import survivor_placement, survivor_slots
from engine.sampling_params import SamplingParams
from engine.token_output import TokenOutput
from model.checkpoint import Checkpoint
from model.config import ModelConfig
from model.tiny import TinySpec, write_tiny


def loaded_placement(layers=3, experts=8, ep=4, redundant=4, seed=0) -> ExpertPlacement:
    """An EPLB map from a skewed random load: hot experts replicated, layers different."""
    g = torch.Generator().manual_seed(seed)
    load = torch.randint(0, 100, (layers, experts), generator=g) ** 2
    return rebalance(load, ep, ExpertPlacement.initial(layers, experts, ep, redundant).num_slots)


@pytest.mark.parametrize("ep,redundant", [(2, 0), (2, 2), (4, 0), (4, 4), (4, 12), (3, 1)])
def test_every_survivor_set_covers_every_expert_and_keeps_its_slots(ep, redundant):
    old = loaded_placement(ep=ep, redundant=redundant, seed=ep + redundant)
    E, S = old.num_experts, old.slots_per_rank
    for lost in range(ep):
        survivors = [r for r in range(ep) if r != lost][::-1]            # any order: survivor i becomes rank i
        new = survivor_placement(old, survivors)
        assert new.ep_size == len(survivors) and new.slots_per_rank == survivor_slots(E, len(survivors), S)
        assert bool((new.logcnt >= 1).all())                              # every expert of every layer is held
        for layer in range(old.num_layers):
            for i, r in enumerate(survivors):
                held, kept = old.experts_of_rank(layer, r), new.experts_of_rank(layer, i)
                changed = [s for s in range(S) if held[s] != kept[s]]
                # a slot changes only to take a lost expert, and only if it held a copy that also lives elsewhere
                lost_experts = set(range(E)) - {e for q in survivors for e in old.experts_of_rank(layer, q)}
                assert all(kept[s] in lost_experts for s in changed)
                assert len(changed) <= len(lost_experts)


def test_redundant_copies_cover_first_then_only_lost_experts_are_placed():
    # 8 experts, 4 ranks x 3 slots: [0 1 2] [3 4 5] [6 7 0] [1 2 3] -> rank 1 lost: 3 has a copy on rank 3
    old = ExpertPlacement.initial(1, 8, 4, 4)
    new = survivor_placement(old, [0, 2, 3])
    assert new.slots_per_rank == 3                                        # 9 slots hold 8 experts: no growth
    row = new.phy2log[0].tolist()
    assert sorted(set(row)) == list(range(8))
    assert row.count(3) == 1 and row[6:9][2] == 3                          # 3 stays where its copy was
    assert (set(row) - {0, 1, 2, 6, 7, 3}) == {4, 5}                      # only 4 and 5 are new, in evicted copies
    # no redundancy: a survivor must grow to hold all 8
    alone = survivor_placement(ExpertPlacement.initial(2, 8, 2, 0), [1])
    assert alone.slots_per_rank == 8 and alone.phy2log[0, :4].tolist() == [4, 5, 6, 7]


def test_survivor_placement_rejects_bad_survivor_lists():
    old = ExpertPlacement.initial(1, 8, 2, 0)
    for bad in ([], [0, 0], [2]):
        with pytest.raises(ValueError, match="survivors"):
            survivor_placement(old, bad)


def test_router_shrinks_with_the_group_and_grows_back_to_a_fresh_eplb_map():
    config = RouterConfig(num_layers=2, num_experts=8, ep_size=2, num_redundant=2, window_steps=100,
                          rebalance_interval_steps=0)
    router = ExpertRouter(config)
    load = torch.tensor([[50, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 90]])
    router.record(1, load)
    version, small = router.shrink([1])
    assert version == 1 and small.ep_size == 1 and small.slots_per_rank == 8
    assert router.rebalance().ep_size == 1                               # rebalances keep the smaller layout
    full = router.full_placement()
    assert router.placement()[0] == version                              # not adopted yet
    assert (full.ep_size, full.num_slots) == (2, 10)
    assert full.logcnt[0, 0] == 3 and full.logcnt[1, 7] == 3              # the hot experts got both spare slots
    version, adopted = router.adopt(full)
    assert version == 2 and adopted == full and router.stats()["window_records"] == 1


def test_request_book_continues_a_lost_ranks_requests_from_what_they_handed_out():
    book = RequestBook()
    for w in (0, 1):
        book.add_worker(w)
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    book.add("a", [1, 2], greedy, (7,), worker=1)                         # itself a continuation of one token
    book.add("b", [3], greedy, (), worker=0)
    book.add("c", [4], SamplingParams(n=2, max_tokens=5), (), worker=1)
    book.add("d", [5], SamplingParams(n=2, max_tokens=5), (), worker=1)
    book.add("e", [6], greedy, (), worker=1)
    assert book.aborted("e") == 1 and book.aborted("nope") is None          # its client left: not continued
    assert book.least_loaded([0, 1]) == 0
    out = lambda rid, ids, finished=False: TokenOutput(rid, 0, ids, [], 1, finished=finished)   # noqa: E731
    book.on_outputs([out("a", [8]), out("a", [9]), out("b", [4]), out("c", [1])])
    continuations, lost = book.take_lost({1})
    assert [(c.request_id, c.prompt, c.resume) for c in continuations] == [("a", [1, 2], (7, 8, 9)), ("d", [5], ())]
    assert lost == ["c"] and "b" in book and "a" not in book and 1 not in book.load
    book.on_outputs([out("b", [5], finished=True)])
    assert len(book) == 0 and book.load == {0: 0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("slots"), TinySpec(seed=3, experts=8, layers=1, hidden=64, heads=4,
                      kv_heads=2, head_dim=16, intermediate=64, top_k=2, vocab=300, sliding_window=16))


@pytest.mark.parametrize("packed", [False, True])
def test_refit_copies_local_experts_and_reads_only_missing_ones(tiny, packed):
    config, ckpt = ModelConfig.from_dir(tiny), Checkpoint(tiny)
    stats = EPStats(1, 8, "cpu")

    def make(rank, ep, placement):
        e = EPExperts(config, 0, rank, ep, placement, stats, torch.float32, packed=packed)
        e.load_from(ckpt, torch.float32)
        return e.requires_grad_(False)
    old = ExpertPlacement.initial(1, 8, 2, 0)                             # rank 1 holds 4 5 6 7
    experts = make(1, 2, old)
    new = survivor_placement(old, [1])                                     # alone: 4 5 6 7 + 0 1 2 3
    grown, loaded = refit(experts, new, 0, 1, ckpt, torch.float32, lambda: EPExperts(
        config, 0, 0, 1, new, stats, torch.float32, packed=packed))
    assert grown is not experts and grown.num_slots == 8 and loaded == 4   # 4 copied on the rank, 4 read
    want = make(0, 1, new)
    for k, t in want.state_dict().items():
        assert torch.equal(grown.state_dict()[k], t), k
    back = ExpertPlacement.from_phy2log(torch.tensor([[7, 6, 5, 4, 3, 2, 1, 0]]), 8, 1)   # same size: in place
    same, loaded = refit(grown, back, 0, 1, ckpt, torch.float32, lambda: None)
    assert same is grown and loaded == 0                                   # every expert already on the rank
    for k, t in make(0, 1, back).state_dict().items():
        assert torch.equal(same.state_dict()[k], t), k


def test_request_book_counts_requests_per_worker_as_they_come_and_go():
    book = RequestBook()
    for w in (0, 1, 2):
        book.add_worker(w)
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    for i, w in enumerate((0, 1, 1, 2, 2, 2)):
        book.add(f"r{i}", [i], greedy, (), worker=w)
    assert book.requests_on([0, 1, 2]) == {0: 1, 1: 2, 2: 3}
    book.add("r1", [9], greedy, (), worker=2)                               # booked again elsewhere: moves
    book.on_outputs([TokenOutput("r3", 0, [5], [], 1, finished=True)])      # finished: leaves
    book.release("r0")
    book.take_lost({2})                                                     # a lost worker's requests leave
    assert book.requests_on([0, 1, 2]) == {0: 0, 1: 1, 2: 0}
    assert book.load[1] == 1 + 4 and book.load[0] == 0

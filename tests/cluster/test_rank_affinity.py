"""RankAffinity: a replica places a request on the rank whose prefix cache holds its prompt's prefix."""
from cluster.rank_affinity import RankAffinity

B = 4


def test_a_prompt_goes_where_its_prefix_was_placed():
    affinity = RankAffinity(block_size=B)
    shared = list(range(100, 120))
    affinity.placed(1, shared + [1, 2, 3])
    assert affinity.choose(shared + [7, 8, 9, 10, 11], {0: 0, 1: 3}) == 1
    assert affinity.decisions["affinity"] == 1


def test_no_cached_prefix_or_an_overloaded_holder_means_no_preference():
    affinity = RankAffinity(block_size=B, load_bound=2)
    affinity.placed(0, list(range(20)))
    assert affinity.choose(list(range(50, 70)), {0: 0, 1: 0}) is None               # nothing cached anywhere
    assert affinity.choose(list(range(20)) + [99], {0: 3, 1: 0}) is None            # holder 3 above the least: load
    assert affinity.choose(list(range(20)) + [99], {0: 2, 1: 0}) == 0               # at the bound: still affine
    assert affinity.decisions == {"fallback": 1, "load": 1, "affinity": 1}


def test_the_longest_cached_prefix_wins_and_memory_is_bounded():
    affinity = RankAffinity(block_size=B, max_blocks=3)
    affinity.placed(0, list(range(9)))                  # blocks 0, 1 of this prompt
    affinity.placed(1, list(range(13)))                 # blocks 0, 1, 2
    assert affinity.choose(list(range(17)), {0: 0, 1: 0}) == 1
    affinity.placed(1, list(range(200, 217)))           # 4 new blocks: rank 1 forgets the older ones
    assert affinity.choose(list(range(17)), {0: 0, 1: 0}) == 0
    affinity.forget(0)
    assert affinity.choose(list(range(17)), {0: 0, 1: 0}) is None


def test_a_session_key_pins_its_worker_over_another_workers_cache():
    affinity = RankAffinity(block_size=B)
    prompt = list(range(30))
    owners = {affinity.choose(prompt, {0: 0, 1: 0}, session=f"user-{i}") for i in range(16)}
    assert owners == {0, 1}                                   # sessions spread over the workers
    for i in range(16):                                       # and each keeps its worker, cache or not
        owner = affinity.choose(prompt, {0: 0, 1: 0}, session=f"user-{i}")
        affinity.placed(1 - owner, prompt)
        assert affinity.choose(prompt, {0: 0, 1: 0}, session=f"user-{i}") == owner
    assert affinity.decisions["session"] == 48


def test_a_shared_preamble_alone_does_not_draw_new_conversations_to_one_rank():
    """Every chat prompt starts with the same system preamble; cached on the rank that served the first request, it
    must not pull every new conversation there (all would land on one rank until the load bound)."""
    affinity = RankAffinity(block_size=B)
    preamble = list(range(8))                               # 2 blocks shared by every prompt
    affinity.placed(0, preamble + list(range(100, 140)))
    new_conversation = preamble + list(range(500, 540))     # 8 of 48 tokens cached on rank 0: below the share
    assert affinity.choose(new_conversation, {0: 0, 1: 0}) is None
    next_turn = preamble + list(range(100, 140)) + [7, 7, 7, 7]
    assert affinity.choose(next_turn, {0: 1, 1: 0}) == 0       # its own history is most of it: affine
    assert affinity.decisions == {"fallback": 1, "affinity": 1}

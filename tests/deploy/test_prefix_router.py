"""Cache-aware routing, unit level: the scoring (cached tokens against a load bound, sessions, fallback), the
router's memory of recently routed prompts, and the session key a request carries."""
from types import SimpleNamespace

from deploy.prefix_router import RecentPrefixes, request_of, session_of
from deploy.openai.session_key import session_key
from engine.prefix_affinity import AFFINITY, FALLBACK, LOAD, SESSION, Candidate, choose, session_owner


def test_most_cached_tokens_wins_within_the_load_bound():
    got = choose([Candidate("a", 0, 0), Candidate("b", 640, 3), Candidate("c", 320, 0)], load_bound=8)
    assert (got.key, got.reason) == ("b", AFFINITY)


def test_an_overloaded_replica_loses_affinity():
    got = choose([Candidate("a", 0, 0), Candidate("b", 640, 9)], load_bound=8)
    assert (got.key, got.reason) == (None, LOAD)                 # nothing else cached: power of two, for load
    got = choose([Candidate("a", 64, 0), Candidate("b", 640, 9)], load_bound=8)
    assert (got.key, got.reason) == ("a", AFFINITY)              # the next best cached one within the bound
    got = choose([Candidate("a", 0, 0), Candidate("b", 640, 8)], load_bound=8)
    assert got.key == "b"                                        # at the bound: still affine


def test_nothing_cached_falls_back():
    assert choose([Candidate("a", 0, 0), Candidate("b", 0, 5)]) .reason == FALLBACK
    assert choose([]).key is None


def test_session_pins_and_respects_the_load_bound():
    keys = ["r1", "r2", "r3"]
    owner = session_owner("conv-7", keys)
    cands = [Candidate(k, 640 if k != owner else 0, 0) for k in keys]
    assert choose(cands, session="conv-7") .key == owner         # the session wins over another's cache
    assert choose(cands, session="conv-7").reason == SESSION
    busy = [Candidate(k, 0, 20 if k == owner else 0) for k in keys]
    assert choose(busy, session="conv-7").reason == LOAD
    assert {session_owner(f"s{i}", keys) for i in range(50)} == set(keys)      # sessions spread over replicas
    # rendezvous hashing: removing another replica never moves a session
    other = next(k for k in keys if k != owner)
    assert session_owner("conv-7", [k for k in keys if k != other]) == owner


def test_recent_prefixes_expire_and_are_capped():
    recent = RecentPrefixes(ttl_s=10, max_keys=3)
    recent.add("r", [1, 2, 3, 4], now=0)
    assert not recent.holds("r", 1, now=1) and recent.holds("r", 4, now=1)     # capped: the oldest went
    assert not recent.holds("r", 4, now=11) and not recent.holds("x", 4, now=1)
    recent.drop("r")
    assert not recent.holds("r", 4, now=1)


def test_session_key_prefers_prompt_cache_key_then_user():
    assert session_key(SimpleNamespace(model_extra={"prompt_cache_key": "k"}, user="u")) == "k"
    assert session_key(SimpleNamespace(model_extra={}, user="u")) == "u"
    assert session_key(SimpleNamespace(model_extra=None, user=None)) is None


def test_request_of_reads_generate_to_arguments():
    gen = SimpleNamespace(prompt_token_ids=[1, 2], routing_key="k")
    assert request_of(SimpleNamespace(args=[gen, ("h", 1, "x")])) is gen and session_of(gen) == "k"
    assert request_of(SimpleNamespace(args=[])) is None and request_of(None) is None


def test_the_cache_aware_router_is_selected_only_with_a_prefix_cache():
    from deploy.app_config import AppArgs
    from deploy.prefix_router import CacheAwareRouter, router_options
    assert router_options(AppArgs(enable_prefix_caching=False)) == {}          # Serve's power of two
    assert router_options(AppArgs(enable_prefix_caching=True, request_router="power_of_two")) == {}
    config = router_options(AppArgs(enable_prefix_caching=True))["request_router_config"]
    assert config.request_router_class in (CacheAwareRouter, f"{CacheAwareRouter.__module__}.CacheAwareRouter")


def test_routing_load_bound_reaches_the_router(capsys):
    from deploy.app_config import AppArgs
    from deploy.cli import build_parser, main
    from deploy.prefix_router import router_options
    from deploy.server import app_args
    kwargs = lambda args: router_options(args)["request_router_config"].request_router_kwargs   # noqa: E731
    assert kwargs(AppArgs(enable_prefix_caching=True))["load_bound"] == 8
    assert kwargs(AppArgs(enable_prefix_caching=True))["block_size"] == 16      # affinity before any cache report
    ns = build_parser().parse_args(["serve", "--enable-prefix-caching", "--routing-load-bound", "2.5"])
    assert kwargs(app_args(ns))["load_bound"] == 2.5
    assert main(["serve", "--routing-load-bound", "-1"]) == 2                   # refused before Ray starts
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "routing_load_bound" in err, err


def test_a_request_routed_again_counts_one_decision():
    """Serve calls choose_replicas again while no chosen replica accepts a request: one decision is counted."""
    from collections import OrderedDict

    from deploy.prefix_router import CacheAwareRouter
    seen = []
    router = SimpleNamespace(_counted=OrderedDict(), _metrics=SimpleNamespace(on_decision=lambda *a: seen.append(a)))
    pending = [SimpleNamespace(metadata=SimpleNamespace(internal_request_id=i)) for i in ("r1", "r2")]
    for p in (pending[0], pending[0], pending[1], pending[0]):
        CacheAwareRouter._count(router, p, "affinity", 64)
    CacheAwareRouter._count(router, None, "fallback", 0)
    assert seen == [("affinity", 64), ("affinity", 64), ("fallback", 0)]

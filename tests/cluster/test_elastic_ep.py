"""Elastic expert parallelism across Ray actors (ep 2): a rank SIGKILLed or SIGSTOPped mid-generation costs no
request: the survivor regroups alone (loading the experts it lacks), continues the lost rank's requests from their
prompt plus the tokens already handed out, every request ends with exactly the tokens of an undisturbed run (greedy
and seeded sampling), a replacement brings the group back to 2 ranks while requests run, and the metrics count it."""
import os
import signal
import time

import pytest
import torch

from cluster.ep_group import EPConfig, EPGroup
from engine.engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from model.loader import load_model
from model.tiny import TinySpec, write_tiny
from monitoring.recorders import ExpertMetrics

ENGINE = EngineConfig(max_num_seqs=16, max_num_batched_tokens=64, block_size=4, max_model_len=512)
PARAMS = ([SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)] * 4
          + [SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_tokens=300, ignore_eos=True) for s in range(4)])


class Records:
    """A metrics sink that keeps (name, value) in memory."""

    def __init__(self):
        self.records = []

    def record(self, spec, value, tags):
        self.records.append((spec.name, value))

    def total(self, name):
        return sum(v for n, v in self.records if n == name)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("elastic"), TinySpec(
        seed=31, experts=8, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=64, top_k=2,
        vocab=1024, sliding_window=16))


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (3, 17, 40, 9, 64, 1, 25, 33)]


def pid_of(group: EPGroup, rank: int) -> int:
    return group.actors.process_of[group.members[rank]][1]


def run_with_a_lost_rank(group: EPGroup, prompts, rank: int, sig: int):
    """Generate twice: undisturbed, then with `rank` signalled once the group passed 20 steps. Returns (reference,
    disturbed tokens, per request the epochs it produced tokens in during the disturbed run)."""
    reference = [o[0].output_token_ids for o in group.generate(prompts, PARAMS)]
    start, fired, epochs = group.num_steps, [], {}

    def hook(g, results):
        for r in results:
            for o in r.outputs:
                if o.new_token_ids:
                    epochs.setdefault(o.request_id, set()).add(r.epoch)
        if not fired and g.num_steps >= start + 20:
            fired.append(pid_of(g, rank))
            os.kill(fired[0], sig)
    try:
        got = [o[0].output_token_ids for o in group.generate(prompts, PARAMS, on_results=hook)]
    finally:
        if fired and sig == signal.SIGSTOP:
            with pytest.raises(ProcessLookupError):       # it was killed as stuck, not left stopped
                os.kill(fired[0], signal.SIGCONT)
    return reference, got, epochs


def wait_for_ranks(group: EPGroup, n: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while len(group.members) != n and time.monotonic() < deadline:
        group.results(timeout_s=0.5)
    assert len(group.members) == n, f"{len(group.members)} ranks, wanted {n}"


@pytest.mark.parametrize("ep,redundant,rank,sig", [(2, 2, 1, signal.SIGKILL), (2, 0, 0, signal.SIGKILL),
                                                   (2, 0, 1, signal.SIGSTOP), (4, 0, 1, signal.SIGKILL)],
                         ids=["kill-redundant", "kill-rank0", "stop", "kill-ep4"])
def test_lost_rank_mid_generation_changes_no_token_and_the_group_gets_back_to_full_size(
        ray_cluster, checkpoint, prompts, ep, redundant, rank, sig):
    """ep 4: the survivors that were not talking to the dead rank when it died learn of it from the others, who drop
    their group at once (no survivor waits out the collective timeout)."""
    config = EPConfig(ep_size=ep, redundant_experts=redundant, collective_timeout_s=60, probe_timeout_s=3,
                      rebalance_interval_steps=0)
    group = EPGroup(str(checkpoint), config, ENGINE)
    records = Records()
    group.metrics = ExpertMetrics("m", replica="r", sink=records)
    try:
        lost_pid = pid_of(group, rank)
        reference, got, epochs = run_with_a_lost_rank(group, prompts, rank, sig)
        assert got == reference                                   # greedy and seeded: token-exact, none failed
        assert all(len(t) == 300 for t in got)
        assert any(len(e) > 1 for e in epochs.values())           # requests ran on across the regroup(s)
        wait_for_ranks(group, ep)
        assert lost_pid not in {pid_of(group, r) for r in range(ep)}
        again = [o[0].output_token_ids for o in group.generate(prompts, PARAMS)]
        assert again == reference                                 # the re-formed full-size group is exact too
        slots = ray_cluster.get([w.slot_experts.remote() for w in group.workers])
        assert all(sorted({e for r in slots for e in r[layer]}) == list(range(8)) for layer in range(2))
    finally:
        group.shutdown()
    assert records.total("epserve_ep_ranks_lost") == 1 and records.total("epserve_ep_recoveries") == 1
    assert records.total("epserve_requests_migrated") >= 1
    assert [v for n, v in records.records if n == "epserve_ep_missing_ranks"] == [1, 0]
    seconds = [v for n, v in records.records if n == "epserve_ep_recovery_seconds"]
    assert len(seconds) == 1 and 0 < seconds[0] < 30         # far below the collective timeout (60 s)


def test_requests_run_on_across_the_rejoin(ray_cluster, checkpoint, prompts):
    """A steady stream of greedy requests, every fifth aborted by its client midway, while rank 1 is killed and its
    replacement joins: every other request (those continued from the lost rank too) gets the plain engine's tokens,
    some produced tokens both before and after the replacement joined (they kept their KV through the rejoin), an
    aborted one never gets a token it should not have, and no rank holds a KV block at the end."""
    greedy = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    local = [o[0].output_token_ids for o in LLMEngine(load_model(checkpoint), ENGINE).generate(prompts, greedy)]
    group = EPGroup(str(checkpoint), EPConfig(ep_size=2, collective_timeout_s=30, rebalance_interval_steps=0), ENGINE)
    tokens, epochs, finished, prompt_of, aborted = {}, {}, set(), {}, set()
    added, killed = 0, False

    def add(n):
        nonlocal added
        for _ in range(n):
            rid = f"r{added}"
            prompt_of[rid] = added % len(prompts)
            group.add_request(rid, prompts[prompt_of[rid]], greedy)
            added += 1
    try:
        add(8)
        deadline = time.monotonic() + 180
        while len(finished | aborted) < added and time.monotonic() < deadline:
            for r in group.results(timeout_s=1):
                for o in r.outputs:
                    tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
                    if o.new_token_ids:
                        epochs.setdefault(o.request_id, set()).add(r.epoch)
                    if o.finished:
                        finished.add(o.request_id)
            for rid in tokens.keys() - finished - aborted:
                if int(rid[1:]) % 5 == 4 and len(tokens[rid]) >= 10:
                    group.abort(rid)                          # the client left
                    aborted.add(rid)
            if not killed and group.num_steps >= 20:
                os.kill(pid_of(group, 1), signal.SIGKILL)
                killed = True
            elif group.epoch == 1 and added - len(finished | aborted) < 12:
                add(1)                                       # keep requests in flight until the replacement joins
        assert group.epoch == 2 and len(group.members) == 2
        time.sleep(1)                                        # the last aborts reach their ranks
        blocks = [sum(s["blocks_used"].values()) for s in group.rank_stats()]
    finally:
        group.shutdown()
    assert aborted and len(finished | aborted) == added
    assert all(tokens[rid] == local[prompt_of[rid]] for rid in finished - aborted)
    assert all(tokens.get(rid, []) == local[prompt_of[rid]][:len(tokens.get(rid, []))] for rid in aborted)
    assert any({1, 2} <= e for e in epochs.values())
    assert blocks == [0, 0]

"""`epserve bench chaos` on fakes: SSE records with continuous usage, per-event windows (failed, changed, longest
token gap), the tokens/s timeline, the PNG, process states of a real stopped child, and flag errors (exit 2)."""
import json
import signal
import subprocess
import sys
import time

import pytest

from bench.chaos import ChaosConfig
from bench.chaos_events import full_size, process_state
from bench.chaos_load import RequestRecord, _feed
from bench.chaos_report import BIN_S, EventRecord, summarize, tokens_between, tokens_per_s, window_stats, write_plot


def record(body, start, chunks, text="ab", error=None):
    r = RequestRecord(body, start, list(chunks), text, end=chunks[-1][0] if chunks else start, error=error,
                      done=error is None)
    return r


def test_sse_lines_become_chunks_with_token_counts():
    r = RequestRecord(0, 1.0)
    usage = lambda n: {"usage": {"prompt_tokens": 3, "completion_tokens": n}}       # noqa: E731
    for now, chunk in [(1.5, {"choices": [{"text": "He"}], **usage(2)}), (1.6, {"choices": [], **usage(2)}),
                       (2.0, {"choices": [{"text": "llo"}], **usage(3)})]:
        _feed(r, "data: " + json.dumps(chunk), now)
    _feed(r, "data: [DONE]", 2.1)
    assert r.ok and r.text == "Hello" and r.chunks == [(1.5, 2), (2.0, 3)] and r.num_tokens == 3
    assert r.gaps() == [(1.5, 0.5), (2.0, 0.5)]
    failed = RequestRecord(0, 0.0)
    _feed(failed, 'data: {"error": {"message": "No healthy model replica"}}', 1.0)
    assert not failed.ok and failed.error == "No healthy model replica"


def test_window_stats_attribute_failures_changes_and_gaps_to_the_event():
    reference = [record(0, 0.0, [(1.0, 4)], "abcd"), record(1, 0.0, [(1.0, 4)], "wxyz")]
    records = [record(0, 0.0, [(1.0, 2), (2.0, 4)], "abcd"),                      # steady, unchanged
               record(1, 1.5, [(2.5, 2), (9.0, 4)], "wxyQ"),                     # spans the event: 6.5 s gap, changed
               record(0, 3.0, [(4.0, 1)], "a", error="HTTP 503"),                # failed after the event
               record(1, 5.0, [(6.0, 4)], "wxyz")]
    stats = window_stats(records, reference, 4.0, 20.0)
    assert stats["failed"] == 1 and stats["changed"] == 1 and stats["requests_ended"] == 3
    assert stats["longest_gap_s"] == 6.5 and stats["in_flight_at_start"] == 2
    assert stats["errors"] == ["HTTP 503"]
    assert tokens_between(records, 0.0, 3.0) == 2 + 2 + 2 and tokens_between(records, 0.0, 20.0) == 4 + 4 + 1 + 4
    bins = tokens_per_s(records, 10.0)
    assert sum(bins) * BIN_S == 13


def test_summary_and_plot(tmp_path):
    reference = [record(0, 0.0, [(1.0, 4)], "abcd")]
    records = [record(0, 0.0, [(1.0, 2), (2.0, 4)], "abcd"), record(0, 2.0, [(3.0, 4), (8.0, 4)], "abcd"),
               record(0, 8.0, [(9.0, 1)], "a", error="boom")]
    events = [EventRecord("rank_kill", 11, 4.0, 3.0), EventRecord("replica_kill", 12, 8.5, None, bench_killed=False)]
    config = ChaosConfig(streams=1, max_tokens=4)
    summary = summarize(config, reference, records, events, 0.0, 10.0)
    assert summary["requests"] == 3 and summary["failed"] == 1 and summary["changed"] == 0
    assert [e["event"] for e in summary["events"]] == ["rank_kill", "replica_kill"]
    assert summary["events"][0]["full_size_s"] == 3.0 and summary["events"][1]["full_size_s"] is None
    assert summary["events"][1]["failed"] == 1 and summary["steady"]["tok_s"] == pytest.approx((4 + 4) / 4.0)
    json.dumps(summary)
    path = write_plot(records, events, summary, tmp_path / "chaos.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_process_state_of_a_stopped_then_killed_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_state(child.pid) in ("S", "R")
        child.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while process_state(child.pid) not in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_state(child.pid) in ("T", "t")
    finally:
        child.kill()
        child.wait()
    assert process_state(child.pid) is None


@pytest.mark.parametrize("flags, message", [(["--events", "rank_kill,meteor"], "--events takes"),
                                            (["--streams", "0"], "--streams must be at least 1")])
def test_bad_flags_exit_2_with_one_line(flags, message):
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "bench", "chaos", *flags, "--out", "/nonexistent/x"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_full_size_needs_every_process_running_and_past_its_start():
    titles = {1: "ray::ServeReplica:epserve:ModelServer", 2: "ray::EPWorker.results", 3: "ray::EPWorker",
              4: "ray::ServeReplica:epserve:ModelServer.handle_request", 5: "ray::EPWorker", 6: "ray::EPWorker.ping",
              7: "ray::ServeController", 8: "raylet"}
    running = dict.fromkeys(titles, "S")
    assert full_size(titles, running, replicas=2, ep_size=2)
    assert not full_size(titles, running, replicas=2, ep_size=3)
    assert not full_size(titles, {**running, 5: "T"}, replicas=2, ep_size=2)          # a stopped rank
    assert not full_size(titles, {**running, 5: None}, replicas=2, ep_size=2)         # a dead one
    assert not full_size({**titles, 6: "ray::EPWorker.setup"}, running, replicas=2, ep_size=2)    # still joining
    assert not full_size({**titles, 4: "ray::ServeReplica:epserve:ModelServer.initialize_and_get_metadata"},
                         running, replicas=2, ep_size=2)

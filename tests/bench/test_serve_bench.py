"""`epserve bench serve`: SSE timing, CPU accounting by process role and the report's math, on fakes; then one
small live run against a real `epserve serve` subprocess (8 x 16 tokens, ep 1) that must leave nothing running."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import serve_bench
from bench.process_cpu import GROUPS, ProcessSample, classify, cpu_delta, parse_stat, per_1k_tokens, snapshot
from bench.serve_bench import ServeBenchConfig
from bench.serve_report import outputs_match, ratio, rounded, summarize
from bench.stream_client import StreamResult, chunk_text, feed_line

ROOT = Path(__file__).resolve().parents[2]


def _data(obj) -> str:
    return "data: " + json.dumps(obj)


def _completion(text, finish=None):
    return _data({"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]})


# ---- SSE ----
def test_completion_stream_times_content_chunks_and_takes_tokens_from_usage():
    r = StreamResult()
    lines = [(1.5, _completion("He")), (1.5, ""), (1.75, _completion("")), (2.0, _completion("llo")),
             (2.5, _completion(" world", "length")),
             (2.6, _data({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})),
             (3.0, "data: [DONE]"), (9.0, _completion("after done"))]
    for now, line in lines:
        feed_line(r, line, start=1.0, now=now)
    assert r.ok and r.text == "Hello world" and r.finish_reason == "length"
    assert r.ttft == pytest.approx(0.5) and r.itls == pytest.approx([0.5, 0.5])   # the empty chunk is no token
    assert r.num_chunks == 3 and r.num_tokens == 4                                 # usage wins over chunks
    assert r.e2e == pytest.approx(2.0) and r.tpot == pytest.approx((2.0 - 0.5) / 3)


def test_chat_stream_counts_reasoning_and_content_but_not_the_role_chunk():
    r = StreamResult()
    chunks = [{"delta": {"role": "assistant", "content": ""}}, {"delta": {"reasoning_content": "think"}},
              {"delta": {"content": "5"}}]
    for i, choice in enumerate(chunks):
        feed_line(r, _data({"choices": [dict(choice, index=0)]}), start=0.0, now=1.0 + i)
    feed_line(r, "data: [DONE]", start=0.0, now=4.0)
    assert r.text == "think5" and r.ttft == 2.0 and r.itls == [1.0]
    assert r.num_tokens == 2                                   # no usage chunk: content chunks are counted
    assert chunk_text({"choices": [{"delta": {"tool_calls": []}}]}) == ""


def test_error_chunk_and_missing_done_are_failures():
    r = StreamResult()
    feed_line(r, _data({"error": {"message": "rank 1 died", "type": "internal"}}), 0.0, 1.0)
    feed_line(r, "data: [DONE]", 0.0, 2.0)
    assert not r.ok and r.error == "rank 1 died"
    assert not StreamResult(text="x").ok


# ---- process CPU ----
@pytest.mark.parametrize("title, group", [
    ("ray::ProxyActor", "proxy"),
    ("ray::ServeReplica:epserve:Gateway", "gateway"),
    ("ray::SERVE_REPLICA::epserve#ModelServer#xd8:ServeReplica:epserve:ModelServer.__init__", "replica"),
    ("ray::ServeReplica:epserve:ModelServer", "replica"),
    ("ray::EPWorker", "ranks"), ("ray::EPWorker.step", "ranks"),
    ("ray::ExpertRouter", "ray"), ("ray::ServeController", "ray"), ("ray::DashboardAgent", "ray"),
    ("/venv/lib/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", "ray"),
    ("python -m deploy.cli serve /models/Gateway-EPWorker --port 1", "ray"),    # role words outside a ray:: title
])
def test_classify_process_titles(title, group):
    assert classify(title) == group


def test_parse_stat_survives_spaces_and_parentheses_in_the_command_name():
    fields = ["S", "1", "2", "4242"] + ["0"] * 7 + ["250", "150"] + ["0"] * 6 + ["777", "0"]
    session, start, cpu = parse_stat("123 (ray::a b) (c)) " + " ".join(fields))
    assert (session, start) == (4242, 777)
    assert cpu == pytest.approx(400 / __import__("os").sysconf("SC_CLK_TCK"))


def test_snapshot_reads_only_the_session_and_skips_zombies(tmp_path):
    def proc(pid, session, state, utime, title):
        d = tmp_path / str(pid)
        d.mkdir()
        rest = [state, "1", str(session), str(session)] + ["0"] * 7 + [str(utime), "0"] + ["0"] * 6 + ["5"]
        (d / "stat").write_text(f"{pid} (x) " + " ".join(rest))
        (d / "cmdline").write_bytes(title.encode() + b"\0--flag\0")
    proc(10, 10, "S", 100, "python serve")
    proc(11, 10, "R", 50, "ray::EPWorker")
    proc(12, 10, "Z", 50, "dead")
    proc(13, 99, "S", 50, "someone else")
    (tmp_path / "self").mkdir()
    snap = snapshot(10, proc=tmp_path)
    assert sorted(snap) == [10, 11] and snap[10].title == "python serve --flag"


def test_cpu_delta_counts_new_processes_from_zero_and_reports_the_vanished():
    before = {1: ProcessSample(1, 100, 10.0, "ray::ProxyActor"), 2: ProcessSample(2, 100, 5.0, "ray::EPWorker"),
              3: ProcessSample(3, 100, 1.0, "raylet"), 4: ProcessSample(4, 100, 9.0, "ray::IDLE")}
    after = {1: ProcessSample(1, 100, 12.5, "ray::ProxyActor"), 2: ProcessSample(2, 100, 9.0, "ray::EPWorker.step"),
             3: ProcessSample(3, 200, 0.5, "raylet"),                  # pid reused: a new process
             5: ProcessSample(5, 300, 0.25, "ray::ServeReplica:epserve:Gateway")}
    d = cpu_delta(before, after)
    assert d.by_group == pytest.approx({"proxy": 2.5, "gateway": 0.25, "replica": 0.0, "ranks": 4.0, "ray": 0.5})
    assert d.total == pytest.approx(7.25) and d.vanished == [3, 4]
    assert [row[0] for row in d.by_process] == [2, 1, 3, 5]
    assert per_1k_tokens(7.25, 2900) == pytest.approx(2.5) and per_1k_tokens(1.0, 0) is None


# ---- report ----
def test_ratios_rounding_and_output_match():
    assert ratio(1.0, 4.0) == 0.25 and ratio(1.0, 0.0) is None and ratio(None, 2.0) is None
    assert rounded({"a": [1.23456789, 2], "b": 0.000123456}) == {"a": [1.235, 2], "b": 0.0001235}
    ok = [StreamResult(text="ab", done=True), StreamResult(text="c", done=True)]
    assert outputs_match(["ab", "c"], ok)
    assert not outputs_match(["ab", "x"], ok) and not outputs_match(["ab"], ok)
    assert not outputs_match(["ab", "c"], [ok[0], StreamResult(text="c", done=True, error="HTTP 500")])


def test_summary_throughput_ratio_and_cpu_per_token():
    results = [StreamResult(text="x", num_tokens=500, ttft=t, e2e=2.0, done=True, itls=[0.01, 0.03])
               for t in (0.1, 0.3)] + [StreamResult(error="HTTP 503")]
    before = {1: ProcessSample(1, 1, 0.0, "ray::ServeReplica:epserve:Gateway")}
    after = {1: ProcessSample(1, 1, 3.0, "ray::ServeReplica:epserve:Gateway"), 2: ProcessSample(2, 2, 1.0, "gcs")}
    phase = {"results": results, "wall_s": 2.0, "cpu": cpu_delta(before, after), "client_cpu_s": 0.5}
    in_proc = {"tokens": 1000, "wall_s": 0.5, "cpu_s": 1.0}
    s = summarize(ServeBenchConfig(), in_proc, {"completions": phase}, True)
    assert s["throughput_tok_s"] == {"in_process": 2000.0, "completions": 500.0}
    assert s["served_over_in_process"]["completions"] == 0.25
    assert s["cpu_s_per_1k_tokens"]["in_process"] == 1.0
    cpu = s["cpu_s_per_1k_tokens"]["completions"]
    assert cpu["gateway"] == 3.0 and cpu["ray"] == 1.0 and cpu["server_total"] == 4.0 and set(GROUPS) <= set(cpu)
    assert s["server_cpu_over_in_process"]["completions"] == 4.0
    assert s["ttft_s"]["completions"] == {"p50": 0.2, "p95": 0.29}
    assert s["paths"]["completions"]["failed"] == 1 and s["paths"]["completions"]["errors"] == ["HTTP 503"]


def test_tok_s_counts_completed_streams_only():
    http = {"results": [StreamResult(num_tokens=30, done=True), StreamResult(num_tokens=99, error="x")], "wall_s": 3.0}
    assert serve_bench.tok_s(http) == 10.0 and serve_bench.tok_s({"tokens": 50, "wall_s": 0.5}) == 100.0


# ---- config and CLI ----
def test_config_validates_and_passes_gateway_replicas_only_when_given():
    assert ServeBenchConfig(ep_size=2).serve_args() == ["--ep-size", "2", "--replicas", "1"]
    args = ServeBenchConfig(model="/m", gateway_replicas=2, max_num_seqs=32, extra_serve_args=("--x=1",)).serve_args()
    assert args == ["/m", "--ep-size", "1", "--replicas", "1", "--gateway-replicas", "2", "--max-num-seqs", "32",
                    "--x=1"]
    with pytest.raises(ValueError, match="--max-tokens"):
        ServeBenchConfig(max_tokens=0)


def test_cli_quick_sizes_unless_overridden(monkeypatch):
    from deploy.cli import build_parser
    seen = []
    monkeypatch.setattr(serve_bench, "run_bench", lambda config: seen.append(config) or {})
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)
    for argv in (["bench", "serve", "--quick"], ["bench", "serve", "--quick", "--requests", "4"],
                 ["bench", "serve", "--ep-size", "2", "--serve-arg=--num-cpus=4"]):
        serve_bench.run(build_parser().parse_args(argv))
    assert [(c.requests, c.max_tokens, c.repeats) for c in seen] == [(16, 64, 1), (4, 64, 1), (64, 256, 3)]
    assert seen[2].ep_size == 2 and seen[2].extra_serve_args == ("--num-cpus=4",) and seen[2].model == "demo"
    assert isinstance(build_parser().parse_args(["bench", "serve"]), argparse.Namespace)


# ---- live ----
def test_live_run_against_epserve_serve(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "deploy.cli", "bench", "serve", "--quick", "--requests", "8",
                           "--max-tokens", "16", "--ep-size", "1", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(v > 0 for v in s["throughput_tok_s"].values()) and set(s["throughput_tok_s"]) == {
        "in_process", "completions", "chat"}
    assert s["outputs_match"] is True and s["tokens"] == {"in_process": 128, "completions": 128, "chat": 128}
    for path in ("completions", "chat"):
        cpu = s["cpu_s_per_1k_tokens"][path]
        assert set(GROUPS) <= set(cpu) and cpu["server_total"] > 0 and cpu["ranks"] > 0
        assert s["ttft_s"][path]["p50"] > 0
    assert s["server"]["num_killed"] == 0 and snapshot(s["server"]["pid"]) == {}
    assert {k: len(v) for k, v in s["runs_tok_s"].items()} == {"in_process": 1, "completions": 1, "chat": 1}
    assert (tmp_path / "serve_bench.png").stat().st_size > 0

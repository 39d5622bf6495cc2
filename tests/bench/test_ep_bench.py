"""Smoke test of `epserve bench ep --quick` through the CLI: a table, then the JSON line whose counts are measured
(the new path: two collectives per MoE layer, no host read-back in the forward, one step agreement; the old path:
four collectives and read-backs every layer), with positive step times for both paths. No timing thresholds."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_ep_quick_counts_both_paths():
    proc = subprocess.run([sys.executable, "-m", "deploy.cli", "bench", "ep", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *table, line = proc.stdout.strip().splitlines()
    report = json.loads(line)
    assert table[0].split()[:3] == ["batch", "path", "ep1"] and "lower" in table[-1]
    assert report["ep_decode"] == {"collectives_per_moe_layer": 2, "host_syncs_per_step": 0}
    assert [row["batch"] for row in report["results"]] == [1, 16, 64]
    for row in report["results"]:
        new, old = row["fixed"], row["variable"]
        assert new["collectives_per_moe_layer"] == 2 and new["step_agreements_per_step"] == 1
        assert old["collectives_per_moe_layer"] == 4 and old["host_syncs_per_step"] >= 2 * report["model"]["layers"]
        assert row["ep1_step_ms"] > 0 and new["ep2_step_ms"] > 0 and old["ep2_step_ms"] > 0
        assert new["comm_ms_per_step"] > 0 and old["comm_ms_per_step"] > 0
    target = report["target"]
    assert target["reduction"] == round(1 - target["fixed_ep2_over_ep1"] / target["variable_ep2_over_ep1"], 3)

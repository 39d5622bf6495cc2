"""Smoke test of `python bench/host_overhead.py --quick`: one JSON line, every number positive. No thresholds."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_prints_positive_numbers():
    proc = subprocess.run([sys.executable, "bench/host_overhead.py", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["fill_ms_64x2048"] > 0
    assert set(result["host_ms"]) == {"1", "4"} and all(v > 0 for v in result["host_ms"].values())
    for row in result["decode_tok_s"].values():
        assert row["static"] > 0 and row["paged"] > 0 and row["static_over_paged"] > 0

"""`python bench/ep_graph_check.py --device cpu` (the GPU script's CPU run: the static decode path a graph captures,
run eagerly): it passes its own checks, runs the EP path with two collectives a layer, and imports neither Ray nor
DeepSpeed (the device machine has neither). No timing thresholds."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = """
import json, runpy, sys
sys.argv = ["bench/ep_graph_check.py", "--device", "cpu", "--out", sys.argv[1]]
try:
    runpy.run_path("bench/ep_graph_check.py", run_name="__main__")
except SystemExit as e:
    code = e.code
print(json.dumps({"exit": code, "ray": "ray" in sys.modules, "deepspeed": "deepspeed" in sys.modules}))
"""


def test_cpu_run_passes_its_checks_without_ray_or_deepspeed(tmp_path):
    out = tmp_path / "ep_graph_check.json"
    proc = subprocess.run([sys.executable, "-c", RUN, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *printed, imports = proc.stdout.strip().splitlines()
    result = json.loads(printed[-1])
    assert json.loads(imports) == {"exit": 0, "ray": False, "deepspeed": False}
    assert result == json.loads(out.read_text())
    assert result["ok"] and result["tokens_equal"] and result["dispatch"] == "fixed"
    assert result["backend"] == "gloo" and result["captured"] is False              # CPU: the path, not the capture
    assert result["replayed_decode_steps"] == result["decode_steps"] > 0
    assert result["collectives_per_moe_layer"] == 2 and result["max_abs_logit_diff"] < 1e-4
    assert set(result["decode_ms"]) == {"1", "8", "32"}
    assert all(row["graphs"] > 0 and row["eager"] > 0 for row in result["decode_ms"].values())

"""Smoke test of `python bench/gpu_check.py --device cpu --tiny` (what CI runs): the JSON has every key with positive
numbers, transformers produced the same greedy tokens on the same weights, the PNG exists. No timing thresholds.
Plus the roofline arithmetic at the real shapes against DESIGN.md's performance model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from model import tiny
from model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "summary.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    return printed


def test_summary_keys_and_positive_numbers(result):
    assert result["tiny"] is True and result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["bandwidth_gb_s"] > 0 and result["wall_s"] > 0
    assert Path(result["plot"]).stat().st_size > 1000
    model = result["models"]["tiny"]
    assert model["packed_expert_bytes"] > 0 and model["weight_bytes"] > model["packed_expert_bytes"]
    assert set(model["decode"]) == {"1", "8", "64"}
    for row in model["decode"].values():
        assert row["tok_s"] > 0 and row["speedup_vs_transformers"] > 0
    roof = model["roofline_batch1"]
    assert roof["bytes_per_token_mb"] > 0 and roof["roofline_tok_s"] > 0 and 0 < roof["fraction"]
    assert model["ttft_s"] > 0


def test_transformers_baseline_ran_on_the_same_weights(result):
    hf = result["models"]["tiny"]["transformers"]
    assert "skipped" not in hf and hf["ttft_s"] > 0
    for row in hf["decode"].values():
        assert row["tok_s"] > 0
        assert row["greedy_match"] == 1.0                 # fp32, same weights: the same greedy tokens


@pytest.mark.parametrize("spec, gb", [(gpu_check.REAL_20B, 3.7), (gpu_check.REAL_120B, 5.0)])
def test_bytes_per_token_at_real_shapes_match_the_performance_model(spec, gb):
    """DESIGN.md: batch-1 decode reads ~3.7 GB per token for 20b, ~5.0 GB for 120b (experts packed, rest bf16)."""
    cfg = ModelConfig.from_hf_dict(tiny.hf_config(spec, None))
    roof = gpu_check.roofline_packed(cfg, torch.bfloat16, range(128, 160), 100.0, 3.35e12)
    assert abs(roof["bytes_per_token_mb"] / 1e3 - gb) < 0.15
    assert roof["roofline_tok_s"] == pytest.approx(3.35e12 / (roof["bytes_per_token_mb"] * 1e6), rel=1e-3)


def test_fast_path_checks_ran_in_the_interpreter(result):
    """tests/conftest.py sets TRITON_INTERPRET=1 without a GPU, so the script's kernel checks run on CPU: each kernel
    agrees with its torch reference at fp32 precision."""
    checks = result["models"]["tiny"]["checks"]
    errors = [*checks["packed_experts"].values(), *checks["decode_attention"].values(),
              *checks["prefill_attention"].values()]
    assert len(errors) == 6
    assert all(0 <= e < 1e-5 for e in errors), checks

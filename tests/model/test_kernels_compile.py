"""Every Triton kernel compiles for Hopper (sm_90) in the configurations CUDA inputs select, on this GPU-less
machine (Triton bundles ptxas): the interpreter tests check what the kernels compute, this what the compiler
accepts. Runs tests/model/kernels_for_hopper.py in a process without TRITON_INTERPRET."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.mxfp4_kernel import KERNEL_AVAILABLE

SCRIPT = Path(__file__).with_name("kernels_for_hopper.py")


@pytest.mark.skipif(not KERNEL_AVAILABLE, reason="triton is not installed")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(Path(os.environ.get("TMPDIR", "/tmp")) / "epserve-triton-aot-cache")
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "compiled 12 kernel variants for sm_90", proc.stdout
    for name in ("_decode_kernel", "_combine_kernel", "_prefill_kernel", "_grouped_kernel", "_scaled_kernel"):
        assert any(line.startswith(f"{name} sm_90 cubin") for line in lines), name
    assert "'DOT_FP32': False" in proc.stdout and "DOT_DTYPE': triton.language.bfloat16" in proc.stdout

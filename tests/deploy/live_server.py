"""A live `epserve serve` in a subprocess (its own Ray cluster, its own session), as a user starts it: the
benchmark's ServeProcess (bench/serve_process.py: ready once a first completion streams, stopped with SIGINT to its
main pid, leftovers killed pid by pid, its log's end in any failure), plus what tests ask of a running server."""
import contextlib
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.process_cpu import snapshot
from bench.serve_process import ServeProcess


@contextlib.contextmanager
def live_server(*args: str, timeout_s: float = 240, log: Path | None = None):
    """Yield (base URL, Popen) of `epserve serve ARGS` on a free loopback port once it serves."""
    with tempfile.TemporaryDirectory() as tmp:
        with ServeProcess(list(args), log or Path(tmp) / "serve.log", ready_timeout_s=timeout_s) as server:
            yield server.url, server.proc


def wait_serving(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait until a server started some other way (`serve run`) answers /health with 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before serving")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not serving after {timeout_s:.0f}s")


def session_pids(proc: subprocess.Popen, title: str) -> list[int]:
    """Pids in the server's session whose process title contains `title` (e.g. "ray::EPWorker")."""
    return [pid for pid, sample in snapshot(proc.pid).items() if title in sample.title]

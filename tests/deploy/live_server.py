"""A live `epserve serve` in a subprocess (its own Ray cluster, its own session), as a user starts it; stopped with
SIGINT to its main pid (TOOLING.md: it exits cleanly in ~7 s), then anything left in its session is killed."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

EPSERVE = str(Path(sys.executable).with_name("epserve"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(*args: str, timeout_s: float = 240, log: Path | None = None):
    """Yield (base URL, Popen) of `epserve serve ARGS --port P` once /health answers 200 (a ModelServer replica
    runs). Its output goes to `log` (default: a temporary file); a server that dies before serving shows its end."""
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    out = open(log, "w+") if log else tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([EPSERVE, "serve", *args, "--port", str(port)], env=env, start_new_session=True,
                            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_serving(url, proc, timeout_s)
        except (RuntimeError, TimeoutError) as e:
            out.seek(0)
            raise RuntimeError(f"{e}; its output ends with:\n{out.read()[-3000:]}") from None
        yield url, proc
    finally:
        stop(proc)
        out.close()


def wait_serving(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"epserve serve exited with code {proc.returncode} before serving")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not serving after {timeout_s:.0f}s")


def session_pids(proc: subprocess.Popen, title: str) -> list[int]:
    """Pids in the server's session whose command line contains `title` (e.g. "ray::EPWorker")."""
    ps = subprocess.run(["ps", "-s", str(proc.pid), "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in ps.splitlines() if title in line]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)            # whatever is left of its session, by its group id
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)

"""ServeProcess: `epserve serve` as a child process in its own session (its own Ray cluster) on a free loopback
port, ready once /v1/models answers and a first completion streams; stopped with SIGINT to its main pid.

Talks to the server over HTTP only. Stopping never signals the process group at once (SIGTERM to the whole group
kills raylet under Serve's graceful shutdown and hangs it, TOOLING.md); leftovers get SIGKILL one pid at a time.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.process_cpu import snapshot
from cluster.process_group import free_port

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def serve_command(serve_args: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "deploy.cli", "serve", *serve_args, "--host", "127.0.0.1", "--port", str(port)]


class ServeProcess:
    """Context manager: `with ServeProcess(["--ep-size", "1"], log) as server: server.url ...`; on exit nothing of
    the server's session is left running."""

    def __init__(self, serve_args: list[str], log_path: Path, ready_timeout_s: float = 300.0,
                 stop_timeout_s: float = 60.0):
        self.serve_args, self.log_path = list(serve_args), Path(log_path)
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.model: str | None = None
        self.stop_s: float | None = None        # SIGINT -> main process gone
        self.num_killed = 0                     # session processes that needed SIGKILL

    @property
    def session_id(self) -> int:
        assert self.proc is not None
        return self.proc.pid                   # start_new_session: the child leads its own session

    def __enter__(self) -> "ServeProcess":
        env = dict(os.environ, RAY_AUTH_MODE="disabled")
        env.pop("RAY_ADDRESS", None)            # its own cluster, never one that happens to be running
        cmd = serve_command(self.serve_args, self.port)
        logger.info("starting %s (log: %s)", " ".join(cmd[1:]), self.log_path)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        import httpx
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                r = httpx.get(self.url + "/v1/models", timeout=5)
                if r.status_code == 200 and r.json().get("data"):
                    self.model = r.json()["data"][0]["id"]
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError(f"epserve serve: no 200 from /v1/models in {self.ready_timeout_s:.0f} s:\n"
                               f"{self._log_tail()}")
        logger.info("server answers on %s (model %s); waiting for a first completion", self.url, self.model)
        body = {"model": self.model, "prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0, "ignore_eos": True}
        while time.monotonic() < deadline:    # /v1/models answers before the ModelServer replica has loaded
            self._check_alive()
            try:
                r = httpx.post(self.url + "/v1/completions", json=body, timeout=60)
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 200:
                return
            if r is not None and r.status_code not in (404, 429, 503):    # not "still starting": a broken server
                raise RuntimeError(f"epserve serve: a first completion answered {r.status_code}: {r.text[:300]}")
            time.sleep(1.0)
        raise TimeoutError(f"epserve serve: no completion in {self.ready_timeout_s:.0f} s:\n{self._log_tail()}")

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"epserve serve exited with code {self.proc.returncode}:\n{self._log_tail()}")

    def _log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGINT to the main pid and a wait; then SIGKILL, pid by pid, whatever of the session still runs."""
        if self.proc is None:
            return
        sid, start = self.session_id, time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(self.stop_timeout_s)
                self.stop_s = time.monotonic() - start
                logger.info("server stopped in %.1f s", self.stop_s)
            except subprocess.TimeoutExpired:
                logger.warning("server ignored SIGINT for %.0f s: killing its session", self.stop_timeout_s)
        self.num_killed += _kill_session(sid, grace_s=30.0)      # Ray's processes exit slowly on a loaded machine
        if self.proc.poll() is None:
            self.proc.wait(10)


def _kill_session(session_id: int, grace_s: float) -> int:
    """Give the session's processes `grace_s` to exit on their own, then SIGKILL each one left; returns how many."""
    deadline, killed = time.monotonic() + grace_s, set()
    while snapshot(session_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    for _ in range(5):
        left = snapshot(session_id)
        if not left:
            break
        for pid, sample in left.items():
            logger.warning("killing leftover server process %d (%s)", pid, sample.title[:80])
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    return len(killed)

"""A throwaway redis-server (Debian's `redis-server` package; `make test` installs it) on a free 127.0.0.1 port, no
persistence, started and stopped by pid. Tests that use it fail, never skip, when redis-server is missing."""
import contextlib
import shutil
import subprocess
import tempfile
import time

from cluster.process_group import free_port


@contextlib.contextmanager
def redis_server(timeout_s: float = 20):
    """Yield the redis:// URL (db 0) of a fresh redis-server; stop it (by pid) afterwards."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server not found: apt-get install -y redis-server (the Makefile's test target does this)"
    port = free_port("127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
                                 "no", "--dir", tmp, "--daemonize", "no"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_ready(proc, port, timeout_s)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen, port: int, timeout_s: float) -> None:
    import redis
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}: {proc.stdout.read()}")
        with contextlib.suppress(redis.ConnectionError):
            if client.ping():
                client.close()
                return
        time.sleep(0.1)
    raise TimeoutError(f"redis-server on port {port} not answering after {timeout_s:.0f}s")

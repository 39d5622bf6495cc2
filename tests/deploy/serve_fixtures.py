"""A live Serve application on 127.0.0.1 for end-to-end tests: the real Gateway, ModelServer and EP ranks."""
import contextlib
import time

import httpx


@contextlib.contextmanager
def serve_app(args: dict, url: str, name: str = "epserve"):
    """Deploy build_app(args) under `name` on the session's Serve (see tests/conftest.py serve_url) and yield the
    base URL; delete the app afterwards."""
    from ray import serve

    from deploy.app import build_app
    serve.run(build_app(args), name=name, route_prefix="/", blocking=False)
    wait_ready(url)
    try:
        yield url
    finally:
        serve.delete(name)


def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code in (200, 401):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")

"""ServeReadiness: the gateway's readiness probe (ServingContext.readiness) inside a Serve application. Ready once a
replica of the model deployment is RUNNING (constructed, its first health check passed); until then, or when it
failed to deploy, the reason, with the replica's own error. Reads Serve's status; never touches a replica.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
MAX_REASON_CHARS = 2000


class ServeReadiness:
    """An async callable -> None (ready) or why not. `status` is serve.status (a blocking call to the controller,
    run in a worker thread), asked at most once per `ttl_s`: concurrent /health calls share one query."""

    def __init__(self, app_name: str, deployment_name: str, ttl_s: float = 1.0,
                 status: Callable[[], object] | None = None):
        self.app_name, self.deployment_name, self.ttl_s = app_name, deployment_name, ttl_s
        self._status = status
        self._checked_at = float("-inf")
        self._reason: str | None = None
        self._pending: asyncio.Future | None = None

    async def __call__(self) -> str | None:
        if time.monotonic() - self._checked_at < self.ttl_s:
            return self._reason
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._pending)   # one caller leaving does not cancel the others' query

    async def _refresh(self) -> str | None:
        try:
            status = await asyncio.to_thread(self._status or _serve_status)
            reason = deployment_reason(status, self.app_name, self.deployment_name)
        except Exception as e:
            reason = f"Serve's status is unavailable ({type(e).__name__}: {e})."
        if reason != self._reason or self._checked_at == float("-inf"):
            log = logger.info if reason is None else logger.warning
            log("readiness of %s/%s: %s", self.app_name, self.deployment_name, reason or "ready")
        self._checked_at, self._reason = time.monotonic(), reason
        return reason


def _serve_status():
    from ray import serve
    return serve.status()


def deployment_reason(status, app_name: str, deployment_name: str) -> str | None:
    """None when `deployment_name` of `app_name` has a RUNNING replica in `status` (a ray.serve.schema.ServeStatus),
    else a message for the client: not deployed yet, still starting, or failed to deploy with its error."""
    app = status.applications.get(app_name)
    deployment = app.deployments.get(deployment_name) if app is not None else None
    if deployment is None:
        return f"The model deployment {deployment_name} of application {app_name!r} is not deployed yet."
    if deployment.replica_states.get("RUNNING", 0) > 0:
        return None
    state = str(getattr(deployment.status, "value", deployment.status))
    error = last_error(deployment.message)
    if state == "DEPLOY_FAILED":
        return f"The model deployment {deployment_name} failed to deploy: {error or deployment.message or state}"
    starting = f"No {deployment_name} replica can serve yet (deployment {state}"
    return starting + (f"; last failure: {error})." if error else "); it may still be loading the model.")


def last_error(message: str) -> str | None:
    """The exception line(s) ending the traceback in one of Serve's deployment messages ("... Error:\\n<traceback>"),
    without terminal colours: e.g. "RuntimeError: rank 1: <its message>". None when the message reports no error."""
    if not message or "Error:" not in message:
        return None
    text = _ANSI.sub("", message.rsplit("Error:\n", 1)[-1])
    lines = [line for line in text.splitlines() if line.strip()]
    frames = [i for i, line in enumerate(lines) if line[:1].isspace()]   # "  File ...", code lines
    tail = lines[frames[-1] + 1:] if frames else lines
    error = " ".join(line.strip() for line in tail) or text.strip()
    return error[:MAX_REASON_CHARS] or None

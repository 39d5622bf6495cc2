"""`epserve serve`: a local Ray cluster (or an existing one: --ray-address / RAY_ADDRESS), Serve's HTTP proxy on
--host/--port, and the app from build_app.

Flags map one to one onto AppArgs fields (`--ep-size` -> ep_size ...), as the Helm values do. Blocks until
SIGINT/SIGTERM, then shuts Serve and Ray down.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from deploy.app_config import AppArgs, AutoscalingArgs
from model.errors import UserError

logger = logging.getLogger(__name__)
SPECIAL = {"model", "api_keys", "api_keys_env", "autoscaling", "num_replicas"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=None, help="gpt-oss checkpoint directory (default: the demo model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=None, help="Ray metrics export port (Prometheus target)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray node (default: enough)")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS") or None,
                   help="join this Ray cluster (host:port of its GCS; default: $RAY_ADDRESS) instead of starting a "
                        "local one; ranks go wherever the placement strategy puts them")
    p.add_argument("--replicas", type=int, default=1, help="ModelServer replicas, one EP group each")
    p.add_argument("--min-replicas", type=int, default=None, help="with --max-replicas: Serve autoscaling")
    p.add_argument("--max-replicas", type=int, default=None)
    p.add_argument("--target-ongoing-requests", type=float, default=16)
    p.add_argument("--api-key", action="append", default=[], help="accepted Bearer key (repeatable)")
    for name, field in AppArgs.model_fields.items():
        if name in SPECIAL:
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        else:
            kind = {int: int, float: float}.get(field.annotation, str)
            p.add_argument(flag, type=kind, default=None, help=field.description)


def app_args(ns: argparse.Namespace) -> AppArgs:
    values = {name: getattr(ns, name) for name in AppArgs.model_fields if name not in SPECIAL
              and getattr(ns, name, None) is not None}
    if ns.model_dir:
        values["model"] = ns.model_dir
    values["num_replicas"] = ns.replicas
    values["api_keys"] = ns.api_key
    if ns.max_replicas is not None:
        values["autoscaling"] = AutoscalingArgs(min_replicas=ns.min_replicas or 1, max_replicas=ns.max_replicas,
                                                target_ongoing_requests=ns.target_ongoing_requests)
    try:
        return AppArgs.model_validate(values)
    except ValueError as e:
        raise UserError(str(e).replace("\n", " ")) from None


def run(ns: argparse.Namespace) -> None:
    args = app_args(ns)
    from deploy.model_paths import resolve_model_dir
    resolve_model_dir(args.model)
    import ray
    from ray import serve
    from deploy.app import build_app
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    replicas = args.autoscaling.max_replicas if args.autoscaling else args.num_replicas
    loopback = "127.0.0.1" if ns.host in ("127.0.0.1", "localhost") else None
    if ns.ray_address:        # an existing cluster: its nodes and resources are what they are
        ray.init(address=ns.ray_address, _node_ip_address=loopback, configure_logging=False)
    else:
        ray.init(num_cpus=ns.num_cpus or max(8, replicas * (args.ep_size + 1) + 1), include_dashboard=False,
                 _node_ip_address=loopback, _metrics_export_port=ns.metrics_port, configure_logging=False,
                 _system_config={"metrics_report_interval_ms": 2000})
    serve.start(http_options={"host": ns.host, "port": ns.port})
    serve.run(build_app(args.model_dump()), name="epserve", route_prefix="/", blocking=False)
    logger.info("epserve: OpenAI API on http://%s:%d/v1 (%d x EP%d)", ns.host, ns.port, replicas, args.ep_size)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if ns.ray_address:        # a shared cluster: take our app away, leave Serve and the cluster running
        serve.delete("epserve")
    else:
        serve.shutdown()
    ray.shutdown()

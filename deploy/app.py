"""build_app: the Serve application, a Gateway ingress bound to a ModelServer deployment.

`serve run deploy/serve_config.yaml`, `epserve serve` and the Helm chart's serveConfigV2 all go through here, with
args validated by AppArgs. Each ModelServer replica is one EP group: its placement group has the replica's bundle
and one bundle per rank; scaling replicas is Serve's `num_replicas` or `autoscaling_config`.
"""
from __future__ import annotations

from ray import serve
from ray.serve import Application

from cluster.placement import replica_bundle, serve_bundles
from deploy.app_config import RAY_STORE, AppArgs
from deploy.gateway import Gateway
from deploy.model_paths import resolve_model_dir
from deploy.model_server import ModelServer
from deploy.prefix_router import router_options
from deploy.openai.response_store_ray import ResponseStoreReplica


def gateway_replicas(args: AppArgs) -> int:
    """Gateway replicas: as asked, else one per ModelServer replica (the most when autoscaling), so HTTP parsing,
    rendering and SSE writing scale with the model replicas."""
    if args.gateway_replicas is not None:
        return args.gateway_replicas
    return max(1, args.autoscaling.max_replicas if args.autoscaling else args.num_replicas)


def build_app(args: dict) -> Application:
    app_args = AppArgs.model_validate(args)
    resolve_model_dir(app_args.model)                          # fail at deploy time, with the path in the message
    # Replica counts stay out of the constructors' args, so scaling never restarts a serving replica.
    dumped = app_args.model_dump(exclude={"num_replicas", "autoscaling", "gateway_replicas"})
    scaling = ({"autoscaling_config": {"min_replicas": app_args.autoscaling.min_replicas,
                                       "max_replicas": app_args.autoscaling.max_replicas,
                                       "target_ongoing_requests": app_args.autoscaling.target_ongoing_requests}}
               if app_args.autoscaling else {"num_replicas": app_args.num_replicas})
    server = serve.deployment(ModelServer).options(
        name="ModelServer",
        placement_group_bundles=serve_bundles(app_args.ep_size, app_args.device),
        placement_group_strategy=app_args.placement_strategy,
        ray_actor_options={"num_cpus": replica_bundle(app_args.device)["CPU"]},
        max_ongoing_requests=app_args.max_ongoing_requests,
        max_queued_requests=app_args.max_queued_requests,
        health_check_period_s=5, health_check_timeout_s=app_args.collective_timeout_s + 30,
        graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=1,
        **scaling, **router_options(app_args),
    ).bind(dumped)
    gateway = serve.deployment(Gateway).options(
        name="Gateway", num_replicas=gateway_replicas(app_args), ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10 * app_args.max_ongoing_requests,
        graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=1,
    )
    return gateway.bind(server, dumped, response_store(app_args))


def response_store(args: AppArgs) -> Application | None:
    """The ResponseStore deployment every gateway stores Responses in (response_store 'ray'): exactly one replica,
    one store; None when they go to Redis."""
    if args.response_store != RAY_STORE:
        return None
    return serve.deployment(ResponseStoreReplica).options(
        name="ResponseStore", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
        graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=1,
    ).bind(args.response_store_max_entries, int(args.response_store_max_bytes), args.response_store_ttl_s)

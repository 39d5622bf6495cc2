"""ServeReadiness (the gateway's /health probe in a Serve app) on Ray Serve's own status objects, no cluster: ready
with one RUNNING ModelServer replica, the replica's own error when the deployment failed, at most one controller
query per second however many probes ask."""
import asyncio
import threading

from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus

from deploy.serve_readiness import ServeReadiness, deployment_reason, last_error

# What Serve 2.60's controller writes (deployment_state.py) when a replica's constructor raised three times.
FAILED = ("The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or "
          "initial health check failing. See controller logs for details. Error:\n"
          "\x1b[36mray::ServeReplica:epserve:ModelServer.initialize_and_get_metadata()\x1b[39m (pid=4242, ip=10.0.0.5)"
          "\n  File \"/app/cluster/ep_group.py\", line 88, in __init__\n    raise RuntimeError(msg)\n"
          "RuntimeError: rank 1 (node 10.0.0.6) failed to start: ValueError: kv_cache_bytes=67108864 cannot hold "
          "the sliding-window pool\n")
RETRYING = ("A replica failed to start with exception. Retrying 2 more time(s). Error:\n"
            "ray::ServeReplica:epserve:ModelServer.initialize_and_get_metadata() (pid=1, ip=1.2.3.4)\n"
            "  File \"x.py\", line 1, in f\nValueError: rank 0: tokenizer.json missing\n")


def status(deployment_status=DeploymentStatus.UPDATING, replicas=None, message="", app="epserve") -> ServeStatus:
    deployment = DeploymentStatusOverview(status=deployment_status, status_trigger=DeploymentStatusTrigger.UNSPECIFIED,
                                          replica_states=dict(replicas or {}), message=message)
    gateway = DeploymentStatusOverview(status=DeploymentStatus.HEALTHY, message="",
                                       status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED,
                                       replica_states={ReplicaState.RUNNING.value: 1})
    overview = ApplicationStatusOverview(status=ApplicationStatus.DEPLOYING, message="", last_deployed_time_s=0.0,
                                         deployments={"ModelServer": deployment, "Gateway": gateway})
    return ServeStatus(applications={app: overview})


def test_ready_with_one_running_replica_whatever_the_others_do():
    running = status(DeploymentStatus.UPSCALING, {"RUNNING": 1, "STARTING": 2})
    assert deployment_reason(running, "epserve", "ModelServer") is None
    unhealthy = status(DeploymentStatus.UNHEALTHY, {ReplicaState.RUNNING: 1, ReplicaState.STOPPING: 1})
    assert deployment_reason(unhealthy, "epserve", "ModelServer") is None


def test_not_ready_says_why():
    assert "not deployed yet" in deployment_reason(ServeStatus(), "epserve", "ModelServer")
    assert "not deployed yet" in deployment_reason(status(app="other"), "epserve", "ModelServer")
    starting = deployment_reason(status(replicas={"STARTING": 1}), "epserve", "ModelServer")
    assert starting == "No ModelServer replica can serve yet (deployment UPDATING); it may still be loading the model."
    retrying = deployment_reason(status(replicas={"STARTING": 1}, message=RETRYING), "epserve", "ModelServer")
    assert retrying.endswith("last failure: ValueError: rank 0: tokenizer.json missing).")
    failed = deployment_reason(status(DeploymentStatus.DEPLOY_FAILED, message=FAILED), "epserve", "ModelServer")
    assert failed == ("The model deployment ModelServer failed to deploy: RuntimeError: rank 1 (node 10.0.0.6) "
                      "failed to start: ValueError: kv_cache_bytes=67108864 cannot hold the sliding-window pool")
    assert "\x1b" not in failed and "File" not in failed


def test_last_error_of_messages_without_a_traceback():
    assert last_error("") is None and last_error("Deploying 1 replica.") is None
    assert last_error("Failed. Error:\nValueError: bad\nsecond line") == "ValueError: bad second line"
    assert len(last_error("Error:\n" + "x" * 10_000)) == 2000


def test_probe_queries_serve_at_most_once_per_ttl_and_shares_a_query():
    calls, release = [], threading.Event()
    answers = [status(replicas={"STARTING": 1}), status(DeploymentStatus.HEALTHY, {"RUNNING": 1})]

    def slow_status():
        calls.append(threading.get_ident())
        release.wait(5)
        return answers[min(len(calls), 2) - 1]
    probe = ServeReadiness("epserve", "ModelServer", ttl_s=0.2, status=slow_status)

    async def main():
        many = asyncio.gather(*(probe() for _ in range(20)))
        await asyncio.sleep(0.05)
        release.set()
        first = await many
        cached = await probe()
        await asyncio.sleep(0.25)
        return first, cached, await probe()
    first, cached, later = asyncio.run(main())
    assert len(set(first)) == 1 and "can serve yet" in first[0] and cached == first[0]
    assert later is None and len(calls) == 2
    assert threading.get_ident() not in calls                  # the blocking call never ran on the event loop


def test_probe_reports_a_failing_status_call_and_recovers():
    results = iter([RuntimeError("no controller"), status(DeploymentStatus.HEALTHY, {"RUNNING": 1})])

    def flaky():
        item = next(results)
        if isinstance(item, Exception):
            raise item
        return item
    probe = ServeReadiness("epserve", "ModelServer", ttl_s=0.0, status=flaky)
    assert asyncio.run(probe()) == "Serve's status is unavailable (RuntimeError: no controller)."
    assert asyncio.run(probe()) is None

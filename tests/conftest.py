"""Session-wide fixtures: one local Ray cluster for every test that needs it (started on first use)."""
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (on CPU tensors), so tests compare every kernel with
# its torch reference path here too. Read when a kernel is decorated, hence before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray on loopback with 8 logical CPUs (EP ranks and Serve replicas fit on 2 cores), no auth."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import ray
    ray.init(num_cpus=8, object_store_memory=500 << 20, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", configure_logging=False,
             _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_cluster):
    """Serve's HTTP proxy on a free 127.0.0.1 port, once per session (Serve keeps its first http_options)."""
    import socket

    from ray import serve
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()

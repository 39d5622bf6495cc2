"""Scaling from 1 to 2 ModelServer replicas (EP 2 each) while serving, the way `serve deploy` and KubeRay do it:
a declarative config whose `deployments` entry changes num_replicas (a lightweight update: the serving replica is
not restarted). Both replicas answer and no request fails during the change."""
import threading
import time

import openai
import pytest

from tests.deploy.serve_fixtures import wait_ready

ARGS = {"model": "demo", "ep_size": 2, "num_replicas": 1, "max_model_len": 256}


def config(url: str, num_replicas: int):
    """What `serve deploy` sends: the whole declarative config (only num_replicas differs between versions)."""
    from ray.serve.schema import ServeDeploySchema
    host, port = url.removeprefix("http://").split(":")
    return ServeDeploySchema(http_options={"host": host, "port": int(port)}, applications=[{
        "name": "epscale", "route_prefix": "/", "import_path": "deploy.app:build_app", "args": ARGS,
        "deployments": [{"name": "ModelServer", "num_replicas": num_replicas}]}])


@pytest.fixture(scope="module")
def scaled_app(serve_url):
    from ray import serve
    from ray.serve.context import _get_global_client
    client = _get_global_client()
    client.deploy_apps(config(serve_url, 1))
    wait_ready(serve_url, timeout_s=180)
    yield client, serve_url
    serve.delete("epscale")


def test_scale_from_one_to_two_replicas_while_serving(scaled_app):
    from ray import serve
    client, url = scaled_app
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    handle = serve.get_deployment_handle("ModelServer", app_name="epscale")
    first = handle.replica_id.remote().result()
    failures, answers, stop = [], [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                r = api.chat.completions.create(messages=[{"role": "user", "content": "What is 1 + 2?"}],
                                                model="gpt-oss-demo", temperature=0, max_tokens=40)
                answers.append(r.choices[0].message.content)
            except Exception as e:  # any failure during the change fails the test
                failures.append(repr(e))
    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        client.deploy_apps(config(url, 2))
        deadline = time.monotonic() + 180
        replicas: set[str] = set()
        while len(replicas) < 2 and time.monotonic() < deadline:
            replicas |= {handle.replica_id.remote().result() for _ in range(6)}
            time.sleep(0.5)
        assert len(replicas) == 2 and first in replicas        # scaled up; the first replica kept serving
        before = len(answers)
        while len(answers) < before + 10 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures
    # Stats of each replica: calls in flight together, since an idle handle may send a lone call to the same replica
    # every time.
    steps, deadline = {}, time.monotonic() + 60
    while set(steps) != replicas and time.monotonic() < deadline:
        for s in [r.result() for r in [handle.stats.remote() for _ in range(8)]]:
            steps[s["replica"]] = s["steps"]
    assert set(steps) == replicas and all(n > 0 for n in steps.values()), steps   # both replicas answered
    assert all(a.strip() == "3" for a in answers[-6:])

"""Multi-node EP on one machine: a two-node Ray cluster (`ray start` on 127.0.0.1 and 127.0.0.2, one CPU each).
`epserve generate --placement-strategy SPREAD --ray-address` puts the two ranks on different nodes, rendezvous at
rank 0's node address, and gives the single-process greedy outputs; `serve run deploy/serve_config.yaml` against
the cluster answers a chat request. Every process the cluster started is stopped by pid afterwards."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import pytest
import yaml

from deploy.model_paths import resolve_model_dir
from cluster.process_group import free_port
from tests.deploy.live_server import wait_serving

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    return env


def _pids_mentioning(text: str) -> set[int]:
    """Processes whose command line mentions `text`, and all their descendants."""
    found = set()
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(d) != os.getpid() and text.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                found.add(int(d))
        except OSError:
            pass
    children: dict[int, list[int]] = {}
    for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="ep2n", dir="/tmp")          # short: Ray's socket paths must stay short
    port, ray = free_port("127.0.0.1"), str(BIN / "ray")
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--temp-dir",
                        temp, "--include-dashboard", "false", *common], env=_env(), check=True, timeout=180,
                       capture_output=True)
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.2", *common],
                       env=_env(), check=True, timeout=180, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        for pid in _pids_mentioning(temp):       # every process of this cluster names its session dir
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)                # its ray_current_cluster goes with it


def _generate(prompts: Path, *extra: str) -> tuple[list[dict], str]:
    done = subprocess.run([str(BIN / "epserve"), "generate", str(resolve_model_dir("demo")), "--prompts",
                           str(prompts), "--temperature", "0", "--max-tokens", "12", *extra], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()], done.stderr


def test_two_ranks_on_two_nodes_give_the_single_process_outputs(cluster, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"<|start|>user<|message|>What is {i} + 2?<|end|>"
                                                     "<|start|>assistant"}) + "\n" for i in range(6)))
    local, _ = _generate(prompts)
    spread, log = _generate(prompts, "--ep-size", "2", "--placement-strategy", "SPREAD", "--ray-address", cluster)
    ready = re.search(r"EP group ready: 2 ranks on ([\d.]+), ([\d.]+) \(rendezvous ([\d.]+):\d+", log)
    assert ready, log[-2000:]
    rank0, rank1, rendezvous = ready.groups()
    # one rank per node (the head registers under the host's address even when started on 127.0.0.1)
    assert rank0 != rank1 and "127.0.0.2" in (rank0, rank1)
    assert rendezvous == rank0                                     # rank 0's node address, not an assumed one
    assert [o["output_ids"] for o in spread] == [o["output_ids"] for o in local]


def test_serve_run_of_the_shipped_config_answers_chat_on_the_cluster(cluster, tmp_path):
    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    port = free_port("127.0.0.1")
    config["http_options"]["port"] = port
    config["proxy_location"] = "HeadOnly"        # both "nodes" share one loopback: one proxy may bind the port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([str(BIN / "serve"), "run", str(path), "--address", cluster], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_serving(url, proc, timeout_s=240)
        reply = openai.OpenAI(base_url=f"{url}/v1", api_key="none").chat.completions.create(
            model=None, messages=[{"role": "user", "content": "What is 2 + 3?"}], temperature=0)
        assert reply.choices[0].message.content == "5"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        time.sleep(1)

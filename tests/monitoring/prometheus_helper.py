"""A real Prometheus (Debian's `prometheus` binary) for tests: a generated config scraping given targets, a temp
TSDB, a free loopback port; query its HTTP API; stop it by pid. For the live `epserve serve` integration test.

    with PrometheusServer(["127.0.0.1:8080"], rule_files=RULES) as prom:
        prom.wait_for('up == 1')
        prom.query('model_name:epserve_time_to_first_token_seconds:p95_5m')
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = (ROOT / "monitoring/prometheus/rules/recording.yml", ROOT / "monitoring/prometheus/rules/alerts.yml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    def __init__(self, targets: list[str], scrape_interval_s: float = 1.0, rule_files=RULE_FILES,
                 binary: str | None = None):
        self.binary = binary or shutil.which("prometheus")
        if not self.binary:
            raise RuntimeError("prometheus not found: apt-get install -y prometheus")
        self.targets, self.interval, self.rule_files = list(targets), f"{scrape_interval_s:g}s", list(rule_files)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    def config(self) -> dict:
        return {"global": {"scrape_interval": self.interval, "scrape_timeout": self.interval,
                           "evaluation_interval": self.interval},
                "rule_files": [str(p) for p in self.rule_files],
                "scrape_configs": [{"job_name": "epserve", "static_configs": [{"targets": self.targets}]}]}

    def start(self, timeout_s: float = 20.0) -> PrometheusServer:
        self.dir = Path(tempfile.mkdtemp(prefix="epserve-prom-"))
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(self.config()))
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.logs()[-2000:]}")
            try:
                if urllib.request.urlopen(self.url + "/-/ready", timeout=1).status == 200:
                    logger.info("prometheus ready on %s (pid %d)", self.url, self.proc.pid)
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"prometheus not ready within {timeout_s}s")

    def logs(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace") if self.dir else ""

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query: [{"metric": {labels}, "value": [ts, "value"]}, ...]."""
        return self.api("query", query=expr)["result"]

    def values(self, expr: str) -> dict[tuple, float]:
        """Instant query as {sorted label items: float value}."""
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in self.query(expr)}

    def wait_for(self, expr: str, predicate=bool, timeout_s: float = 30.0, poll_s: float = 0.5) -> list[dict]:
        """Poll `expr` until predicate(result) holds; returns the result or raises TimeoutError with the last one."""
        deadline, result = time.monotonic() + timeout_s, []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if predicate(result):
                return result
            time.sleep(poll_s)
        raise TimeoutError(f"{expr!r} did not satisfy the predicate within {timeout_s}s; last result {result}")

    def metric_names(self) -> set[str]:
        """Every metric name Prometheus has stored (to check that the dashboard's names are exported)."""
        return set(self.api("label/__name__/values"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        if self.dir is not None:
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

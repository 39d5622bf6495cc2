"""`epserve bench load`: an OpenAI-API load generator (Poisson arrivals, capped concurrency, a prompt/output length
mix) over streaming /v1/chat/completions. Measures client-side TTFT, ITL and e2e into prometheus-client histograms
(monitoring/metrics.py's definitions in a private registry) and exact percentiles; writes summary.json and a PNG.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

# (weight, prompt words, max_tokens): mostly chat-sized turns, some long prompts and long answers.
LENGTH_MIX = ((0.5, 16, 32), (0.35, 96, 128), (0.15, 384, 256))
_WORDS = ("expert", "router", "token", "layer", "cache", "batch", "tensor", "replica", "rank", "prompt", "window",
          "gradient", "latency", "queue", "shard", "kernel", "stream", "signal", "vector", "matrix", "model")


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    url: str                          # server root (http://host:port) or its /v1
    rate: float = 4.0                 # mean arrivals per second (Poisson)
    requests: int = 32
    concurrency: int = 8              # in flight at most; arrivals beyond it wait for a free slot
    model: str | None = None          # default: the first id of GET /v1/models
    api_key: str | None = None
    seed: int = 0
    timeout_s: float = 600.0

    def __post_init__(self):
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url must be an http(s) URL such as http://127.0.0.1:8000, got {self.url!r}")
        if not self.rate > 0:
            raise ValueError(f"--rate must be a positive number of requests per second, got {self.rate}")
        if self.requests < 1 or self.concurrency < 1:
            raise ValueError(f"--requests and --concurrency must be at least 1, got {self.requests}, "
                             f"{self.concurrency}")

    @property
    def base(self) -> str:
        """The API root ending in /v1."""
        root = self.url.rstrip("/")
        return root if root.endswith("/v1") else root + "/v1"


@dataclasses.dataclass
class RequestResult:
    start: float                      # seconds since the run began
    max_tokens: int
    status: str = "error"             # HTTP status code, or "connect"/"timeout"/"protocol" for transport failures
    ttft: float | None = None
    itls: list[float] = dataclasses.field(default_factory=list)
    e2e: float | None = None
    output_tokens: int = 0
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "200" and self.e2e is not None


def make_workload(config: LoadConfig) -> list[tuple[float, str, int]]:
    """(arrival offset s, prompt, max_tokens) per request: exponential gaps at `rate`, lengths from LENGTH_MIX."""
    rng = random.Random(config.seed)
    weights = [w for w, _, _ in LENGTH_MIX]
    t, out = 0.0, []
    for i in range(config.requests):
        _, words, max_tokens = rng.choices(LENGTH_MIX, weights)[0]
        prompt = f"Request {i}: " + " ".join(rng.choice(_WORDS) for _ in range(words))
        out.append((t, prompt, max_tokens))
        t += rng.expovariate(config.rate)
    return out


async def _discover_model(client, config: LoadConfig) -> str:
    """GET /v1/models: checks that the server answers and returns the model to ask for."""
    import httpx
    try:
        r = await client.get(config.base + "/models")
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {config.base}/models: {type(e).__name__}: {e}") from None
    if r.status_code == 401:
        raise ValueError(f"{config.base}/models answered 401: pass a valid --api-key")
    if config.model:
        return config.model
    if r.status_code != 200 or not r.json().get("data"):
        raise ValueError(f"{config.base}/models answered {r.status_code} without models: pass --model")
    return r.json()["data"][0]["id"]


async def _one(client, config: LoadConfig, model: str, prompt: str, max_tokens: int, t0: float, timer
               ) -> RequestResult:
    import httpx
    start = time.monotonic()
    result = RequestResult(start=start - t0, max_tokens=max_tokens)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    last, done = None, False
    try:
        async with client.stream("POST", config.base + "/chat/completions", json=body) as r:
            result.status = str(r.status_code)
            if r.status_code != 200:
                await r.aread()
                timer.on_error(r.status_code)
                return result
            async for line in r.aiter_lines():
                done = done or line[5:].strip() == "[DONE]"
                if not line.startswith("data:") or done:
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("error"):                        # the server failed after the stream began
                    result.status = "stream_error"
                    timer.on_error(500)
                    return result
                now = time.monotonic()
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                        result.ttft = now - start if result.ttft is None else result.ttft
                        if last is not None:
                            result.itls.append(now - last)
                        last = now
                        result.output_tokens += 1
                        timer.on_tokens(1, now)
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens", result.output_tokens)
    except (httpx.TransportError, json.JSONDecodeError) as e:       # no complete HTTP answer
        result.status = ("timeout" if isinstance(e, httpx.TimeoutException)
                         else "protocol" if isinstance(e, json.JSONDecodeError) else "connect")
        logger.debug("request failed: %s", e)
        return result
    if not done:
        result.status = "protocol"                             # the stream ended without `data: [DONE]`
        return result
    result.e2e = time.monotonic() - start
    timer.on_finish(result.finish_reason or "stop")
    return result


async def run_load(config: LoadConfig, request_metrics) -> tuple[list[RequestResult], float]:
    """Send the workload; returns the results (in arrival order) and the run's wall time."""
    import httpx
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=config.timeout_s) as client:
        model = await _discover_model(client, config)
        logger.info("load: %d requests at %.2f req/s (concurrency %d) against %s, model %s", config.requests,
                    config.rate, config.concurrency, config.base, model)
        slots = asyncio.Semaphore(config.concurrency)
        t0 = time.monotonic()

        async def arrive(offset: float, prompt: str, max_tokens: int) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))
            async with slots:
                return await _one(client, config, model, prompt, max_tokens, t0, request_metrics.start())

        results = await asyncio.gather(*(arrive(*w) for w in make_workload(config)))
        return list(results), time.monotonic() - t0


def run(args) -> dict:
    """The CLI verb: run, print the JSON summary, write summary.json, load.png and metrics.prom under --out."""
    import prometheus_client

    from bench.load_report import summarize, write_plot
    from monitoring.metrics import PrometheusSink
    from monitoring.recorders import RequestMetrics
    if getattr(args, "workload", "poisson") == "multiturn":
        from bench import multiturn
        return multiturn.run(args)
    if not args.url:
        raise ValueError("--url is required (the server to load), except with --workload multiturn")
    config = LoadConfig(url=args.url, rate=args.rate, requests=args.requests, concurrency=args.concurrency,
                        model=args.model, api_key=args.api_key, seed=args.seed)
    registry = prometheus_client.CollectorRegistry()
    metrics = RequestMetrics(config.model or "bench", replica="bench", sink=PrometheusSink(registry))
    results, duration = asyncio.run(run_load(config, metrics))
    summary = summarize(results, duration, config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "metrics.prom").write_bytes(prometheus_client.generate_latest(registry))
    write_plot(results, out / "load.png")
    print(json.dumps(summary, indent=2))
    return summary

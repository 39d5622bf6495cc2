"""AppArgs: the arguments of the Serve application, one schema for `epserve serve` flags, `serve run
deploy/serve_config.yaml` args and the Helm chart's serveConfigV2 (values camelCase, args snake_case, same names).

Pydantic lives here, at the edge (STYLE.md); the engine and cluster receive plain frozen dataclasses built from it.
"""
from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

from engine.config import DEFAULT_GPU_MEMORY_UTILIZATION, DEFAULT_KV_CACHE_MEMORY

DEMO_MODEL = "demo"  # `model: demo` (the default) serves the bundled demo checkpoint
RAY_STORE = "ray"    # `response_store: ray` (the default) keeps stored Responses in the app's ResponseStore deployment
REDIS_SCHEMES = ("redis", "rediss", "unix")


class AutoscalingArgs(BaseModel):
    """Serve autoscaling of ModelServer replicas (each replica is one EP group)."""
    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling: min_replicas ({self.min_replicas}) exceeds max_replicas "
                             f"({self.max_replicas})")
        return self


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # -- model --
    model: str = Field(DEMO_MODEL, description="checkpoint directory, or 'demo' for the bundled demo model")
    served_model_name: str | None = Field(None, description="id in /v1/models (default: the directory name)")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bfloat16 on cuda, float32 on cpu")
    # -- expert parallelism (one EP group per replica) --
    ep_size: int = Field(2, ge=1, description="ranks (GPUs) per replica; experts are sharded across them")
    redundant_experts: int = Field(0, ge=0, description="extra physical expert slots per layer for hot experts")
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    collective_timeout_s: float = Field(60.0, gt=0, description="a collective (or a regroup's rendezvous) raises after "
                                        "this; a dead rank's peers notice at once")
    probe_timeout_s: float = Field(2.0, gt=0, description="a rank that answers no ping this long is stuck: killed, "
                                   "then handled as lost")
    elastic_ep: bool = Field(True, description="a lost rank: the survivors regroup and continue its requests "
                             "(false: the replica fails and Serve replaces it)")
    replace_lost_ranks: bool = Field(True, description="after a regroup, start a replacement rank and return to "
                                     "full size")
    rebalance_interval_steps: int = Field(1000, ge=0, description="EPLB period in engine steps; 0 disables")
    # -- replicas --
    num_replicas: int = Field(1, ge=0)
    autoscaling: AutoscalingArgs | None = None
    gateway_replicas: int | None = Field(None, ge=1, description="Gateway (HTTP ingress) replicas; default: one per "
                                         "ModelServer replica (the max when autoscaling)")
    # -- engine --
    max_model_len: int | None = Field(None, ge=2, description="prompt + output tokens; default: what the KV cache "
                                      "holds, capped by the model")
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)
    kv_cache_memory: ByteSize = Field(DEFAULT_KV_CACHE_MEMORY, ge=1, description="CPU: KV cache bytes per EP rank, "
                                      "e.g. 2GiB or 512MiB (default 1GiB)")
    gpu_memory_utilization: float = Field(DEFAULT_GPU_MEMORY_UTILIZATION, gt=0, le=1, description="CUDA: fraction "
                                          "of each GPU's memory for weights, activations and KV cache")
    kv_cache_bytes: ByteSize | None = Field(None, ge=1, description="exact KV cache bytes per EP rank for both pools; "
                                            "overrides kv_cache_memory and gpu_memory_utilization")
    enable_prefix_caching: bool = False
    request_router: Literal["cache_aware", "power_of_two"] = Field(
        "cache_aware", description="how the gateway picks a model replica: cache_aware (most prompt tokens cached "
        "there, within a load bound; prompt_cache_key / user pin a conversation; the rank inside a replica alike) or "
        "power_of_two (Serve's, and the least-loaded rank: prefix-blind)")
    routing_load_bound: float = Field(8.0, ge=0, description="cache_aware: a replica (or rank) holding a prompt's "
                                      "prefix loses it to another when its ongoing requests exceed the least loaded "
                                      "one's by more than this")
    # -- gateway --
    max_ongoing_requests: int = Field(64, ge=1, description="requests in flight per replica")
    max_queued_requests: int = Field(128, ge=0, description="per-replica queue; beyond it: 429 + Retry-After")
    max_request_bytes: int = Field(1 << 20, ge=1024)
    max_migrations: int = Field(3, ge=0, description="times a stream whose model replica is lost is continued on "
                                "another replica (0: it fails with 503)")
    response_store: str = Field(RAY_STORE, description="where stored Responses live: 'ray' (a ResponseStore "
                                "deployment, in memory, shared by every gateway) or redis://HOST:PORT/DB")
    response_store_max_entries: int = Field(10_000, ge=1, description="'ray' store: responses kept at most; the "
                                            "least recently used go first")
    response_store_max_bytes: ByteSize = Field(256 << 20, ge=1, description="'ray' store: JSON bytes kept at most, "
                                               "e.g. 256MiB")
    response_store_ttl_s: float = Field(30 * 86400, gt=0, description="a stored response expires this long after "
                                        "it was created (default 30 days, as OpenAI)")
    api_keys: list[str] = Field(default_factory=list, description="accepted Bearer keys; empty: no auth")
    api_keys_env: str | None = Field(None, description="env var with comma-separated keys (a k8s Secret)")

    @field_validator("response_store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if value != RAY_STORE and urlsplit(value).scheme not in REDIS_SCHEMES:
            raise ValueError(f"response_store must be 'ray' or a Redis URL (redis://HOST:PORT/DB), got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs})")
        return self

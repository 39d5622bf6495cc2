"""EPWorker: one expert-parallel rank (one GPU, or one process on CPU), run as a Ray actor by EPGroup.

Owns a full LLMEngine for the sequences assigned to this rank (data-parallel attention, its own KV cache) whose
MoE layers are EPExperts over the group's process group, and drives it itself (cluster/rank_loop.py): requests and
aborts arrive batched through `submit`, StepResults leave through the `results` stream, once per step. Every rank
runs exactly one forward per step; a rank with nothing scheduled runs an empty one so that it still joins every
collective. A threaded actor: `submit`, `ping` and `stats` answer while the loop thread steps. When a peer is lost
the loop parks and the rank joins the re-formed group (`regroup`, cluster/rank_regroup.py); a replacement rank is
built by `prepare` and waits, parked, for the same call.
A group of one rank holds every expert and needs no collective: its layers are CountedExperts over the process's
own backend (packed MXFP4 on CUDA for MXFP4 checkpoints, else dense), and its decode steps may be CUDA graphs.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

import torch

from cluster.counted_experts import CountedExperts
from cluster.ep_experts import EPExperts, EPStats
from cluster.process_group import abort_ep_group, control_group, destroy_ep_group, free_port, init_ep_group
from cluster.rank_regroup import RankRegroup, guard_commit
from cluster.rank_loop import RankLoop
from engine.engine import EngineConfig, LLMEngine
from engine.prefix_summary import prefix_report
from engine.token_output import TokenOutput
from model.config import ModelConfig
from model.loader import expert_factory, load_model, packed_experts_chosen
from model.moe import LocalExperts

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one rank reports after a step, or after commands that produced outputs without one (small, picklable)."""
    rank: int
    step: int                            # the rank's forward count (equal on every rank: they step together)
    outputs: list[TokenOutput]
    expert_counts: torch.Tensor | None   # [L, E] tokens routed per logical expert by this rank's tokens; None: no step
    all_to_all_s: float                  # time inside dispatch/combine collectives this step
    step_s: float
    num_running: int
    num_waiting: int
    kv_usage: float
    num_preemptions: int
    rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (request id, why) never queued
    epoch: int = 0                       # the group generation it was produced in (+1 at each regroup)


def node_address() -> str:
    """The address this process's Ray node registered with (`ray start --node-ip-address`), which its peers can
    reach; not the host's first interface, which is what a bare lookup finds."""
    import ray
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


def model_detokenizer(model_dir: str):
    """decode(ids) of the model directory's tokenizer.json (special tokens kept, as the gateway decodes), for stop
    strings on the rank; None when the directory has no tokenizer."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(path)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


class EPWorker(RankRegroup):
    def __init__(self, rank: int, ep_size: int, model_dir: str, engine_config: EngineConfig,
                 dtype: str = "float32", device: str = "cpu", eos_token_ids: tuple[int, ...] = (),
                 experts: str = "auto"):
        self.rank, self.ep_size, self.model_dir, self.experts_choice = rank, ep_size, model_dir, experts
        self.engine_config, self.eos_token_ids = engine_config, eos_token_ids
        self.dtype = getattr(torch, dtype)
        self.device = torch.device(device if device == "cpu" else f"cuda:{torch.cuda.current_device()}")
        self.engine: LLMEngine | None = None
        self.loop: RankLoop | None = None
        self.num_steps = 0
        self.epoch = 0                       # the group's generation this rank last joined
        self.single = ep_size == 1           # holds every expert, no collectives (a group of one never regroups)
        self.timeout_s = 60.0
        self._regroup_lock = threading.Lock()
        self._aborted = False                # NCCL: the group was aborted under a running step (its tokens are void)
        self._rejected: list[tuple[str, str]] = []
        if self.device.type == "cpu":   # ranks share the host's cores: don't oversubscribe them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // ep_size))

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's node address and a free port on it: the group's rendezvous (never an assumed localhost)."""
        host = node_address()
        return host, free_port(host)

    def setup(self, master_addr: str, master_port: int, placement, timeout_s: float) -> dict:
        """Join the group, load this rank's weights, build its engine and start its step loop. Returns what the
        replica needs to know: the engine's max_model_len, the node it runs on, the KV cache bytes."""
        self.timeout_s = timeout_s
        init_ep_group(self.rank, self.ep_size, master_addr, master_port, self.backend, timeout_s)
        info = self._build(placement, self.engine_config)
        self._start_loop(parked=False)
        return info

    def prepare(self, placement, timeout_s: float, kv_cache_bytes: int | None) -> dict:
        """A replacement rank: load the weights of this rank's slots under `placement` and build its engine (the KV
        cache sized like its peers': a CUDA memory profile would need the group), without joining the group; its
        loop waits, parked, for `regroup`."""
        self.timeout_s = timeout_s
        config = self.engine_config if kv_cache_bytes is None else \
            dataclasses.replace(self.engine_config, kv_cache_bytes=kv_cache_bytes)
        info = self._build(placement, dataclasses.replace(config, cuda_graphs=False))  # captured in the group
        self._start_loop(parked=True)
        return info

    def _build(self, placement, engine_config: EngineConfig) -> dict:
        config = ModelConfig.from_dir(self.model_dir)
        self.stats = EPStats(config.num_hidden_layers, config.num_local_experts, self.device)
        self.placement = placement.to(self.device)
        if self.single:
            local = expert_factory(self.model_dir, self.dtype, self.device, self.experts_choice) or (
                lambda _: LocalExperts(config, self.dtype))
            experts = lambda i: CountedExperts(local(i), i, self.stats)                    # noqa: E731
        else:
            packed = packed_experts_chosen(self.model_dir, self.device, self.experts_choice)
            self._make_experts = lambda i, p: EPExperts(config, i, self.rank, self.ep_size, p,  # noqa: E731
                                                        self.stats, self.dtype, packed=packed)
            experts = lambda i: self._make_experts(i, self.placement)                     # noqa: E731
        self.model = load_model(self.model_dir, self.dtype, self.device, experts=experts)
        self.experts = [layer.mlp.experts for layer in self.model.model.layers]
        self.engine = LLMEngine(self.model, engine_config, eos_token_ids=self.eos_token_ids,
                                detokenize=model_detokenizer(self.model_dir))
        if self.backend == "nccl" and not self.single:
            guard_commit(self.engine.scheduler, lambda: self._aborted)
        import ray
        return {"max_model_len": self.engine.max_model_len, "node": node_address(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "kv_cache_bytes": self.engine.kv_budget.num_bytes}

    def _start_loop(self, parked: bool) -> None:
        control = control_group(self.backend, self.timeout_s) if not (self.single or parked) else None
        if not self.single:              # the runner agrees each step's rows (static shapes: graphs on every rank)
            self.stats.step.attach(self.engine.runner, control)
        self.loop = RankLoop(self.rank, self.ep_size, self._apply, self.engine.has_unfinished, self.step_once,
                             self._apply_placement, control, on_failure=abort_ep_group, parked=parked)
        self.loop.start()

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    # ---- requests: commands arrive batched, from the replica, at any time ----
    def submit(self, commands: list[tuple]) -> None:
        """("add", request_id, prompt ids, SamplingParams[, resumed output ids]), ("abort", request_id),
        ("placement", version, map), ("stop",): applied by the loop at its next step boundary."""
        self.loop.submit(commands)

    def results(self):
        """Streaming (Ray generator): lists of StepResults (and a RankBroken when a step failed) as the loop produces
        them, coalesced when the reader is behind; ends with the loop's error (RankFailed, naming this rank) if the
        loop itself fails."""
        while not self.loop.stopped or self.loop.error is not None:
            items = self.loop.take(timeout_s=1.0)
            if items:
                yield items

    def ping(self) -> int:
        """Answers while the process runs (the loop may be busy); the replica's probe for a dead or stuck rank."""
        return self.rank

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt_ids, params, *resume = command
            try:
                self.engine.add_request(request_id, prompt_ids, params, *resume)
            except ValueError as e:          # a request this engine can never serve: the replica reports it
                self._rejected.append((request_id, str(e)))
        elif command[0] == "abort":
            outputs = self.engine.abort(command[1])
            if outputs:
                self.loop.put(self._result(outputs, None, 0.0, 0.0))
        if self._rejected:
            self.loop.put(self._result([], None, 0.0, 0.0))

    # ---- one step (on the loop thread) ----
    def step_once(self) -> StepResult:
        runner = self.engine.runner
        start, forwards = time.perf_counter(), runner.forwards
        outputs = self.engine.step()
        if runner.forwards == forwards and not self.single:
            self._empty_forward()
        elif runner.forwards != forwards:                # counted after the step: graph padding rows never count
            for experts in self.experts:
                experts.count(*runner.last_rows)
        self.num_steps += 1
        counts, a2a = self.stats.take()
        return self._result(outputs, counts.cpu(), a2a, time.perf_counter() - start)

    def _result(self, outputs, counts, a2a: float, step_s: float) -> StepResult:
        sched = self.engine.scheduler
        rejected, self._rejected = self._rejected, []
        return StepResult(self.rank, self.num_steps, outputs, counts, a2a, step_s, sched.num_running,
                          sched.num_waiting, self.engine.block_manager.usage(), sched.num_preemptions, rejected,
                          self.epoch)

    @torch.no_grad()
    def _empty_forward(self) -> None:
        """Join every MoE layer's collectives with zero tokens (nothing scheduled on this rank)."""
        self.stats.step.agree(0)
        H = self.engine.model.config.hidden_size
        t = torch.empty(0, H, dtype=self.dtype, device=self.device)
        ids = torch.empty(0, self.engine.model.config.num_experts_per_tok, dtype=torch.long, device=self.device)
        for experts in self.experts:
            experts(t, ids, torch.empty(ids.shape, device=self.device))

    # ---- placement (on the loop thread, in the same iteration on every rank) ----
    def _apply_placement(self, placement) -> int:
        """Switch to a new expert map between steps; re-reads the experts of changed slots from the checkpoint.
        Returns the number of slots whose expert changed on this rank."""
        placement = placement.to(self.device)
        if self.single:                                  # every expert is here already: nothing moves
            self.placement = placement
            return 0
        return self._fit_experts(placement)

    # ---- introspection ----
    def stats(self) -> dict:
        """KV blocks in use and requests on this rank (for health/stats endpoints and tests)."""
        bm, sched = self.engine.block_manager, self.engine.scheduler
        used = {g: bm.num_total_blocks(g) - bm.num_free_blocks(g) for g in bm.config.groups}
        return {"rank": self.rank, "kv_usage": bm.usage(), "blocks_used": used, "num_running": sched.num_running,
                "num_waiting": sched.num_waiting, "num_preemptions": sched.num_preemptions}

    def prefix_report(self):
        """What this rank's prefix cache holds, for the replica's cache-aware routing: engine/prefix_summary's
        (summary, prompt tokens queried, of which hit)."""
        return prefix_report(self.engine)

    def num_expert_params(self) -> int:
        """Expert values this rank stores (parameters and buffers; packed bytes count as stored)."""
        return sum(t.numel() for e in self.experts for t in (*e.parameters(), *e.buffers()))

    def slot_experts(self) -> list[list[int]]:
        return [e.slot_experts() for e in self.experts]

    def shutdown(self) -> None:
        if self.loop is not None:
            self.loop.submit([("stop",)])
        destroy_ep_group()


"""`python bench/gpu_check.py [--device cuda|cpu] [--tiny] [--out gpu_check.json]`: the one-shot device benchmark.

Builds random weights at gpt-oss-20b (and, when memory allows, 120b) shapes directly in device memory, experts in
the real packed MXFP4 layout (PackedMXFP4Experts), and measures through LLMEngine (paged KV cache): decode tokens/s
at batch 1, 8, 64; batch 1 against the HBM roofline (bandwidth from a device-to-device copy in the same run); TTFT
of a 2,048-token prompt; transformers' GptOssForCausalLM on the same weights (dequantised) where it fits. Writes the
JSON summary to --out and a PNG beside it, prints the JSON. No Ray, no checkpoint on disk. `--tiny` runs the same
code paths on a tiny config in seconds (CI).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))           # run as a script from anywhere

from bench import fast_path_check                                      # noqa: E402
from bench.device_stats import free_bytes, measure_bandwidth, prompts, sync  # noqa: E402
from bench.hf_baseline import measure_transformers                     # noqa: E402
from bench.roofline import BYTES_PER_TOKEN_FORMULA, bytes_per_token    # noqa: E402
from engine.engine import EngineConfig, LLMEngine                       # noqa: E402
from engine.kv_budget import kv_bytes_for                              # noqa: E402
from engine.sampling_params import SamplingParams                       # noqa: E402
from model import tiny                                                  # noqa: E402
from model.config import ModelConfig                                    # noqa: E402
from model.packed_experts import PACKED_BYTES_PER_WEIGHT, PackedMXFP4Experts  # noqa: E402
from model.transformer import GptOssForCausalLM                         # noqa: E402

logger = logging.getLogger("gpu_check")
_ids = itertools.count()

REAL_20B = tiny.TinySpec(layers=24, hidden=2880, heads=64, kv_heads=8, head_dim=64, intermediate=2880, experts=32,
                         top_k=4, vocab=201088, sliding_window=128, shards=1)   # spec §1.1
REAL_120B = dataclasses.replace(REAL_20B, layers=36, experts=128)
TINY = tiny.TinySpec(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=64, experts=8, top_k=4,
                     vocab=1024, sliding_window=8, shards=1)


@dataclasses.dataclass(frozen=True)
class Plan:
    models: tuple[tuple[str, tiny.TinySpec], ...]
    prompt_tokens: int = 128             # decode runs: prompt length of every sequence
    decode_steps: int = 32               # timed decode steps per batch size
    batches: tuple[int, ...] = (1, 8, 64)
    ttft_prompt_tokens: int = 2048
    bandwidth_bytes: int = 2 << 30       # copied buffer, far larger than L2


FULL_PLAN = Plan(models=(("gpt-oss-20b", REAL_20B), ("gpt-oss-120b", REAL_120B)))
TINY_PLAN = Plan(models=(("tiny", TINY),), prompt_tokens=16, decode_steps=4, ttft_prompt_tokens=64,
                 bandwidth_bytes=16 << 20)


def meta_model(spec: tiny.TinySpec, dtype: torch.dtype) -> GptOssForCausalLM:
    """Our model with PackedMXFP4Experts, on the meta device (no memory; sizes are known)."""
    cfg = ModelConfig.from_hf_dict(tiny.hf_config(spec, None))
    with torch.device("meta"):
        return GptOssForCausalLM(cfg, dtype, experts=lambda i: PackedMXFP4Experts(cfg, dtype, layer_idx=i))


def materialise(model: GptOssForCausalLM, device: torch.device, seed: int = 0) -> GptOssForCausalLM:
    """Allocate the meta model on `device` and fill it with random weights in place, experts as MXFP4 bytes."""
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    H, I, ms = model.config.hidden_size, model.config.intermediate_size, tiny.FP4_MEAN_SQUARE * tiny.JITTER_MEAN_SQUARE
    # Scale exponents as model/tiny.py picks them: gate/up pre-activations std ~4, expert outputs std ~1.
    e0 = {"gate_up_proj": round(math.log2(tiny.GATE_UP_STD / math.sqrt(ms * H))),
          "down_proj": round(math.log2(tiny.DOWN_STD / (tiny.SWIGLU_RMS * math.sqrt(ms * I))))}
    with torch.no_grad():
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf.endswith("_blocks"):
                t.random_(0, 256, generator=g)                                         # uniform FP4 codes
            elif leaf.endswith("_scales"):
                e = 127 + e0[leaf.removesuffix("_scales")]
                t.random_(e - 1, e + 2, generator=g)                                   # 2^(e0 + {-1, 0, 1})
            elif "norm" in name:
                t.fill_(1.0)
            elif name.endswith("embed_tokens.weight") or leaf == "sinks":
                t.normal_(0.0, 1.0, generator=g)
            elif "router" in name:
                t.normal_(0.0, 2 * H ** -0.5 if leaf == "weight" else 0.5, generator=g)
            elif t.dim() == 2:
                t.normal_(0.0, t.shape[1] ** -0.5, generator=g)                        # [out, in]
            else:
                t.normal_(0.0, 0.1, generator=g)                                       # biases
    return model.eval().requires_grad_(False)


def make_engine(model: GptOssForCausalLM, plan: Plan, cuda_graphs: bool = True) -> LLMEngine:
    """An engine that prefills every decode batch, and the TTFT prompt, in one step (so all sequences start
    decoding together), with KV pools for the largest batch or the TTFT prompt, whichever needs more."""
    block, batch = 16, max(plan.batches)
    budget = max(plan.ttft_prompt_tokens, batch * plan.prompt_tokens)
    decode_len = plan.prompt_tokens + plan.decode_steps + 16
    max_len = max(decode_len, plan.ttft_prompt_tokens + 8)
    cfg, dtype = model.config, model.dtype
    full_blocks = max(batch * -(-decode_len // block), -(-max_len // block)) + batch
    kv = kv_bytes_for(cfg, dtype, block, batch, budget, full_blocks)
    return LLMEngine(model, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=budget, block_size=block,
                                         max_model_len=max_len, kv_cache_bytes=kv, cuda_graphs=cuda_graphs))


def decode_ours(engine: LLMEngine, batch: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
    """Tokens/s over `steps` engine steps in which every sequence decodes (prefill excluded), and greedy tokens."""
    device = engine.runner.device
    params = SamplingParams(temperature=0.0, max_tokens=engine.config.max_model_len, ignore_eos=True)
    ids = [f"gpu-check-{next(_ids)}" for _ in batch]
    for rid, p in zip(ids, batch):
        engine.add_request(rid, p, params)
    started: set[str] = set()
    while len(started) < len(ids):                                         # prefill, possibly chunked
        started.update(o.request_id for o in engine.step())
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        outputs = engine.step()
        if len(outputs) != len(ids):
            raise RuntimeError(f"a timed step advanced {len(outputs)} of {len(ids)} sequences")
    sync(device)
    seconds = time.perf_counter() - start
    tokens = {o.request_id: o.output_token_ids for rid in ids for o in engine.abort(rid)}        # final outputs
    return len(ids) * steps / seconds, [tokens[rid][:steps + 1] for rid in ids]


def ttft_ours(engine: LLMEngine, prompt: list[int]) -> float:
    device, rid = engine.runner.device, f"gpu-check-{next(_ids)}"
    sync(device)
    start = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    while not engine.step():
        pass
    sync(device)
    return time.perf_counter() - start


def roofline_packed(cfg: ModelConfig, dtype: torch.dtype, positions: range, tok_s: float, bandwidth: float) -> dict:
    """bench/roofline.py's batch-1 bytes per token with the top-k experts' weights at 17/32 byte per weight."""
    elem = torch.empty((), dtype=dtype).element_size()
    expert_weights = 3 * cfg.hidden_size * cfg.intermediate_size                     # gate_up 2HI + down IH
    per_token = bytes_per_token(cfg, dtype, positions) - (cfg.num_hidden_layers * cfg.num_experts_per_tok
                                                          * expert_weights * (elem - PACKED_BYTES_PER_WEIGHT))
    return {"bytes_per_token_mb": round(per_token / 1e6, 3), "decode_tok_s": round(tok_s, 2),
            "achieved_gb_s": round(tok_s * per_token / 1e9, 3), "roofline_tok_s": round(bandwidth / per_token, 2),
            "fraction": round(tok_s * per_token / bandwidth, 4)}


def measure_model(spec: tiny.TinySpec, plan: Plan, dtype, device, bandwidth: float) -> dict:
    model = meta_model(spec, dtype)
    need = sum(t.nbytes for t in itertools.chain(model.parameters(), model.buffers()))
    cfg, free = model.config, free_bytes(device)
    packed = sum(m.packed_bytes() for m in model.modules() if isinstance(m, PackedMXFP4Experts))
    out = {"config": {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "num_local_experts",
                                                    "num_experts_per_tok", "vocab_size")},
           "weight_bytes": need, "packed_expert_bytes": packed}
    if need + (6 << 30) * (device.type == "cuda") > free:
        return {**out, "skipped": f"weights need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"}
    start = time.perf_counter()
    model = materialise(model, device)
    engine = make_engine(model, plan)
    out["build_s"] = round(time.perf_counter() - start, 2)
    P, steps, V = plan.prompt_tokens, plan.decode_steps, cfg.vocab_size
    decode_ours(engine, prompts(1, P, V, seed=99), 2)                                       # warm-up
    out["decode"], tokens = {}, {}
    for b in plan.batches:
        logger.info("decode at batch %d", b)
        tok_s, tokens[b] = decode_ours(engine, prompts(b, P, V, seed=b), steps)
        out["decode"][str(b)] = {"tok_s": round(tok_s, 2)}
    out["roofline_batch1"] = roofline_packed(cfg, dtype, range(P, P + steps), out["decode"]["1"]["tok_s"], bandwidth)
    long = prompts(1, plan.ttft_prompt_tokens, V, seed=7)[0]
    out["ttft_s"] = round(min(ttft_ours(engine, long) for _ in range(3)), 4)              # first one warms up
    del engine
    gc.collect()
    out["checks"] = fast_path_checks(model, plan, tokens)
    logger.info("transformers baseline")
    out["transformers"] = measure_transformers(spec, model, plan, dtype, device, tokens)
    for b, row in out["transformers"].get("decode", {}).items():
        out["decode"][b]["speedup_vs_transformers"] = round(out["decode"][b]["tok_s"] / row["tok_s"], 3)
    return out


def fast_path_checks(model: GptOssForCausalLM, plan: Plan, graph_tokens: dict) -> dict:
    """Kernels against their reference paths at these shapes; on CUDA, eager decode (no graphs) timed and its
    greedy tokens compared with the graph-replayed ones."""
    device = next(model.parameters()).device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return {"skipped": "the Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"}
    out = {"packed_experts": fast_path_check.check_packed_experts(model),
           "decode_attention": fast_path_check.check_decode_attention(model, plan.ttft_prompt_tokens),
           "prefill_attention": fast_path_check.check_prefill_attention(model, plan.ttft_prompt_tokens)}
    if device.type == "cuda":
        out["expert_kernel_variants"] = fast_path_check.time_expert_variants(model)
        engine = make_engine(model, plan, cuda_graphs=False)
        P, V, b = plan.prompt_tokens, model.config.vocab_size, min(8, max(plan.batches))
        decode_ours(engine, prompts(1, P, V, seed=99), 2)                                   # warm-up
        out["eager_decode_tok_s"] = {str(n): round(decode_ours(engine, prompts(n, P, V, seed=n),
                                                                plan.decode_steps)[0], 2) for n in (1, b)}
        eager_tokens = decode_ours(engine, prompts(b, P, V, seed=b), plan.decode_steps)[1]
        out["cuda_graph_tokens"] = fast_path_check.token_agreement(graph_tokens[b], eager_tokens)
        del engine
        gc.collect()
    return out


def plot(result: dict, path: Path) -> None:
    """Decode tokens/s per batch size, ours against transformers, with the batch-1 roofline; one panel a model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = {name: r for name, r in result["models"].items() if "decode" in r}
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6 * max(1, len(models)), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], models.items()):
        batches = list(r["decode"])
        x = range(len(batches))
        ax.bar([i - 0.2 for i in x], [r["decode"][b]["tok_s"] for b in batches], 0.4, label="epserve, packed MXFP4")
        if "decode" in r["transformers"]:
            ax.bar([i + 0.2 for i in x], [r["transformers"]["decode"][b]["tok_s"] for b in batches], 0.4,
                   label=f"transformers, {result['dtype']} experts")
        ax.axhline(r["roofline_batch1"]["roofline_tok_s"], ls="--", color="gray", label="batch-1 HBM roofline")
        ax.set(xticks=list(x), xticklabels=batches, yscale="log", xlabel="batch", ylabel="decode tokens/s",
               title=f"{name} on {result['device_name']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(plan: Plan, device: torch.device, dtype: torch.dtype, out: Path) -> dict:
    """Every measurement; the summary so far is rewritten to `out` after each model (a timeout keeps the rest)."""
    import transformers
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": str(device), "device_name": name, "dtype": str(dtype).removeprefix("torch."),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "models"},
              "bytes_per_token_formula": BYTES_PER_TOKEN_FORMULA + "; expert weights at 17/32 byte each (MXFP4)"}
    bandwidth = measure_bandwidth(device, plan.bandwidth_bytes)
    result["bandwidth_gb_s"], result["models"] = round(bandwidth / 1e9, 2), {}
    for model_name, spec in plan.models:
        logger.info("%s: building and measuring", model_name)
        result["models"][model_name] = measure_model(spec, plan, dtype, device, bandwidth)
        out.write_text(json.dumps(result, indent=2))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny config: the same code paths in seconds")
    parser.add_argument("--out", default="gpu_check.json", help="JSON summary; the PNG plot goes beside it")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out, start = Path(args.out), time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run(TINY_PLAN if args.tiny else FULL_PLAN, device, dtype, out)
    result.update(tiny=args.tiny, wall_s=round(time.perf_counter() - start, 1), plot=str(out.with_suffix(".png")))
    try:
        plot(result, out.with_suffix(".png"))
    except ImportError as e:                          # the GPU image may lack matplotlib: keep the numbers
        result.update(plot=None, plot_skipped=str(e))
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    main()

"""`python bench/host_overhead.py [--quick]`: what a decode step costs the host, beside the forward, on this machine.

- fill: DecodeMetadata.fill for 64 rows whose tables span 2,048 columns (max_model_len 32k, block 16), per step;
- host: engine step time outside ModelRunner.run (schedule, sample, update, outputs), greedy, batch 1 / 16 / 64;
- decode A/B: decode tok/s of the static decode path (what CUDA graphs replay) against PagedMetadata's decode, one
  process, interleaved runs, best of each (a tiny 4-layer model, 512-token prompts).
Prints one JSON line. CPU numbers; on a GPU the same script shows the host side of a step.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))           # run as a script from anywhere

from engine.engine import EngineConfig, LLMEngine                       # noqa: E402
from engine.sampling_params import SamplingParams                       # noqa: E402
from model import tiny                                                  # noqa: E402
from model.config import ModelConfig                                    # noqa: E402
from model.decode_metadata import DecodeMetadata, table_columns         # noqa: E402
from model.loader import load_model                                     # noqa: E402
from model.paged_attention import PagedKVCache, PagedMetadata, SeqSpan  # noqa: E402

SPEC = tiny.TinySpec(seed=1, layers=4, hidden=256, heads=16, kv_heads=2, head_dim=64, intermediate=256, experts=16,
                     top_k=4, vocab=8192, sliding_window=128, shards=1)


def fill_ms(repeats: int) -> float:
    cfg = ModelConfig.from_hf_dict(tiny.hf_config(SPEC, None))
    cache = PagedKVCache(cfg, {"full": 64 * 130, "sliding": 64 * 10}, 16, torch.float32, "cpu")
    metadata = DecodeMetadata(cache, 64, table_columns(cache, 32768), "cpu")
    spans = [SeqSpan(2000 + i, 1, {"full": list(range(i * 130, i * 130 + 130)),
                                   "sliding": [-1] * 122 + list(range(i * 10, i * 10 + 8))}) for i in range(64)]
    metadata.fill(spans, list(range(64)))
    start = time.perf_counter()
    for _ in range(repeats):
        metadata.fill(spans, list(range(64)))
    return (time.perf_counter() - start) / repeats * 1e3


def engine_for(model, paged_decode: bool) -> LLMEngine:
    engine = LLMEngine(model, EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096, block_size=16,
                                           max_model_len=1024, kv_cache_bytes=512 << 20))
    if paged_decode:                                   # the decode path before DecodeMetadata, for the A/B
        runner = engine.runner

        def decode(spans, token_ids):
            metadata = PagedMetadata(runner.kv_cache, spans, runner.device, impl="torch")
            return model.compute_logits(model(torch.tensor(token_ids), metadata.positions, metadata))
        runner._decode = decode
    return engine


def decode_steps(engine: LLMEngine, batch: int, steps: int, prompt_len: int = 512) -> tuple[float, float]:
    """(seconds per decode step, of which outside runner.run) after every prompt is prefilled."""
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(f"b{i}", torch.randint(0, SPEC.vocab, (prompt_len,), generator=g).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True))
    while engine.scheduler.num_waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                              for s in engine.scheduler.running):
        engine.step()
    run, inside = engine.runner.run, [0.0]

    def timed(b):
        t = time.perf_counter()
        out = run(b)
        inside[0] += time.perf_counter() - t
        return out
    engine.runner.run = timed
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = (time.perf_counter() - start) / steps
    engine.runner.run = run
    for i in range(batch):
        engine.abort(f"b{i}")
    return total, total - inside[0] / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, small batches (a smoke run)")
    args = parser.parse_args(argv)
    steps, repeats, prompt = (3, 1, 64) if args.quick else (30, 3, 512)
    host_batches, ab_batches = ((1, 4), (1, 4)) if args.quick else ((1, 16, 64), (1, 8, 32))
    model = load_model(tiny.write_tiny(Path(tempfile.mkdtemp()) / "m", SPEC))
    result = {"fill_ms_64x2048": round(fill_ms(2 if args.quick else 20), 3), "host_ms": {}, "decode_tok_s": {}}
    static, paged = engine_for(model, False), engine_for(model, True)
    for batch in host_batches:
        result["host_ms"][str(batch)] = round(decode_steps(static, batch, steps, prompt)[1] * 1e3, 3)
    for batch in ab_batches:
        best = {"static": 0.0, "paged": 0.0}
        for _ in range(repeats):
            for name, engine in (("static", static), ("paged", paged)):
                best[name] = max(best[name], batch / decode_steps(engine, batch, steps, prompt)[0])
        result["decode_tok_s"][str(batch)] = {k: round(v, 1) for k, v in best.items()} | {
            "static_over_paged": round(best["static"] / best["paged"], 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

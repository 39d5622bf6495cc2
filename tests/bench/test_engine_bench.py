"""Smoke test of `epserve bench engine` on a tiny model with tiny sizes: the JSON has every key, with positive
numbers, and both implementations produced the same greedy tokens. No timing thresholds (CI machines vary)."""
import json

import pytest
import torch

from bench import engine_bench
from bench.roofline import bytes_per_token
from model.config import ModelConfig
from model.tiny import TinySpec, hf_config

TINY = TinySpec(seed=0, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=64, experts=4, top_k=2,
                vocab=512, sliding_window=8, shards=1)
CONFIG = engine_bench.BenchConfig(model=TINY, prompt_tokens=12, decode_steps=3, repeats=1, roofline_model=TINY,
                                  roofline_steps=3, concurrency=(1, 3), short_prompt_tokens=4,
                                  roofline_prompt_tokens=6, bandwidth_bytes=4 << 20)


@pytest.fixture(scope="module")
def result():
    return json.loads(json.dumps(engine_bench.run(CONFIG, threads=1)))      # JSON-able


def test_throughput_keys_positive_and_same_tokens(result):
    assert result["torch_threads"] == 1 and result["cpu_cores"] >= 1
    tp = result["throughput"]
    assert tp["prompt_tokens"] == 12 and tp["model"]["hidden"] == 64
    assert set(tp["concurrency"]) == {"1", "3"}
    for row in list(tp["concurrency"].values()) + [tp["short_prompt"]]:
        for key in ("ours_tok_s", "transformers_tok_s", "ratio"):
            assert row[key] > 0, key
        assert row["ratio"] == pytest.approx(row["ours_tok_s"] / row["transformers_tok_s"], rel=0.02)
        assert row["outputs_match"] == 1.0                  # fp32, greedy: the same work on both sides
    assert tp["short_prompt"]["prompt_tokens"] == 4


def test_roofline_keys_positive_and_consistent(result):
    rf = result["roofline"]
    for key in ("bandwidth_gb_s", "bytes_per_token_mb", "decode_tok_s", "achieved_gb_s", "roofline_tok_s",
                "fraction"):
        assert rf[key] > 0, key
    assert rf["fraction"] == pytest.approx(rf["decode_tok_s"] / rf["roofline_tok_s"], rel=0.05, abs=1e-3)


def test_bytes_per_token_counts_weights_top_k_experts_and_kv():
    cfg = ModelConfig.from_hf_dict(hf_config(TINY, 0))
    H, I, V, kvd = 64, 64, 512, 2 * 16
    expert = (H * 2 * I + 2 * I) + (I * H + H)
    at_0 = bytes_per_token(cfg, torch.float32, range(0, 1))
    at_9 = bytes_per_token(cfg, torch.float32, range(9, 10))
    # position 9 reads 10 keys on the full layer and 8 (the window) on the sliding one; position 0 reads 1 each
    assert at_9 - at_0 == 2 * kvd * 4 * ((10 - 1) + (8 - 1))
    assert at_0 > 2 * 2 * expert * 4 + V * H * 4                       # top-2 experts of 2 layers + lm_head
    assert at_0 < 2 * 4 * expert * 4 + V * H * 4 + 2 * 100_000        # not all 4 experts


def test_cli_verb_parses():
    from deploy.cli import build_parser, cmd_bench_engine
    args = build_parser().parse_args(["bench", "engine", "--quick"])
    assert args.func is cmd_bench_engine and args.quick
    assert not build_parser().parse_args(["bench", "engine"]).quick

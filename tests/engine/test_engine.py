"""LLMEngine end to end on a tiny checkpoint: exact greedy outputs against transformers, preemption, aborts."""
import asyncio
import dataclasses
import random

import pytest
import torch
from transformers import GptOssForCausalLM, Mxfp4Config

from engine.config import FULL, SLIDING
from engine.engine import EngineConfig, LLMEngine
from engine.kv_budget import kv_bytes_for
from engine.sampling_params import SamplingParams

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def hf_greedy(tiny_model_dir, ragged_prompts):
    """transformers' greedy continuation of each prompt (its own generate(), KV cache, eager everything)."""
    hf = GptOssForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager",
                                           quantization_config=Mxfp4Config(dequantize=True),
                                           experts_implementation="eager").eval()
    outs = []
    for p in ragged_prompts:
        ids = torch.tensor([p])
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        outs.append(gen[0, len(p):].tolist())
    return outs


def greedy(**kw):
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def all_free(engine):
    bm = engine.block_manager
    return all(bm.num_free_blocks(g) == bm.num_total_blocks(g) for g in (FULL, SLIDING))


def test_concurrent_ragged_greedy_equals_transformers(tiny_model, ragged_prompts, hf_greedy):
    engine = LLMEngine(tiny_model, EngineConfig(max_num_seqs=24, max_num_batched_tokens=96, block_size=4,
                                                max_model_len=256))
    results = engine.generate(ragged_prompts, greedy())
    got = [r[0].output_token_ids for r in results]
    assert got == hf_greedy
    assert all(r[0].finish_reason == "length" for r in results)
    assert all_free(engine)


def test_tiny_kv_budget_preempts_and_stays_exact(tiny_model, ragged_prompts, hf_greedy):
    config = EngineConfig(max_num_seqs=24, max_num_batched_tokens=64, block_size=4, max_model_len=256)
    cfg = tiny_model.config
    budget = kv_bytes_for(cfg, torch.float32, 4, 24, 64, 70)                     # 70 full blocks: 280 tokens in all
    engine = LLMEngine(tiny_model, dataclasses.replace(config, kv_cache_bytes=budget))
    assert engine.block_manager.num_total_blocks(FULL) == 70
    results = engine.generate(ragged_prompts, greedy())
    assert engine.scheduler.num_preemptions > 0
    assert [r[0].output_token_ids for r in results] == hf_greedy
    assert all_free(engine)


def test_random_add_abort_stress_frees_every_block(tiny_model):
    rng = random.Random(0)
    engine = LLMEngine(tiny_model, EngineConfig(max_num_seqs=16, max_num_batched_tokens=64, block_size=4,
                                                max_model_len=128, enable_prefix_caching=True))
    live, n = [], 0
    for _ in range(300):
        engine.add_request(f"r{n}", [rng.randrange(1024) for _ in range(rng.randint(1, 40))],
                           SamplingParams(max_tokens=rng.randint(1, 8), n=rng.choice([1, 1, 2]), seed=n))
        live.append(f"r{n}")
        n += 1
        if rng.random() < 0.3:
            engine.abort(live.pop(rng.randrange(len(live))))
        if rng.random() < 0.5:
            engine.step()
    while engine.has_unfinished():
        engine.step()
    assert all_free(engine)


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_model, ragged_prompts):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=5, seed=42, ignore_eos=True)
    config = EngineConfig(block_size=4, max_model_len=4096)
    alone = LLMEngine(tiny_model, config).generate([ragged_prompts[10]], params)[0][0]
    crowd = LLMEngine(tiny_model, config).generate(
        ragged_prompts[5:15], [SamplingParams(temperature=0.7, max_tokens=5)] * 5 + [params]
        + [SamplingParams(temperature=1.3, max_tokens=5)] * 4)[5][0]
    assert alone.output_token_ids == crowd.output_token_ids


def test_n_completions_and_logprobs(tiny_model, ragged_prompts):
    engine = LLMEngine(tiny_model, EngineConfig(block_size=4, max_model_len=4096))
    outs = engine.generate([ragged_prompts[3]], SamplingParams(max_tokens=4, n=3, seed=1, logprobs=2,
                                                                ignore_eos=True))[0]
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.output_token_ids) for o in outs}) > 1       # different seeds per completion


def test_stream_and_disconnect_abort(tiny_model, ragged_prompts):
    engine = LLMEngine(tiny_model, EngineConfig(block_size=4, max_model_len=4096))

    async def main():
        got = [o.new_token_ids[0] async for o in engine.stream("a", ragged_prompts[20], greedy())]
        agen = engine.stream("b", ragged_prompts[21], SamplingParams(max_tokens=50, ignore_eos=True))
        first = await agen.__anext__()
        await agen.aclose()                                          # the client went away
        return got, first
    got, first = asyncio.run(main())
    assert len(got) == MAX_TOKENS and len(first.new_token_ids) == 1
    assert not engine.has_unfinished() and all_free(engine)


def test_outputs_carry_the_whole_output_only_when_finished(tiny_model, ragged_prompts):
    """Per step a sequence's TokenOutput holds its new token and a count (O(1), also through Ray between EP ranks
    and the replica); the final one holds every generated token, equal to the new tokens streamed."""
    engine = LLMEngine(tiny_model, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=4,
                                                max_model_len=256))
    for i in range(3):
        engine.add_request(f"r{i}", ragged_prompts[i + 5], greedy())
    streamed, final = {f"r{i}": [] for i in range(3)}, {}
    while engine.has_unfinished():
        for out in engine.step():
            streamed[out.request_id] += out.new_token_ids
            assert out.num_output_tokens == len(streamed[out.request_id])
            if out.finished:
                final[out.request_id] = out.output_token_ids
            else:
                assert out.output_token_ids == [] and out.output_text is None
    assert final == streamed and all(len(v) == MAX_TOKENS for v in final.values())

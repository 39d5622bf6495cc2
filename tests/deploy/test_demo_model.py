"""The committed demo checkpoint (deploy/demo_model): exact layout, equal logits in our loader and transformers,
correct greedy answers through the engine; and the trainer: padded-batch attention, determinism, learning."""
import json
import random
from pathlib import Path

import pytest
import torch

from deploy import demo_tasks
from deploy.demo_trainer import PaddedBatchMetadata, TrainConfig, build_model, evaluate, train_model
from deploy.tokenizer import Tokenizer
from engine.engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from model.loader import load_model
from model.tiny import TinySpec
from model.tiny_tokenizer import write_tokenizer_files

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "demo_model"
TINY_ARCH = TinySpec(layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=32, experts=4, top_k=2,
                     vocab=512, sliding_window=4, shards=1)


@pytest.fixture(scope="module")
def demo_model():
    return load_model(DEMO, torch.float32)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_model_dir(DEMO)


def test_checkpoint_files_and_size():
    files = {p.name for p in DEMO.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "README.md"} <= files
    index = json.loads((DEMO / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p for p in files if p.endswith(".safetensors")}
    assert "model.layers.1.mlp.experts.down_proj_blocks" in index["weight_map"]            # MXFP4 experts
    assert json.loads((DEMO / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    assert sum(p.stat().st_size for p in DEMO.iterdir()) < 5 * 2**20


def test_logits_equal_transformers(demo_model, tok):
    from transformers import GptOssForCausalLM, Mxfp4Config
    hf = GptOssForCausalLM.from_pretrained(DEMO, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True),
                                           attn_implementation="eager").eval()
    ex = demo_tasks.Example("reverse", "Reverse the word apple.", "", "")
    text = demo_tasks.prompt_text(ex, demo_tasks.system_message()) + "<|channel|>analysis<|message|>The letters"
    ids = torch.tensor(tok.encode(text))
    assert len(ids) > 2 * demo_model.config.sliding_window                             # past the window
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    ours = demo_model.prefix_logits(ids)
    assert ref.abs().max() > 1.0 and (ours - ref).abs().max().item() < 2e-4


def test_greedy_answers_through_the_engine(demo_model, tok):
    rng = random.Random(7)                                                            # not the training streams
    examples = [demo_tasks.sample(rng) for _ in range(20)]
    prompts = [tok.encode(demo_tasks.prompt_text(ex, demo_tasks.system_message() if i % 2 else ""))
               for i, ex in enumerate(examples)]
    engine = LLMEngine(demo_model, EngineConfig(max_num_seqs=20))
    params = SamplingParams(temperature=0, max_tokens=80, stop_token_ids=[tok.token_id("<|return|>")])
    outputs = engine.generate(prompts, params)
    answers = [demo_tasks.parse_final(tok.decode(out[0].output_token_ids)) for out in outputs]
    correct = sum(a == ex.answer for a, ex in zip(answers, examples))
    assert correct >= 18, list(zip(answers, [ex.answer for ex in examples]))
    assert all(out[0].output_token_ids[-1] == tok.token_id("<|return|>") for out in outputs)


def test_evaluate_measures_accuracy():
    assert evaluate(DEMO, n=20, seed=11) >= 0.9


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d, TINY_ARCH.vocab, demo_tasks.tokenizer_text())
    return Tokenizer(d / "tokenizer.json")


def test_padded_batch_attention_equals_one_sequence_at_a_time():
    torch.manual_seed(0)
    model = build_model(TINY_ARCH).eval()
    lengths = torch.tensor([9, 3, 12])                                                 # > window 4 (layer 0)
    ids = torch.randint(0, TINY_ARCH.vocab, (3, 12))
    meta = PaddedBatchMetadata(lengths, 12)
    with torch.no_grad():
        batched = model.compute_logits(model(ids.flatten(), meta.positions, meta)).view(3, 12, -1)
    for b, n in enumerate(lengths.tolist()):
        assert torch.allclose(batched[b, :n], model.prefix_logits(ids[b, :n]), atol=1e-5)


def test_training_learns_and_is_deterministic(tiny_tok):
    cfg = TrainConfig(seed=3, steps=24, batch_size=8, lr=3e-3, warmup_steps=4, qat_fraction=0.3, bucket=2,
                      arch=TINY_ARCH)
    model, losses = train_model(cfg, tiny_tok, log_every=8)
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4                          # from ~ln(512) = 6.2
    assert train_model(cfg, tiny_tok, log_every=8)[1] == losses                       # bit-identical rerun
    other = TrainConfig(**{**cfg.__dict__, "seed": 4, "steps": 2})
    assert train_model(other, tiny_tok)[1] != losses[:2]                              # the seed matters
    assert not model.model.layers[0].mlp.experts.fake_quant                           # QAT switched back off

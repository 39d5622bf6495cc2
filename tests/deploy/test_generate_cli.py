"""`epserve generate`: concurrent prompts through the engine, outputs in input order, user errors exit 2."""
import json
import subprocess
import sys

import pytest

from deploy.tokenizer import Tokenizer
from engine.engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from model.loader import load_model
from model.tiny import TinySpec, write_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("gen") / "m", TinySpec(seed=4, vocab=1024))


def epserve(*args):
    return subprocess.run([sys.executable, "-m", "deploy.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_outputs_in_input_order_equal_the_engine(tiny, tmp_path):
    tok = Tokenizer.from_model_dir(tiny)
    prompts = [{"prompt_ids": [5, 6, 7]}, {"prompt": "<|start|>user<|message|>Add 2 and 3.<|end|><|start|>assistant"},
               {"prompt_ids": list(range(40, 90))}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    r = epserve("generate", tiny, "--prompts", tmp_path / "p.jsonl", "--max-tokens", 5, "--temperature", 0,
                "--out", tmp_path / "o.jsonl")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 1, 2]
    ids = [prompts[0]["prompt_ids"], tok.encode(prompts[1]["prompt"]), prompts[2]["prompt_ids"]]
    assert tok.encode(prompts[1]["prompt"])[0] == tok.token_id("<|start|>")         # specials are single ids
    stop = set(tok.harmony_stop_ids())
    engine = LLMEngine(load_model(tiny), EngineConfig(max_model_len=4096), eos_token_ids=stop)
    for line, p in zip(lines, ids):
        ref = engine.generate([p], SamplingParams(temperature=0.0, max_tokens=5))[0][0]
        assert line["output_ids"] == ref.output_token_ids
        assert line["finish_reason"] == ref.finish_reason
        assert line["text"] == tok.decode(ref.output_token_ids)


@pytest.mark.parametrize("content, needle", [
    ('{"prompt_ids": [1, 2]}\nnot json\n', "p.jsonl:2"),
    ('{"nothing": 1}\n', "prompt_ids"),
    ('{"prompt_ids": [1, 99999]}\n', "outside [0, 1024)"),
])
def test_bad_prompt_files(tiny, tmp_path, content, needle):
    (tmp_path / "p.jsonl").write_text(content)
    r = epserve("generate", tiny, "--prompts", tmp_path / "p.jsonl")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


def test_text_prompt_without_tokenizer(tiny, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny.iterdir():
        if f.is_file() and f.name != "tokenizer.json":
            (bare / f.name).write_bytes(f.read_bytes())
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\n')
    r = epserve("generate", bare, "--prompts", tmp_path / "p.jsonl")
    assert r.returncode == 2 and "tokenizer.json" in r.stderr, r.stderr


def test_bad_sampling_flag(tiny, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt_ids": [1]}\n')
    r = epserve("generate", tiny, "--prompts", tmp_path / "p.jsonl", "--temperature", -1)
    assert r.returncode == 2 and "temperature" in r.stderr, r.stderr


def test_packed_experts_give_the_dense_outputs(tiny, tmp_path):
    """--experts packed keeps the MXFP4 bytes in memory (the GPU default for MXFP4 checkpoints); on CPU its loop path
    dequantises per hit expert: the same greedy tokens as dense experts."""
    prompts = [{"prompt_ids": [5, 6, 7]}, {"prompt_ids": list(range(40, 90))}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    outs = {}
    for experts in ("dense", "packed"):
        r = epserve("generate", tiny, "--prompts", tmp_path / "p.jsonl", "--max-tokens", 6, "--temperature", 0,
                    "--experts", experts, "--out", tmp_path / f"{experts}.jsonl")
        assert r.returncode == 0, r.stderr
        outs[experts] = [json.loads(x)["output_ids"] for x in (tmp_path / f"{experts}.jsonl").read_text().splitlines()]
    assert outs["packed"] == outs["dense"] and all(len(o) == 6 for o in outs["dense"])


def test_packed_experts_need_an_mxfp4_checkpoint(tmp_path):
    bf16 = write_tiny(tmp_path / "bf16", TinySpec(seed=4, vocab=1024, experts_format="bf16"))
    (tmp_path / "p.jsonl").write_text('{"prompt_ids": [1, 2]}\n')
    r = epserve("generate", bf16, "--prompts", tmp_path / "p.jsonl", "--experts", "packed")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "MXFP4" in r.stderr, r.stderr


def one_line_error(r, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_kv_flags_reach_the_engine(tiny, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt_ids": [1, 2, 3]}\n')
    r = epserve("generate", tiny, "--prompts", tmp_path / "p.jsonl", "--kv-cache-memory", "8MiB", "--max-model-len",
                300, "--max-tokens", 2)
    assert r.returncode == 0, r.stderr
    assert "max_model_len 300," in r.stderr and "kv_cache_memory=8.0 MiB" in r.stderr, r.stderr


@pytest.mark.parametrize("flags, needles", [
    (("--kv-cache-memory", "1MiB", "--max-model-len", 100000), ("max_model_len=100000 does not fit",
                                                               "largest max_model_len that fits is 1504;")),
    (("--kv-cache-memory", "40KiB"), ("cannot hold the sliding-window pool", "lower max_num_seqs")),
    (("--kv-cache-memory", "lots"), ("--kv-cache-memory", "2GiB, 512MiB")),
    (("--gpu-memory-utilization", 1.5), ("gpu_memory_utilization is a fraction",)),
])
def test_kv_that_does_not_fit_is_one_line_and_exit_2(tiny, tmp_path, flags, needles):
    """The engine's ValueError at start (the KV budget or max_model_len) is a user error, not a traceback."""
    (tmp_path / "p.jsonl").write_text('{"prompt_ids": [1, 2, 3]}\n')
    one_line_error(epserve("generate", tiny, "--prompts", tmp_path / "p.jsonl", *flags), *needles)

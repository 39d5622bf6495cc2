"""`epserve make-tiny` and `epserve logits`, and their user errors: one line on stderr, exit code 2."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.loader import load_model


def epserve(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "deploy.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    r = epserve("make-tiny", out, "--seed", 7, "--layers", 2, "--experts", 3, "--top-k", 2, "--vocab", 1000)
    assert r.returncode == 0, r.stderr
    return out


def test_make_tiny_flags_reach_the_config(tiny):
    config = json.loads((tiny / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_local_experts"], config["num_experts_per_tok"],
            config["vocab_size"]) == (2, 3, 2, 1000)


def test_logits_writes_the_full_prefix_forward(tiny, tmp_path):
    out = tmp_path / "l.npy"
    r = epserve("logits", tiny, "--ids", "1,2,3,500", "--out", out)
    assert r.returncode == 0, r.stderr
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (4, 1000)
    ref = load_model(tiny).prefix_logits(torch.tensor([1, 2, 3, 500]))
    assert np.array_equal(logits, ref.numpy())


def test_logits_needs_no_tokenizer(tiny, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny.iterdir():
        if f.is_file() and not f.name.startswith(("tokenizer", "special_tokens")):
            (bare / f.name).write_bytes(f.read_bytes())
    r = epserve("logits", bare, "--ids", "5", "--out", tmp_path / "x.npy", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "x.npy").dtype == np.float32


def assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_token_id_out_of_range(tiny, tmp_path):
    assert_user_error(epserve("logits", tiny, "--ids", "1,1000", "--out", tmp_path / "o.npy"), "1000", "vocab_size")


def test_bad_ids_and_bad_flags(tiny, tmp_path):
    assert_user_error(epserve("logits", tiny, "--ids", "1,x", "--out", tmp_path / "o.npy"), "--ids")
    assert_user_error(epserve("logits", tiny, "--ids", "1", "--out", tmp_path / "o.npy", "--dtype", "fp8"), "fp8")


def test_missing_shard(tiny, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    last = sorted(tiny.glob("model-*.safetensors"))[-1]
    for f in tiny.iterdir():
        if f.is_file() and f != last:
            (broken / f.name).write_bytes(f.read_bytes())
    assert_user_error(epserve("logits", broken, "--ids", "1", "--out", tmp_path / "o.npy"), last.name)


@pytest.mark.parametrize("change, needle", [
    ({"quantization_config": {"quant_method": "awq"}}, "'awq'"),
    ({"model_type": "mixtral"}, "'mixtral'"),
])
def test_unsupported_config(tiny, tmp_path, change, needle):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, **change}))
    assert_user_error(epserve("logits", broken, "--ids", "1", "--out", tmp_path / "o.npy"), needle, "config")


def test_missing_model_dir(tmp_path):
    assert_user_error(epserve("logits", tmp_path / "nope", "--ids", "1", "--out", tmp_path / "o.npy"), "nope")


def test_make_tiny_rejects_bad_spec(tmp_path):
    assert_user_error(epserve("make-tiny", tmp_path / "t", "--hidden", 48), "hidden")

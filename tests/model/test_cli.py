"""`epserve make-tiny` and `epserve logits`, and their user errors: one line on stderr, exit code 2."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.loader import dtype_name, load_model
from model.moe import LocalExperts
from model.packed_experts import PackedMXFP4Experts


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
    """Defaults on CPU: float32 and the MXFP4 experts kept packed; the dense experts give the same logits."""
    out = tmp_path / "l.npy"
    r = epserve("logits", tiny, "--ids", "1,2,3,500", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "(float32 weights, packed experts)" in r.stdout, r.stdout
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (4, 1000)
    ids = torch.tensor([1, 2, 3, 500])
    assert np.array_equal(logits, load_model(tiny).prefix_logits(ids).numpy())
    dense = load_model(tiny, experts="dense").prefix_logits(ids).numpy()
    assert np.abs(logits - dense).max() < 1e-5                # the same weights; fp32 rounding of another matmul order
    r = epserve("logits", tiny, "--ids", "1,2,3,500", "--out", tmp_path / "d.npy", "--experts", "dense")
    assert "(float32 weights, dense experts)" in r.stdout and np.array_equal(np.load(tmp_path / "d.npy"), dense)


def test_load_model_keeps_mxfp4_experts_packed_unless_dense_is_asked(tiny):
    packed, dense = load_model(tiny), load_model(tiny, experts="dense")
    assert all(isinstance(layer.mlp.experts, PackedMXFP4Experts) for layer in packed.model.layers)
    assert not any(".experts." in name for name, _ in packed.named_parameters())    # no dense expert weights built
    assert all(isinstance(layer.mlp.experts, LocalExperts) for layer in dense.model.layers)
    ranged = load_model(tiny, expert_range=(1, 3))
    assert (ranged.model.layers[1].mlp.experts.first_expert, ranged.model.layers[1].mlp.experts.num_experts) == (1, 2)


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_on_cuda():
    assert (dtype_name("auto", "cpu"), dtype_name("auto", "cuda"), dtype_name("auto", "cuda:1")) == (
        "float32", "bfloat16", "bfloat16")
    assert dtype_name("float32", "cuda") == "float32"


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


# gpt-oss-120b's attention geometry, from its config.json (gpt-oss-spec.md §1.1), written out independently.
GPT_OSS_120B_ATTENTION = {
    "num_hidden_layers": 36, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
    "sliding_window": 128, "vocab_size": 201088, "max_position_embeddings": 131072, "rope_theta": 150000,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "layer_types": ["sliding_attention", "full_attention"] * 18,
}


def test_make_tiny_preset_has_120b_attention_geometry_and_stays_small(tmp_path):
    out = tmp_path / "t120"
    r = epserve("make-tiny", out, "--preset", "120b-attention", "--experts", 4, "--top-k", 2, "--shards", 1)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in GPT_OSS_120B_ATTENTION} == GPT_OSS_120B_ATTENTION
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)        # flags override the preset
    assert config["hidden_size"] <= 128 and config["intermediate_size"] <= 128
    original = json.loads((out / "original" / "config.json").read_text())
    assert (original["num_hidden_layers"], original["num_key_value_heads"], original["sliding_window"],
            original["vocab_size"], original["initial_context_length"]) == (36, 8, 128, 201088, 4096)
    on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert on_disk < 250 << 20, on_disk                       # the two [201088, 64] matrices, in both layouts

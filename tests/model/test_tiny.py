"""The tiny-checkpoint writer: exact HF / original/ layout (gpt-oss-spec.md §1.1, §3), weights, tokenizer."""
from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from model import mxfp4
from model.errors import UserError
from model.tiny import PRESETS, TinySpec, tiny_spec, write_tiny
from model.tiny_tokenizer import SPECIAL_TOKENS

REPO = Path(__file__).resolve().parents[2]
SPECS = {
    "mx": TinySpec(),
    "bf": TinySpec(experts_format="bf16"),
    "odd": TinySpec(seed=7, layers=3, hidden=96, heads=6, kv_heads=2, head_dim=8, intermediate=32, experts=5,
                    top_k=5, vocab=700, sliding_window=5, shards=1),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    return {key: write_tiny(tmp_path_factory.mktemp(key), spec) for key, spec in SPECS.items()}


def header(path: Path) -> dict:
    """The safetensors JSON header, read by hand: 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def shard_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in shard_files(d):
        out.update(load_file(path))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # bitwise: tells -0.0 from +0.0


def expected_hf(spec: TinySpec) -> dict[str, tuple[list[int], str]]:
    """Spec §3.2 / §3.3 table, written out independently of model/tiny.py."""
    V, H, D, E, I = spec.vocab, spec.hidden, spec.head_dim, spec.experts, spec.intermediate
    q, kv = spec.heads * D, spec.kv_heads * D
    out = {"model.embed_tokens.weight": ([V, H], "BF16"), "model.norm.weight": ([H], "BF16"),
           "lm_head.weight": ([V, H], "BF16")}
    for n in range(spec.layers):
        p = f"model.layers.{n}."
        layer = {"input_layernorm.weight": [H], "post_attention_layernorm.weight": [H],
                 "self_attn.q_proj.weight": [q, H], "self_attn.q_proj.bias": [q],
                 "self_attn.k_proj.weight": [kv, H], "self_attn.k_proj.bias": [kv],
                 "self_attn.v_proj.weight": [kv, H], "self_attn.v_proj.bias": [kv],
                 "self_attn.o_proj.weight": [H, q], "self_attn.o_proj.bias": [H], "self_attn.sinks": [spec.heads],
                 "mlp.router.weight": [E, H], "mlp.router.bias": [E],
                 "mlp.experts.gate_up_proj_bias": [E, 2 * I], "mlp.experts.down_proj_bias": [E, H]}
        out.update({p + k: (v, "BF16") for k, v in layer.items()})
        if spec.experts_format == "mxfp4":
            out[p + "mlp.experts.gate_up_proj_blocks"] = ([E, 2 * I, H // 32, 16], "U8")
            out[p + "mlp.experts.gate_up_proj_scales"] = ([E, 2 * I, H // 32], "U8")
            out[p + "mlp.experts.down_proj_blocks"] = ([E, H, I // 32, 16], "U8")
            out[p + "mlp.experts.down_proj_scales"] = ([E, H, I // 32], "U8")
        else:
            out[p + "mlp.experts.gate_up_proj"] = ([E, H, 2 * I], "BF16")
            out[p + "mlp.experts.down_proj"] = ([E, I, H], "BF16")
    return out


def expected_original(spec: TinySpec) -> dict[str, tuple[list[int], str]]:
    V, H, D, E, I = spec.vocab, spec.hidden, spec.head_dim, spec.experts, spec.intermediate
    qkv = (spec.heads + 2 * spec.kv_heads) * D
    out = {"embedding.weight": ([V, H], "BF16"), "norm.scale": ([H], "BF16"), "unembedding.weight": ([V, H], "BF16")}
    for n in range(spec.layers):
        b = f"block.{n}."
        out.update({b + k: v for k, v in {
            "attn.norm.scale": ([H], "BF16"), "attn.qkv.weight": ([qkv, H], "BF16"), "attn.qkv.bias": ([qkv], "BF16"),
            "attn.sinks": ([spec.heads], "BF16"), "attn.out.weight": ([H, spec.heads * D], "BF16"),
            "attn.out.bias": ([H], "BF16"), "mlp.norm.scale": ([H], "BF16"), "mlp.gate.weight": ([E, H], "BF16"),
            "mlp.gate.bias": ([E], "BF16"), "mlp.mlp1_weight.blocks": ([E, 2 * I, H // 32, 16], "FP4"),
            "mlp.mlp1_weight.scales": ([E, 2 * I, H // 32], "UE8"), "mlp.mlp1_bias": ([E, 2 * I], "BF16"),
            "mlp.mlp2_weight.blocks": ([E, H, I // 32, 16], "FP4"), "mlp.mlp2_weight.scales": ([E, H, I // 32], "UE8"),
            "mlp.mlp2_bias": ([E, H], "BF16")}.items()})
    return out


def test_file_sets_use_the_real_shard_names(dirs):
    hf_files = {"model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors", "model.safetensors.index.json"}
    common = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "original"}
    assert {p.name for p in dirs["mx"].iterdir()} == common | hf_files
    assert {p.name for p in (dirs["mx"] / "original").iterdir()} == {
        "config.json", "dtypes.json", "model.safetensors.index.json", "model--00001-of-00003.safetensors",
        "model--00002-of-00003.safetensors", "model--00003-of-00003.safetensors"}
    assert {p.name for p in dirs["odd"].iterdir()} == common | {"model-00000-of-00000.safetensors",
                                                                 "model.safetensors.index.json"}
    assert {p.name for p in (dirs["odd"] / "original").iterdir()} == {"config.json", "dtypes.json",
                                                                        "model.safetensors"}


@pytest.mark.parametrize("key,sub", [("mx", ""), ("mx", "original"), ("bf", ""), ("bf", "original"), ("odd", ""),
                                     ("odd", "original")])
def test_index_covers_exactly_the_shards_without_metadata(dirs, key, sub):
    d, seen, total = dirs[key] / sub, {}, 0
    for path in shard_files(d):
        head = header(path)
        assert "__metadata__" not in head, path.name
        for name, info in head.items():
            lo, hi = info["data_offsets"]
            assert hi - lo == torch.Size(info["shape"]).numel() * (2 if info["dtype"] == "BF16" else 1)
            seen[name], total = path.name, total + hi - lo
    if key == "odd" and sub == "original":  # one shard: a single model.safetensors without index, like 20b
        assert list(set(seen.values())) == ["model.safetensors"]
        return
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": total}, "weight_map": seen}


def test_layers_straddle_shards(dirs):
    for sub, prefix in (("", "model.layers."), ("original", "block.")):
        weight_map = json.loads((dirs["mx"] / sub / "model.safetensors.index.json").read_text())["weight_map"]
        files_of_layer = {}
        for name, file in weight_map.items():
            if name.startswith(prefix):
                files_of_layer.setdefault(name.split(".")[len(prefix.split(".")) - 1], set()).add(file)
        assert any(len(files) > 1 for files in files_of_layer.values()), sub


@pytest.mark.parametrize("key", list(SPECS))
def test_tensor_names_shapes_dtypes(dirs, key):
    for sub, expected in (("", expected_hf(SPECS[key])), ("original", expected_original(SPECS[key]))):
        found = {}
        for path in shard_files(dirs[key] / sub):
            found.update({name: (info["shape"], info["dtype"]) for name, info in header(path).items()})
        if sub:
            dtypes = json.loads((dirs[key] / "original" / "dtypes.json").read_text())
            assert dtypes == {name: dtype for name, (_, dtype) in expected.items()}
            expected = {name: (shape, "U8" if dtype != "BF16" else dtype) for name, (shape, dtype) in expected.items()}
        assert found == expected


@pytest.mark.parametrize("key", list(SPECS))
def test_config_json(dirs, key):
    spec, d = SPECS[key], dirs[key]
    text = (d / "config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    keys = {"architectures", "attention_bias", "attention_dropout", "eos_token_id", "experts_per_token", "head_dim",
            "hidden_act", "hidden_size", "initial_context_length", "initializer_range", "intermediate_size",
            "layer_types", "max_position_embeddings", "model_type", "num_attention_heads", "num_experts_per_tok",
            "num_hidden_layers", "num_key_value_heads", "num_local_experts", "output_router_logits", "pad_token_id",
            "rms_norm_eps", "rope_scaling", "rope_theta", "router_aux_loss_coef", "sliding_window", "swiglu_limit",
            "tie_word_embeddings", "transformers_version", "use_cache", "vocab_size"}
    assert set(config) == keys | ({"quantization_config"} if spec.experts_format == "mxfp4" else set())
    if spec.experts_format == "mxfp4":
        assert config["quantization_config"] == {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    assert config["experts_per_token"] == config["num_experts_per_tok"] == spec.top_k
    assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"][:spec.layers]
    assert config["eos_token_id"] == tok.token_to_id("<|return|>") and config["pad_token_id"] is None
    assert config["rope_scaling"] == {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "rope_type": "yarn",
                                      "original_max_position_embeddings": 4096, "truncate": False}
    assert (config["num_local_experts"], config["vocab_size"], config["sliding_window"], config["head_dim"]) == (
        spec.experts, spec.vocab, spec.sliding_window, spec.head_dim)
    generation = json.loads((d / "generation_config.json").read_text())
    ids = [tok.token_to_id(s) for s in ("<|startoftext|>", "<|return|>", "<|endoftext|>", "<|call|>")]
    assert generation == {"bos_token_id": ids[0], "do_sample": True, "eos_token_id": ids[1:],
                          "pad_token_id": ids[2], "transformers_version": "4.55.0.dev0"}


def test_original_config(dirs):
    spec = SPECS["odd"]
    config = json.loads((dirs["odd"] / "original" / "config.json").read_text())
    assert list(config.items()) == [
        ("num_hidden_layers", 3), ("num_experts", 5), ("experts_per_token", 5), ("vocab_size", 700),
        ("hidden_size", 96), ("intermediate_size", 32), ("swiglu_limit", 7.0), ("head_dim", 8),
        ("num_attention_heads", 6), ("num_key_value_heads", 2), ("sliding_window", spec.sliding_window),
        ("initial_context_length", 4096), ("rope_theta", 150000), ("rope_scaling_factor", 32.0),
        ("rope_ntk_alpha", 1), ("rope_ntk_beta", 32)]


@pytest.mark.parametrize("key", ["mx", "odd"])
def test_transformers_reads_the_config(dirs, key):
    import transformers
    spec = SPECS[key]
    config = transformers.GptOssConfig.from_pretrained(dirs[key])
    assert (config.num_local_experts, config.num_experts_per_tok, config.sliding_window) == (
        spec.experts, spec.top_k, spec.sliding_window)
    assert config.layer_types == spec.layer_types
    rope = config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["beta_fast"], rope["beta_slow"], rope["truncate"]) == (
        "yarn", 32.0, 32.0, 1.0, False)
    assert (rope["original_max_position_embeddings"], rope["rope_theta"]) == (4096, 150000)


def test_bf16_experts_are_the_dequantized_mxfp4_transposed(dirs):
    mx, bf = tensors(dirs["mx"]), tensors(dirs["bf"])
    for name, value in bf.items():
        if name.endswith(("gate_up_proj", "down_proj")):
            dense = mxfp4.dequantize(mx[name + "_blocks"], mx[name + "_scales"], torch.bfloat16)
            assert torch.equal(bits(value), bits(dense.transpose(1, 2).contiguous())), name
        else:
            assert torch.equal(bits(value), bits(mx[name])), name
    assert len(mx) - len(bf) == 2 * SPECS["mx"].layers
    for path in shard_files(dirs["mx"] / "original"):  # original/ is MXFP4 for both formats
        assert path.read_bytes() == (dirs["bf"] / "original" / path.name).read_bytes()


def test_original_tensors_equal_hf(dirs):
    hf, orig = tensors(dirs["mx"]), tensors(dirs["mx"] / "original")
    renames = {"attn.norm.scale": "input_layernorm.weight", "attn.sinks": "self_attn.sinks",
               "attn.out.weight": "self_attn.o_proj.weight", "attn.out.bias": "self_attn.o_proj.bias",
               "mlp.norm.scale": "post_attention_layernorm.weight", "mlp.gate.weight": "mlp.router.weight",
               "mlp.gate.bias": "mlp.router.bias"}
    for mlp, proj in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
        renames.update({f"mlp.{mlp}_weight.blocks": f"mlp.experts.{proj}_blocks",
                        f"mlp.{mlp}_weight.scales": f"mlp.experts.{proj}_scales",
                        f"mlp.{mlp}_bias": f"mlp.experts.{proj}_bias"})
    pairs = [("embedding.weight", "model.embed_tokens.weight"), ("norm.scale", "model.norm.weight"),
             ("unembedding.weight", "lm_head.weight")]
    for n in range(SPECS["mx"].layers):
        pairs += [(f"block.{n}.{o}", f"model.layers.{n}.{h}") for o, h in renames.items()]
        for kind in ("weight", "bias"):
            q, k, v = (hf[f"model.layers.{n}.self_attn.{x}_proj.{kind}"] for x in "qkv")
            assert torch.equal(bits(orig[f"block.{n}.attn.qkv.{kind}"]), bits(torch.cat([q, k, v])))
    assert len(pairs) + 2 * SPECS["mx"].layers == len(orig)
    for o, h in pairs:
        assert orig[o].dtype == hf[h].dtype and torch.equal(bits(orig[o]), bits(hf[h])), o


def test_seed_changes_every_tensor_and_rewrites_are_byte_identical(dirs, tmp_path):
    other = tensors(write_tiny(tmp_path / "seed1", TinySpec(seed=1)))
    base = tensors(dirs["mx"])
    assert set(other) == set(base)
    assert all(not torch.equal(bits(other[n]), bits(base[n])) for n in base)
    again = write_tiny(tmp_path / "again", TinySpec())
    files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(dirs["mx"]) for p in dirs["mx"].rglob("*") if p.is_file())
    for rel in files:
        assert (again / rel).read_bytes() == (dirs["mx"] / rel).read_bytes(), rel
    before = {p: p.read_bytes() for p in again.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        write_tiny(again, TinySpec(shards=2))  # never overwrites (or mixes shards into) an existing checkpoint
    assert {p: p.read_bytes() for p in again.rglob("*") if p.is_file()} == before


def test_weights_exercise_clamps_and_routing(dirs):
    t, spec, p = tensors(dirs["mx"]), SPECS["mx"], "model.layers.0."
    x = torch.randn(2048, spec.hidden, generator=torch.Generator().manual_seed(0))
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * t[p + "post_attention_layernorm.weight"].float()
    w = mxfp4.dequantize(t[p + "mlp.experts.gate_up_proj_blocks"], t[p + "mlp.experts.gate_up_proj_scales"])
    gate_up = torch.einsum("th,erh->ter", x, w) + t[p + "mlp.experts.gate_up_proj_bias"].float()  # [T, E, 2I]
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    assert 0.01 < (gate > 7.0).float().mean() < 0.2
    assert 0.01 < (up.abs() > 7.0).float().mean() < 0.3
    logits = x @ t[p + "mlp.router.weight"].float().T + t[p + "mlp.router.bias"].float()  # [T, E]
    assert logits.std() > 1.0
    top = logits.topk(spec.top_k + 1).values
    assert (top[:, :-1] - top[:, 1:]).min() > 0  # no ties at or next to the top-k boundary
    inv = spec.hidden ** -0.5
    for name, std in (("model.embed_tokens.weight", 1.0), ("lm_head.weight", inv),
                      (p + "self_attn.q_proj.weight", inv), (p + "mlp.router.weight", 2 * inv)):
        w = t[name].float()
        assert abs(w.mean()) < 0.2 * std and 0.6 * std < w.std() < 1.4 * std, name  # centred, as documented
    for name in ("self_attn.sinks", "self_attn.q_proj.bias", "mlp.experts.down_proj_bias"):
        assert t[p + name].abs().min() > 0 and t[p + name].float().std() > 0.05, name


@pytest.mark.parametrize("key", ["mx", "odd"])
def test_tokenizer_specials_by_name(dirs, key):
    d, vocab = dirs[key], SPECS[key].vocab
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids = [tok.token_to_id(s) for s in SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == len(ids) and max(ids) < vocab
    assert tok.get_vocab_size(with_added_tokens=True) <= vocab
    if key == "mx":
        assert tok.get_vocab_size(with_added_tokens=True) == vocab  # enough text to fill 1024 exactly
    text = ("<|start|>user<|message|>What is 12 * 34? Café, naïve 🙂<|end|><|start|>assistant<|channel|>analysis"
            "<|message|>12 * 34 = 408.<|end|><|start|>assistant<|channel|>final<|message|>The answer is 408.<|return|>")
    enc = tok.encode(text)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert enc.ids.count(tok.token_to_id("<|start|>")) == 3 and enc.ids[-1] == tok.token_to_id("<|return|>")
    assert len(enc.ids) < len(text.encode()) / 2  # the merges are useful on harmony text
    config = json.loads((d / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|startoftext|>", "<|return|>", "<|endoftext|>")
    assert {int(i): v["content"] for i, v in config["added_tokens_decoder"].items()} == dict(zip(ids, SPECIAL_TOKENS))
    assert json.loads((d / "special_tokens_map.json").read_text()) == {
        "bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}


def test_tokenizer_training_is_deterministic_across_processes(dirs):
    script = ("import sys; from model.tiny_tokenizer import train_tokenizer; "
              "sys.stdout.write(train_tokenizer(1024).to_str(pretty=True))")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, check=True).stdout
    assert hashlib.sha256(out).digest() == hashlib.sha256((dirs["mx"] / "tokenizer.json").read_bytes()).digest()


@pytest.mark.parametrize("kwargs,message", [
    ({"hidden": 48}, "hidden=48 must be a positive multiple of 32"), ({"top_k": 0}, "top_k=0"),
    ({"intermediate": 16}, "intermediate=16 must be a positive multiple of 32"), ({"seed": -1}, "seed=-1"),
    ({"heads": 4, "kv_heads": 3}, "multiple of kv_heads=3"), ({"top_k": 5}, "top_k=5 must be between 1 and experts=4"),
    ({"head_dim": 15}, "head_dim=15 must be even"), ({"head_dim": 4}, "at least 6"),
    ({"vocab": 200}, "vocab=200 is too small"), ({"experts_format": "fp8"}, "must be one of mxfp4, bf16"),
    ({"shards": 0}, "shards=0 must be between 1 and 33"), ({"layers": 0}, "layers=0 must be at least 1"),
    ({"sliding_window": 0}, "sliding_window=0"), ({"experts": 2.0}, "experts must be an integer"),
])
def test_invalid_specs_are_rejected_with_actionable_messages(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        TinySpec(**kwargs)


def test_presets_set_fields_that_flags_override():
    spec = tiny_spec("120b-attention", experts=4, seed=3)
    assert (spec.layers, spec.heads, spec.kv_heads, spec.head_dim, spec.sliding_window, spec.vocab) == (
        36, 64, 8, 64, 128, 201088)
    assert (spec.experts, spec.seed, spec.hidden) == (4, 3, PRESETS["120b-attention"]["hidden"])
    assert spec.layer_types[:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert tiny_spec(None, layers=3) == TinySpec(layers=3)
    with pytest.raises(UserError, match="preset '120b' is unknown; choose one of 120b-attention"):
        tiny_spec("120b")

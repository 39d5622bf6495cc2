"""gpt-oss checkpoints in the exact on-disk layout of openai/gpt-oss-120b / -20b (`write_checkpoint`: HF root with
sharded safetensors, MXFP4 or bf16 experts, configs, tokenizer; optional `original/`), and tiny ones with random
weights (`write_tiny`). Owns the layout; knows nothing of the forward pass. gpt-oss-spec.md §1.1, §3.2-3.5."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import mxfp4
from model.errors import UserError
from model.tiny_tokenizer import MIN_VOCAB, load_trained, write_tokenizer_files

# Shape legend: V=vocab H=hidden nH=heads nKV=kv heads D=head_dim E=experts I=intermediate G=in/32 blocks
EXPERTS_FORMATS = ("mxfp4", "bf16")
TRANSFORMERS_VERSION = "4.55.0.dev0"  # what the real configs carry
MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]

# Weight magnitudes (inputs of every projection have rms ~1 after RMSNorm): embeddings N(0,1); projections
# N(0, 1/in); biases N(0, 0.1^2); norms 1+N(0, 0.1^2); sinks N(0, 1.5^2) so some heads sink hard; router
# N(0, 4/H) + N(0, 0.5^2) bias so routing logits are spread (std ~2) and top-k is not tie-prone; lm_head
# N(0, 1/H). MXFP4 experts are uniform random FP4 codes with per-block scale 2^(e0 + {-1,0,+1}); e0 makes
# gate/up pre-activations std ~4, so ~4% of gates exceed the 7.0 clamp and ~9% of ups leave [-7, 7], and the
# expert outputs std ~1.
FP4_MEAN_SQUARE = 8.5625     # mean of v^2 over the 16 FP4 codes
JITTER_MEAN_SQUARE = 1.75    # mean of 4^j over j in {-1, 0, +1}
GATE_UP_STD = 4.0
SWIGLU_RMS = 9.6             # measured rms of clamp-SwiGLU(gate, up) with gate, up ~ N(0, 3.9^2)
DOWN_STD = 1.0


@dataclass(frozen=True)
class TinySpec:
    """What `epserve make-tiny` writes; the CLI flags map one to one onto these fields.
    Invalid values raise UserError (a ValueError) naming the field and what would be valid."""

    seed: int = 0
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 64
    experts: int = 4
    top_k: int = 2
    vocab: int = 1024
    sliding_window: int = 8
    experts_format: str = "mxfp4"   # "mxfp4": *_blocks/*_scales (spec §3.2); "bf16": gate_up_proj/down_proj (§3.3)
    shards: int = 3                 # HF and original/ shard count; 3 like gpt-oss-20b's HF root

    def __post_init__(self) -> None:
        for name in ("seed", "layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "experts",
                     "top_k", "vocab", "sliding_window", "shards"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"{name} must be an integer, got {value!r}")
        for name in ("layers", "heads", "kv_heads", "experts", "sliding_window"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"seed={self.seed} must be in [0, 2**32)")
        for name in ("hidden", "intermediate"):
            value = getattr(self, name)
            if value < mxfp4.BLOCK or value % mxfp4.BLOCK:
                raise UserError(f"{name}={value} must be a positive multiple of {mxfp4.BLOCK}: MXFP4 blocks of "
                                 f"{mxfp4.BLOCK} run along the experts' input dimension (e.g. {name}=64)")
        if self.heads % self.kv_heads:
            raise UserError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads} (GQA groups)")
        if self.head_dim < 6 or self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even and at least 6 (rotate-half RoPE; OpenAI's "
                             f"YaRN asserts 0 < low < high < head_dim/2 - 1)")
        if not 1 <= self.top_k <= self.experts:
            raise UserError(f"top_k={self.top_k} must be between 1 and experts={self.experts}")
        if self.vocab < MIN_VOCAB:
            raise UserError(f"vocab={self.vocab} is too small: the tokenizer needs at least {MIN_VOCAB} ids "
                             f"(256 byte tokens + the harmony specials)")
        if self.experts_format not in EXPERTS_FORMATS:
            raise UserError(f"experts_format={self.experts_format!r} must be one of {', '.join(EXPERTS_FORMATS)}")
        max_shards = 15 * self.layers + 3  # tensors in original/, the smaller layout; every shard is non-empty
        if not 1 <= self.shards <= max_shards:
            raise UserError(f"shards={self.shards} must be between 1 and {max_shards} for layers={self.layers}")

    @property
    def layer_types(self) -> list[str]:
        """Sliding window on even layers, full attention on odd ones (spec §1)."""
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.layers)]


# gpt-oss-120b's attention and vocabulary (spec §1: 36 layers alternating window-128 / full, 64 query and 8 KV heads
# of 64, vocab 201088; YaRN 4096 -> 131072 as every tiny config) with small hidden and expert sizes: real-sized KV
# cache, window and logits, a forward cheap on CPU, ~100 MB on disk (the two [201088, 64] bf16 matrices, twice).
PRESETS = {"120b-attention": dict(layers=36, heads=64, kv_heads=8, head_dim=64, sliding_window=128, vocab=201088,
                                  hidden=64, intermediate=64, experts=8, top_k=4, shards=3)}


def tiny_spec(preset: str | None = None, **fields) -> TinySpec:
    """TinySpec from a preset's values (`PRESETS`), then `fields` on top."""
    if preset is not None and preset not in PRESETS:
        raise UserError(f"preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    return TinySpec(**{**PRESETS.get(preset, {}), **fields})


def _generator(seed: int, name: str) -> torch.Generator:
    """One stream per tensor: a tensor's values depend only on (seed, name), not on the other tensors.
    torch's CPU generator (mt19937) keeps only 32 bits of its seed, so (seed, name) is hashed to 32 bits."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=4).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _normal(seed: int, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
    noise = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32)
    return (mean + std * noise).to(torch.bfloat16)


def _mxfp4(seed: int, name: str, experts: int, rows: int, cols: int,
           target_std: float, input_rms: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 weight [E, rows, cols] as (blocks u8 [E, rows, G, 16], scales u8 [E, rows, G])."""
    gen = _generator(seed, name)
    codes = torch.randint(0, 16, (experts, rows, cols // 2, 2), generator=gen, dtype=torch.uint8)
    blocks = (codes[..., 0] | (codes[..., 1] << 4)).view(experts, rows, cols // mxfp4.BLOCK, mxfp4.BYTES_PER_BLOCK)
    unit_std = input_rms * math.sqrt(FP4_MEAN_SQUARE * JITTER_MEAN_SQUARE * cols)  # output std at scale 2^0
    e0 = round(math.log2(target_std / unit_std))
    jitter = torch.randint(-1, 2, (experts, rows, cols // mxfp4.BLOCK), generator=gen, dtype=torch.int32)
    scales = (mxfp4.SCALE_BIAS + e0 + jitter).to(torch.uint8)
    return blocks.contiguous(), scales


def _layer(spec: TinySpec, n: int) -> dict[str, torch.Tensor]:
    """HF tensors of layer n with MXFP4 experts (spec §3.2). gate_up rows interleave: 2j = gate_j, 2j+1 = up_j."""
    s, H, D, E, I = spec.seed, spec.hidden, spec.head_dim, spec.experts, spec.intermediate
    q, kv, p = spec.heads * D, spec.kv_heads * D, f"model.layers.{n}."
    t = {p + "input_layernorm.weight": _normal(s, p + "input_layernorm.weight", (H,), 0.1, 1.0)}
    for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        t[f"{p}self_attn.{proj}.weight"] = _normal(s, f"{p}self_attn.{proj}.weight", (rows, H), H ** -0.5)
        t[f"{p}self_attn.{proj}.bias"] = _normal(s, f"{p}self_attn.{proj}.bias", (rows,), 0.1)
    t[p + "self_attn.o_proj.weight"] = _normal(s, p + "self_attn.o_proj.weight", (H, q), q ** -0.5)   # [H, nH*D]
    t[p + "self_attn.o_proj.bias"] = _normal(s, p + "self_attn.o_proj.bias", (H,), 0.1)
    t[p + "self_attn.sinks"] = _normal(s, p + "self_attn.sinks", (spec.heads,), 1.5)                  # [nH]
    t[p + "post_attention_layernorm.weight"] = _normal(s, p + "post_attention_layernorm.weight", (H,), 0.1, 1.0)
    t[p + "mlp.router.weight"] = _normal(s, p + "mlp.router.weight", (E, H), 2 * H ** -0.5)           # [E, H]
    t[p + "mlp.router.bias"] = _normal(s, p + "mlp.router.bias", (E,), 0.5)
    x = p + "mlp.experts."
    gu_blocks, gu_scales = _mxfp4(s, x + "gate_up_proj", E, 2 * I, H, GATE_UP_STD, 1.0)  # [E, 2I, H/32, 16]
    t[x + "gate_up_proj_blocks"], t[x + "gate_up_proj_scales"] = gu_blocks, gu_scales
    t[x + "gate_up_proj_bias"] = _normal(s, x + "gate_up_proj_bias", (E, 2 * I), 0.1)           # [E, 2I]
    dn_blocks, dn_scales = _mxfp4(s, x + "down_proj", E, H, I, DOWN_STD, SWIGLU_RMS)       # [E, H, I/32, 16]
    t[x + "down_proj_blocks"], t[x + "down_proj_scales"] = dn_blocks, dn_scales
    t[x + "down_proj_bias"] = _normal(s, x + "down_proj_bias", (E, H), 0.1)                     # [E, H]
    return t


def hf_mxfp4_tensors(spec: TinySpec) -> dict[str, torch.Tensor]:
    """All HF tensors with MXFP4 experts, in checkpoint order (embed, layers, norm, lm_head)."""
    s, V, H = spec.seed, spec.vocab, spec.hidden
    tensors = {"model.embed_tokens.weight": _normal(s, "model.embed_tokens.weight", (V, H), 1.0)}   # [V, H]
    for n in range(spec.layers):
        tensors.update(_layer(spec, n))
    tensors["model.norm.weight"] = _normal(s, "model.norm.weight", (H,), 0.1, 1.0)
    tensors["lm_head.weight"] = lm_head = _normal(s, "lm_head.weight", (V, H), H ** -0.5)           # [V, H]
    # Ids the trained tokenizer leaves undefined (a real-sized vocab over the small BPE) get zero rows, so greedy
    # decoding picks ids that have text, as a trained model never predicts reserved ids.
    lm_head[load_trained(V).get_vocab_size():] = 0
    return tensors


def bf16_experts(mxfp4_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The §3.3 layout of the same weights: `*_blocks`/`*_scales` [E, out, G, 16] become one bf16 tensor
    [E, in, out], the dequantised MXFP4 transposed (exact: MXFP4 values are bf16 values)."""
    out = {}
    for name, value in mxfp4_tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            stem = name.removesuffix("_blocks")
            dense = mxfp4.dequantize(value, mxfp4_tensors[stem + "_scales"], torch.bfloat16)  # [E, out, in]
            value, name = dense.transpose(1, 2).contiguous(), stem                              # [E, in, out]
        out[name] = value
    return out


def original_tensors(num_layers: int, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The OpenAI `original/` tensors (spec §3.5) from the HF MXFP4 ones; qkv rows are q, then k, then v."""
    out = {"embedding.weight": hf["model.embed_tokens.weight"]}
    for n in range(num_layers):
        p, b = f"model.layers.{n}.", f"block.{n}."
        out[b + "attn.norm.scale"] = hf[p + "input_layernorm.weight"]
        for kind in ("weight", "bias"):                                       # [(nH+2nKV)*D, H], [(nH+2nKV)*D]
            out[f"{b}attn.qkv.{kind}"] = torch.cat([hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"])
        out[b + "attn.sinks"] = hf[p + "self_attn.sinks"]
        out[b + "attn.out.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[b + "attn.out.bias"] = hf[p + "self_attn.o_proj.bias"]
        out[b + "mlp.norm.scale"] = hf[p + "post_attention_layernorm.weight"]
        out[b + "mlp.gate.weight"] = hf[p + "mlp.router.weight"]
        out[b + "mlp.gate.bias"] = hf[p + "mlp.router.bias"]
        for mlp, proj in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            out[f"{b}mlp.{mlp}_weight.blocks"] = hf[f"{p}mlp.experts.{proj}_blocks"]
            out[f"{b}mlp.{mlp}_weight.scales"] = hf[f"{p}mlp.experts.{proj}_scales"]
            out[f"{b}mlp.{mlp}_bias"] = hf[f"{p}mlp.experts.{proj}_bias"]
    out["norm.scale"] = hf["model.norm.weight"]
    out["unembedding.weight"] = hf["lm_head.weight"]
    return out


def hf_config(spec: TinySpec, eos_token_id: int | None = None) -> dict:
    """Every field of the real HF config.json (spec §1.1) with the tiny values; pad_token_id null (spec §6)."""
    config = {
        "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "eos_token_id": eos_token_id, "experts_per_token": spec.top_k, "head_dim": spec.head_dim,
        "hidden_act": "silu", "hidden_size": spec.hidden, "initial_context_length": 4096,
        "initializer_range": 0.02, "intermediate_size": spec.intermediate, "layer_types": spec.layer_types,
        "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": spec.heads,
        "num_experts_per_tok": spec.top_k, "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads, "num_local_experts": spec.experts, "output_router_logits": False,
        "pad_token_id": None, "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,  # legacy key, as in the real file
                         "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": spec.sliding_window,
        "swiglu_limit": 7.0, "tie_word_embeddings": False, "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True, "vocab_size": spec.vocab,
    }
    if spec.experts_format == "mxfp4":
        config["quantization_config"] = {"modules_to_not_convert": MODULES_TO_NOT_CONVERT, "quant_method": "mxfp4"}
    return config


def original_config(spec: TinySpec) -> dict:
    """original/config.json: exactly OAI-torch ModelConfig's keys, in the real file's order (spec §1.1)."""
    return {
        "num_hidden_layers": spec.layers, "num_experts": spec.experts, "experts_per_token": spec.top_k,
        "vocab_size": spec.vocab, "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "swiglu_limit": 7.0, "head_dim": spec.head_dim, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "sliding_window": spec.sliding_window,
        "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
        "rope_ntk_alpha": 1, "rope_ntk_beta": 32,   # = HF beta_slow, beta_fast
    }


def _shard_starts(count: int, parts: int) -> list[int]:
    """First tensor index of each of `parts` contiguous non-empty shards. Cut by tensor count, not bytes, so
    layers straddle shards even though embedding and lm_head dominate a tiny checkpoint's bytes."""
    return [k * count // parts for k in range(parts)]


def _write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, str]:
    """Write `tensors` split into len(names) shard files, without `__metadata__`; returns the weight map."""
    items = list(tensors.items())
    starts = _shard_starts(len(items), len(names)) + [len(items)]
    weight_map = {}
    for file_name, lo, hi in zip(names, starts, starts[1:]):
        shard = dict(items[lo:hi])
        save_file(shard, str(directory / file_name))
        (directory / file_name).chmod(0o644)  # safetensors writes 0600; checkpoints are shared read-only data
        weight_map.update({name: file_name for name in shard})
    return weight_map


def _write_index(path: Path, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]) -> None:
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(path, {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)


def _write_json(path: Path, data: dict, **dump_kwargs) -> None:
    path.write_text(json.dumps(data, **dump_kwargs), encoding="utf-8")


def write_checkpoint(out_dir: str | Path, config: dict, tensors: dict[str, torch.Tensor], vocab_size: int, *,
                     shards: int = 1, tokenizer_text: str | None = None,
                     original_config: dict | None = None) -> Path:
    """Write a checkpoint directory in the real repositories' layout; returns its path. Same inputs -> same bytes.

    config: HF config.json (`hf_config`); eos_token_id becomes the written tokenizer's <|return|>; with
    `quantization_config` experts are MXFP4 `*_blocks`/`*_scales` (§3.2), without it bf16 "in x out" (§3.3).
    tensors: all HF tensors, MXFP4 experts. vocab_size, tokenizer_text: see `write_tokenizer_files`. Shards are
    model-0000i-of-{S-1:05d}.safetensors (0-based, as on the Hub) + index; original_config adds original/ (§3.5).
    out_dir must not exist or be empty (UserError otherwise)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # Never overwrite: a mistyped path could point at a real downloaded checkpoint, and mixing old and new
        # shards would leave files that glob-based loaders (OAI-torch reads every *.safetensors) pick up.
        raise UserError(f"{out}: exists and is not an empty directory; remove it or choose a new path")
    original = out / "original"
    (original if original_config is not None else out).mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer_files(out, vocab_size, tokenizer_text)
    ids = {s: tok.token_to_id(s) for s in ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|call|>")}
    _write_json(out / "config.json", {**config, "eos_token_id": ids["<|return|>"]}, indent=2, sort_keys=True)
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|startoftext|>"], "do_sample": True, "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]],
        "transformers_version": TRANSFORMERS_VERSION}, indent=2, sort_keys=True)
    S = shards
    hf = tensors if "quantization_config" in config else bf16_experts(tensors)
    names = [f"model-{i:05d}-of-{S - 1:05d}.safetensors" for i in range(S)]
    _write_index(out / "model.safetensors.index.json", hf, _write_safetensors(out, hf, names))
    if original_config is None:
        return out

    orig = original_tensors(original_config["num_hidden_layers"], tensors)  # always MXFP4 (OpenAI's layout)
    _write_json(original / "config.json", original_config)  # one line, like the real 377-byte file
    dtypes = {n: "FP4" if n.endswith(".blocks") else "UE8" if n.endswith(".scales") else "BF16" for n in orig}
    _write_json(original / "dtypes.json", dtypes)
    if S == 1:
        _write_safetensors(original, orig, ["model.safetensors"])
    else:
        names = [f"model--{i + 1:05d}-of-{S:05d}.safetensors" for i in range(S)]
        _write_index(original / "model.safetensors.index.json", orig, _write_safetensors(original, orig, names))
    return out


def write_tiny(out_dir: str | Path, spec: TinySpec) -> Path:
    """A tiny checkpoint with random weights: HF root + original/ + tokenizer (`write_checkpoint`)."""
    return write_checkpoint(out_dir, hf_config(spec), hf_mxfp4_tensors(spec), spec.vocab, shards=spec.shards,
                            original_config=original_config(spec))

"""Checkpoint: lazy, mmap-backed access to a gpt-oss checkpoint in any of its on-disk layouts.

Layouts (gpt-oss-spec.md §3): HF sharded with MXFP4 experts (`*_blocks`/`*_scales`), HF with unquantised bf16
experts ("in x out"), and OpenAI's `original/` (fused qkv, `block.N.*` names). Callers always use the canonical HF
names; experts are read per layer and per expert range straight from the shard (`get_slice`), so a rank reads only
its own experts' bytes. Never materialises the whole checkpoint and never builds modules.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from model import mxfp4
from model.config import ModelConfig
from model.errors import CheckpointError

HF_MXFP4, HF_BF16, ORIGINAL = "hf-mxfp4", "hf-bf16", "original"
INDEX = "model.safetensors.index.json"
EXPERT_PARTS = ("gate_up_proj", "down_proj")


class Checkpoint:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.config = ModelConfig.from_dir(self.dir)
        hf = (self.dir / "config.json").is_file() and _is_hf_config(self.dir / "config.json")
        if hf and _has_weights(self.dir):
            self.weights_dir = self.dir
        elif _has_weights(self.dir / "original"):
            self.weights_dir = self.dir / "original"
        elif not hf and _has_weights(self.dir):
            self.weights_dir = self.dir
        else:
            raise CheckpointError(f"{self.dir}: no *.safetensors weights (nor {INDEX}) found")
        self._files = _tensor_files(self.weights_dir)           # source tensor name -> shard path
        self._handles: dict[Path, object] = {}
        if self.weights_dir.name == "original" or not hf:
            self.layout = ORIGINAL
        elif "model.layers.0.mlp.experts.gate_up_proj_blocks" in self._files:
            self.layout = HF_MXFP4
        else:
            self.layout = HF_BF16

    # ---- dense tensors ----
    def tensor(self, name: str) -> torch.Tensor:
        """A non-expert tensor by canonical HF name, as stored (bf16), shape-checked against the config."""
        source, rows = self._source(name)
        t = self._read(source, rows)
        want = expected_shape(self.config, name)
        if want is not None and tuple(t.shape) != want:
            raise CheckpointError(f"{self._files[source].name}: tensor {source!r} has shape {list(t.shape)}, "
                                  f"config.json implies {list(want)}")
        return t

    # ---- experts ----
    def packed_experts(self, layer: int, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """MXFP4 blocks/scales and bf16 biases of experts [lo, hi) of `layer`, as stored ("out x in")."""
        if self.layout == HF_BF16:
            raise CheckpointError(f"{self.dir}: experts are stored unquantised (bf16), not as MXFP4 blocks")
        self._check_range(lo, hi)
        out = {}
        for part in EXPERT_PARTS:
            for suffix in ("_blocks", "_scales", "_bias"):
                name = f"model.layers.{layer}.mlp.experts.{part}{suffix}"
                out[part + suffix] = self._expert_read(name, lo, hi)
        return out

    def experts(self, layer: int, lo: int, hi: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Experts [lo, hi) of `layer` in HF's unquantised "in x out" layout, in `dtype`:
        gate_up_proj [n, H, 2I], gate_up_proj_bias [n, 2I], down_proj [n, I, H], down_proj_bias [n, H].
        MXFP4 is dequantised exactly, one layer's slice at a time."""
        self._check_range(lo, hi)
        prefix = f"model.layers.{layer}.mlp.experts."
        if self.layout == HF_BF16:
            out = {k: self._expert_read(prefix + k, lo, hi) for k in
                   ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}
        else:
            packed = self.packed_experts(layer, lo, hi)
            out = {}
            for part in EXPERT_PARTS:
                w = mxfp4.dequantize(packed[part + "_blocks"], packed[part + "_scales"], dtype)  # [n, out, in]
                out[part] = w.transpose(1, 2)                                                   # [n, in, out]
                out[part + "_bias"] = packed[part + "_bias"]
        for k, t in out.items():
            want = (hi - lo,) + expected_shape(self.config, prefix + k)[1:]
            if tuple(t.shape) != want:
                raise CheckpointError(f"{self.dir}: expert tensor {prefix + k} has shape {list(t.shape)} for "
                                      f"experts [{lo}, {hi}), config.json implies {list(want)}")
        return {k: t.to(dtype).contiguous() for k, t in out.items()}

    # ---- internals ----
    def _check_range(self, lo: int, hi: int) -> None:
        if not 0 <= lo < hi <= self.config.num_local_experts:
            raise ValueError(f"expert range [{lo}, {hi}) outside [0, {self.config.num_local_experts})")

    def _expert_read(self, name: str, lo: int, hi: int) -> torch.Tensor:
        source, _ = self._source(name)
        return self._handle(source).get_slice(source)[lo:hi]

    def _source(self, name: str) -> tuple[str, tuple[int, int] | None]:
        """Canonical name -> (name in this checkpoint, row range to read or None)."""
        if self.layout == ORIGINAL:
            source, rows = original_name(self.config, name)
        else:
            source, rows = name, None
        if source not in self._files and name == "lm_head.weight" and self.config.tie_word_embeddings:
            return self._source("model.embed_tokens.weight")
        if source not in self._files:
            where = self.weights_dir / INDEX if (self.weights_dir / INDEX).is_file() else self.weights_dir
            raise CheckpointError(f"{where}: no tensor {source!r} (needed for {name})")
        return source, rows

    def _read(self, source: str, rows: tuple[int, int] | None) -> torch.Tensor:
        if rows is None:
            return self._handle(source).get_tensor(source)
        return self._handle(source).get_slice(source)[rows[0]:rows[1]]

    def _handle(self, source: str):
        path = self._files[source]
        if path not in self._handles:
            if not path.is_file():
                raise CheckpointError(f"{path}: shard named in {INDEX} is missing")
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        handle = self._handles[path]
        if source not in handle.keys():
            raise CheckpointError(f"{path}: {INDEX} maps {source!r} to this shard, but it is not in it")
        return handle


def _is_hf_config(path: Path) -> bool:
    with open(path) as f:
        return "model_type" in json.load(f)


def _has_weights(d: Path) -> bool:
    return d.is_dir() and ((d / INDEX).is_file() or any(d.glob("*.safetensors")))


def _tensor_files(d: Path) -> dict[str, Path]:
    """Source tensor name -> shard path, from the index when present, else from every *.safetensors header."""
    if (d / INDEX).is_file():
        try:
            weight_map = json.loads((d / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{d / INDEX}: not a safetensors index (needs a 'weight_map' object)") from None
        return {name: d / fname for name, fname in weight_map.items()}
    files = {}
    for path in sorted(d.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            files.update({name: path for name in f.keys()})
    return files


def expected_shape(cfg: ModelConfig, name: str) -> tuple[int, ...] | None:
    """Shape of a canonical HF tensor for this config (spec §3.2, bf16 experts per §3.3); None if unknown."""
    H, V, E = cfg.hidden_size, cfg.vocab_size, cfg.num_local_experts
    nq, nkv, I = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    fixed = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"]:
        return None
    leaf = ".".join(parts[3:])
    per_layer = {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (nq, H), "self_attn.q_proj.bias": (nq,),
        "self_attn.k_proj.weight": (nkv, H), "self_attn.k_proj.bias": (nkv,),
        "self_attn.v_proj.weight": (nkv, H), "self_attn.v_proj.bias": (nkv,),
        "self_attn.o_proj.weight": (H, nq), "self_attn.o_proj.bias": (H,), "self_attn.sinks": (cfg.num_attention_heads,),
        "mlp.router.weight": (E, H), "mlp.router.bias": (E,),
        "mlp.experts.gate_up_proj": (E, H, 2 * I), "mlp.experts.down_proj": (E, I, H),
        "mlp.experts.gate_up_proj_bias": (E, 2 * I), "mlp.experts.down_proj_bias": (E, H),
    }
    return per_layer.get(leaf)


def original_name(cfg: ModelConfig, name: str) -> tuple[str, tuple[int, int] | None]:
    """Canonical HF name -> (OpenAI `original/` name, rows of the fused qkv or None); spec §3.5."""
    fixed = {"model.embed_tokens.weight": "embedding.weight", "model.norm.weight": "norm.scale",
             "lm_head.weight": "unembedding.weight"}
    if name in fixed:
        return fixed[name], None
    parts = name.split(".")
    n, leaf = parts[2], ".".join(parts[3:])
    nq, nkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    qkv_rows = {"q_proj": (0, nq), "k_proj": (nq, nq + nkv), "v_proj": (nq + nkv, nq + 2 * nkv)}
    if leaf.startswith("self_attn.") and leaf.split(".")[1] in qkv_rows:
        proj, kind = leaf.split(".")[1:]
        return f"block.{n}.attn.qkv.{kind}", qkv_rows[proj]
    table = {
        "input_layernorm.weight": "attn.norm.scale", "self_attn.sinks": "attn.sinks",
        "self_attn.o_proj.weight": "attn.out.weight", "self_attn.o_proj.bias": "attn.out.bias",
        "post_attention_layernorm.weight": "mlp.norm.scale",
        "mlp.router.weight": "mlp.gate.weight", "mlp.router.bias": "mlp.gate.bias",
        "mlp.experts.gate_up_proj_blocks": "mlp.mlp1_weight.blocks",
        "mlp.experts.gate_up_proj_scales": "mlp.mlp1_weight.scales", "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
        "mlp.experts.down_proj_blocks": "mlp.mlp2_weight.blocks",
        "mlp.experts.down_proj_scales": "mlp.mlp2_weight.scales", "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
    }
    if leaf not in table:
        raise CheckpointError(f"no tensor in the original/ layout corresponds to {name!r}")
    return f"block.{n}.{table[leaf]}", None

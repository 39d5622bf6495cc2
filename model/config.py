"""ModelConfig: gpt-oss hyper-parameters read from HF `config.json` or OpenAI's `original/config.json`.

Field names follow HF's config.json keys (STYLE.md). Pure data and validation; no tensors.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from model.errors import ConfigError

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN (NTK-by-parts) RoPE scaling; gpt-oss-spec.md §2.2. Defaults are gpt-oss's real values."""
    factor: float = 32.0
    beta_fast: float = 32.0                      # OAI rope_ntk_beta
    beta_slow: float = 1.0                       # OAI rope_ntk_alpha
    original_max_position_embeddings: int = 4096  # OAI initial_context_length
    truncate: bool = False                       # gpt-oss: the correction range is NOT rounded


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int | None = 128
    layer_types: tuple[str, ...] = ()            # empty: sliding on even layers (OAI's hard-coded rule)
    rope_theta: float = 150000.0
    rope_scaling: YarnConfig | None = YarnConfig()  # None: plain RoPE
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702                  # absent from the real config; OAI hard-codes it
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    quant_method: str | None = None              # "mxfp4" when experts are stored packed
    eos_token_id: tuple[int, ...] = ()

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "intermediate_size", "num_local_experts",
                    "num_experts_per_tok", "max_position_embeddings")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config: {key} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(f"config: num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                              f"num_local_experts ({self.num_local_experts})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"config: sliding_window must be positive or null, got {self.sliding_window}")
        if self.layer_types:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(f"config: layer_types has {len(self.layer_types)} entries but "
                                  f"num_hidden_layers is {self.num_hidden_layers}")
            bad = sorted(set(self.layer_types) - {SLIDING, FULL})
            if bad:
                raise ConfigError(f"config: unknown layer_types {bad}; expected {SLIDING!r} or {FULL!r}")
            if SLIDING in self.layer_types and self.sliding_window is None:
                raise ConfigError("config: layer_types has sliding_attention layers but sliding_window is null")
        if self.quant_method not in (None, "mxfp4"):
            raise ConfigError(f"config: unsupported quantization_config.quant_method {self.quant_method!r}; "
                              "epserve reads 'mxfp4' experts or unquantised bf16 checkpoints")
        if self.quant_method == "mxfp4" and (self.hidden_size % 32 or self.intermediate_size % 32):
            raise ConfigError("config: MXFP4 needs hidden_size and intermediate_size to be multiples of 32, got "
                              f"{self.hidden_size} and {self.intermediate_size}")

    # ---- derived ----
    def is_sliding(self, layer_idx: int) -> bool:
        """Sliding-window layers come from `layer_types` (HF); without it, even layers (OAI)."""
        if self.sliding_window is None:
            return False
        if self.layer_types:
            return self.layer_types[layer_idx] == SLIDING
        return layer_idx % 2 == 0

    def window(self, layer_idx: int) -> int | None:
        """Keys a query may see on this layer, itself included (W), or None for full causal attention."""
        return self.sliding_window if self.is_sliding(layer_idx) else None

    @property
    def num_query_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ---- readers ----
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type != "gpt_oss":
            raise ConfigError(f"config.json: model_type {model_type!r} is not supported; epserve serves 'gpt_oss'")
        k = d.get("num_experts_per_tok", d.get("experts_per_token"))
        quant = d.get("quantization_config") or {}
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=_req(d, "vocab_size"), hidden_size=_req(d, "hidden_size"),
            num_hidden_layers=_req(d, "num_hidden_layers"), num_attention_heads=_req(d, "num_attention_heads"),
            num_key_value_heads=_req(d, "num_key_value_heads"),
            head_dim=d.get("head_dim") or _req(d, "hidden_size") // _req(d, "num_attention_heads"),
            intermediate_size=_req(d, "intermediate_size"), num_local_experts=_req(d, "num_local_experts"),
            num_experts_per_tok=k if k is not None else _req(d, "num_experts_per_tok"),
            sliding_window=d.get("sliding_window", 128), layer_types=tuple(d.get("layer_types") or ()),
            rope_theta=float(_rope_theta(d)), rope_scaling=_yarn_from_hf(d),
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            swiglu_alpha=float(d.get("swiglu_alpha", 1.702)), attention_bias=bool(d.get("attention_bias", True)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            quant_method=quant.get("quant_method"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        )

    @classmethod
    def from_original_dict(cls, d: dict) -> "ModelConfig":
        """OpenAI's original/config.json (keys of OAI-torch ModelConfig; spec §1.1 maps the names)."""
        known = {"num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                 "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads",
                 "sliding_window", "initial_context_length", "rope_theta", "rope_scaling_factor",
                 "rope_ntk_alpha", "rope_ntk_beta"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"original/config.json: unknown keys {unknown}")
        yarn = YarnConfig(factor=float(d.get("rope_scaling_factor", 32.0)),
                          beta_fast=float(d.get("rope_ntk_beta", 32.0)),
                          beta_slow=float(d.get("rope_ntk_alpha", 1.0)),
                          original_max_position_embeddings=int(d.get("initial_context_length", 4096)))
        return cls(
            vocab_size=_req(d, "vocab_size"), hidden_size=_req(d, "hidden_size"),
            num_hidden_layers=_req(d, "num_hidden_layers"), num_attention_heads=_req(d, "num_attention_heads"),
            num_key_value_heads=_req(d, "num_key_value_heads"), head_dim=_req(d, "head_dim"),
            intermediate_size=_req(d, "intermediate_size"), num_local_experts=_req(d, "num_experts"),
            num_experts_per_tok=_req(d, "experts_per_token"), sliding_window=d.get("sliding_window", 128),
            rope_theta=float(d.get("rope_theta", 150000.0)), rope_scaling=yarn,
            swiglu_limit=float(d.get("swiglu_limit", 7.0)), quant_method="mxfp4",
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        """Read `config.json` (HF, or OpenAI's when MODEL_DIR is an `original/` folder), else `original/config.json`."""
        model_dir = Path(model_dir)
        if (model_dir / "config.json").is_file():
            d = _read_json(model_dir / "config.json")
            return cls.from_hf_dict(d) if "model_type" in d or "num_experts" not in d else cls.from_original_dict(d)
        if (model_dir / "original" / "config.json").is_file():
            return cls.from_original_dict(_read_json(model_dir / "original" / "config.json"))
        raise ConfigError(f"{model_dir}: no config.json (or original/config.json); is this a gpt-oss model directory?")


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def _req(d: dict, key: str):
    if key not in d:
        raise ConfigError(f"config: required key {key!r} is missing")
    return d[key]


def _rope_theta(d: dict) -> float:
    params = d.get("rope_parameters") or {}
    return d.get("rope_theta", params.get("rope_theta", 150000.0))


def _yarn_from_hf(d: dict) -> YarnConfig | None:
    """Both the legacy `rope_scaling` key (the real config.json) and transformers 5's `rope_parameters`.

    Reading only `rope_parameters` silently loses YaRN on the real checkpoint (spec §1.1 notes).
    """
    rs = d.get("rope_scaling") or d.get("rope_parameters")
    if rs is None:
        return None
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise ConfigError(f"config: rope_type {rope_type!r} is not supported; gpt-oss uses 'yarn'")
    return YarnConfig(
        factor=float(rs.get("factor", 32.0)), beta_fast=float(rs.get("beta_fast", 32.0)),
        beta_slow=float(rs.get("beta_slow", 1.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings",
                                                    d.get("initial_context_length", 4096))),
        truncate=bool(rs.get("truncate", False)),
    )


"""ModelConfig from the real HF config.json, the transformers-5 spelling, original/config.json, and validation."""
import json

import pytest

from model.config import ModelConfig, YarnConfig
from model.errors import ConfigError

REAL_120B = {  # gpt-oss-spec.md §1.1, verbatim values
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "num_local_experts": 128, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088}

ORIGINAL_120B = {"num_hidden_layers": 36, "num_experts": 128, "experts_per_token": 4, "vocab_size": 201088,
                 "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
                 "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
                 "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
                 "rope_ntk_alpha": 1, "rope_ntk_beta": 32}


def test_real_hf_config_keeps_yarn_from_the_legacy_key():
    cfg = ModelConfig.from_hf_dict(REAL_120B)
    assert cfg.rope_scaling == YarnConfig(32.0, 32.0, 1.0, 4096, False)
    assert cfg.rope_theta == 150000.0 and cfg.quant_method == "mxfp4" and cfg.eos_token_id == (200002,)
    assert [cfg.is_sliding(i) for i in range(4)] == [True, False, True, False]
    assert cfg.window(0) == 128 and cfg.window(1) is None and cfg.num_query_groups == 8


def test_transformers5_rope_parameters_spelling():
    d = dict(REAL_120B)
    rs = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = dict(rs, rope_theta=150000.0)
    assert ModelConfig.from_hf_dict(d) == ModelConfig.from_hf_dict(REAL_120B)


@pytest.mark.parametrize("drop", ["num_experts_per_tok", "experts_per_token"])
def test_either_experts_per_token_spelling(drop):
    d = {k: v for k, v in REAL_120B.items() if k != drop}
    assert ModelConfig.from_hf_dict(d).num_experts_per_tok == 4


def test_absent_optional_keys_take_gpt_oss_defaults():
    required = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "num_local_experts", "num_experts_per_tok")
    cfg = ModelConfig.from_hf_dict({k: REAL_120B[k] for k in required})
    assert cfg.layer_types == () and cfg.is_sliding(0) and not cfg.is_sliding(1)   # OAI's even-layer rule
    assert cfg.rope_scaling is None and cfg.quant_method is None and cfg.swiglu_alpha == 1.702


def test_original_config_maps_to_the_same_model():
    hf, orig = ModelConfig.from_hf_dict(REAL_120B), ModelConfig.from_original_dict(ORIGINAL_120B)
    for key in ("num_local_experts", "num_experts_per_tok", "rope_scaling", "sliding_window", "head_dim",
                "rope_theta", "swiglu_limit"):
        assert getattr(orig, key) == getattr(hf, key), key


def test_original_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown keys.*'num_local_experts'"):
        ModelConfig.from_original_dict(dict(ORIGINAL_120B, num_local_experts=128))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"quantization_config": {"quant_method": "gptq"}}, "unsupported quantization_config.quant_method 'gptq'"),
    ({"num_key_value_heads": 7}, "must be a multiple of num_key_value_heads"),
    ({"num_experts_per_tok": 200}, "exceeds num_local_experts"),
    ({"layer_types": ["sliding_attention"]}, "layer_types has 1 entries but num_hidden_layers is 36"),
    ({"layer_types": ["chunked_attention"] * 36}, "unknown layer_types"),
    ({"hidden_size": -1}, "hidden_size must be a positive integer"),
    ({"rope_scaling": {"rope_type": "longrope"}}, "rope_type 'longrope' is not supported"),
])
def test_validation_messages(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(dict(REAL_120B, **change))


def test_missing_required_key_is_named():
    d = {k: v for k, v in REAL_120B.items() if k != "vocab_size"}
    with pytest.raises(ConfigError, match="'vocab_size' is missing"):
        ModelConfig.from_hf_dict(d)


def test_from_dir_prefers_hf_and_falls_back_to_original(tmp_path):
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "config.json").write_text(json.dumps(ORIGINAL_120B))
    assert ModelConfig.from_dir(tmp_path).quant_method == "mxfp4"                 # only original/
    assert ModelConfig.from_dir(tmp_path / "original").num_local_experts == 128   # pointing at original/ itself
    (tmp_path / "config.json").write_text(json.dumps(dict(REAL_120B, num_hidden_layers=2,
                                                          layer_types=["sliding_attention", "full_attention"])))
    assert ModelConfig.from_dir(tmp_path).num_hidden_layers == 2
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_dir(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)

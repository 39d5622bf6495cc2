"""RMSNorm and RoPE with YaRN: the ramp, the concentration and rotate-half (gpt-oss-spec.md §2.1-2.2)."""
import math

import pytest
import torch

from model.config import ModelConfig, YarnConfig
from model.layers import RMSNorm, RotaryEmbedding, apply_rotary, yarn_bounds


def config(head_dim=64, yarn=YarnConfig()):
    return ModelConfig(vocab_size=10, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=head_dim, intermediate_size=64, num_local_experts=2,
                       num_experts_per_tok=1, rope_scaling=yarn)


def test_rmsnorm_plain_weight_in_fp32():
    norm = RMSNorm(4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 0.0]))
    x = torch.tensor([[1.0, -1.0, 3.0, 1.0]])
    rms = math.sqrt((1 + 1 + 9 + 1) / 4 + 1e-5)
    assert torch.allclose(norm(x), torch.tensor([[1 / rms, -2 / rms, 1.5 / rms, 0.0]]), atol=1e-7)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_yarn_bounds_are_gpt_oss_values_and_not_rounded():
    low, high = yarn_bounds(64, 150000.0, 4096, 32.0, 1.0, truncate=False)
    assert low == pytest.approx(8.09278, abs=1e-5) and high == pytest.approx(17.39802, abs=1e-5)
    assert yarn_bounds(64, 150000.0, 4096, 32.0, 1.0, truncate=True) == (8, 18)


def test_yarn_ramp_keeps_low_dims_and_divides_high_dims_by_factor():
    rope = RotaryEmbedding(config())
    inv_freq, concentration = rope.inv_freq_and_concentration(torch.device("cpu"))
    plain = 1.0 / (150000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    assert torch.allclose(inv_freq[:9], plain[:9])                      # i <= 8: original frequency
    assert torch.allclose(inv_freq[18:], plain[18:] / 32)               # i >= 18: interpolated by 32
    ramp = (12 - 8.09278) / (17.39802 - 8.09278)                        # a blended dim, by hand
    assert inv_freq[12].item() == pytest.approx(plain[12].item() * (1 - ramp) + plain[12].item() / 32 * ramp,
                                                rel=1e-5)
    assert concentration == pytest.approx(1.3465736, abs=1e-7)


def test_cos_sin_carry_the_concentration():
    rope = RotaryEmbedding(config())
    cos, sin = rope(torch.tensor([0, 5]), torch.float32)
    assert torch.allclose(cos[0], torch.full((32,), 1.3465736))       # position 0: cos = concentration
    assert torch.allclose(sin[0], torch.zeros(32))
    assert torch.allclose(cos[1] ** 2 + sin[1] ** 2, torch.full((32,), 1.3465736 ** 2), atol=1e-5)


def test_plain_rope_without_yarn():
    inv_freq, concentration = RotaryEmbedding(config(yarn=None)).inv_freq_and_concentration(torch.device("cpu"))
    assert concentration == 1.0 and inv_freq[1].item() == pytest.approx(150000.0 ** (-2 / 64), rel=1e-6)


def test_rotate_half_pairs_dim_i_with_dim_i_plus_half():
    x = torch.zeros(1, 1, 4)
    x[0, 0, 0] = 1.0                                                    # dims (0, 2) form a pair, not (0, 1)
    c, s = torch.tensor([[math.cos(0.3), 1.0]]), torch.tensor([[math.sin(0.3), 0.0]])
    y = apply_rotary(x, c, s)[0, 0]
    assert y.tolist() == pytest.approx([math.cos(0.3), 0.0, math.sin(0.3), 0.0], abs=1e-7)

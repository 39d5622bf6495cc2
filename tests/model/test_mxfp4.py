"""MXFP4 decoding: nibble order, E2M1 code table, E8M0 scale bias (gpt-oss-spec.md §3.4)."""
import pytest
import torch

from model import mxfp4


def one_block(first_byte: int, scale: int) -> torch.Tensor:
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = first_byte
    return mxfp4.dequantize(blocks, torch.tensor([scale], dtype=torch.uint8))


def test_low_nibble_is_the_even_element():
    # byte 0x72: low nibble 2 (+1.0) is element 0, high nibble 7 (+6.0) is element 1
    v = one_block(0x72, 127)
    assert v[0].tolist() == 1.0 and v[1].tolist() == 6.0
    assert torch.count_nonzero(v[2:]) == 0


def test_scale_bias_is_127():
    assert one_block(0x02, 127)[0].item() == 1.0
    assert one_block(0x02, 128)[0].item() == 2.0
    assert one_block(0x02, 124)[0].item() == 0.125
    assert one_block(0x0F, 130)[0].item() == -6.0 * 8


def test_code_table():
    blocks = torch.tensor([[c | (c << 4) for c in range(16)]], dtype=torch.uint8)   # both nibbles = c
    v = mxfp4.dequantize(blocks, torch.tensor([127], dtype=torch.uint8))
    expected = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert v[0::2].tolist() == expected and v[1::2].tolist() == expected
    assert torch.signbit(v[16])  # code 8 is negative zero


def test_blocks_concatenate_along_last_dim_with_their_own_scales():
    blocks = torch.full((2, 3, 16), 0x22, dtype=torch.uint8)                         # every element +1.0
    scales = torch.tensor([[127, 128, 129], [120, 127, 127]], dtype=torch.uint8)
    v = mxfp4.dequantize(blocks, scales)
    assert v.shape == (2, 96)
    assert v[0, :32].unique().tolist() == [1.0]
    assert v[0, 32:64].unique().tolist() == [2.0]
    assert v[0, 64:].unique().tolist() == [4.0]
    assert v[1, :32].unique().tolist() == [2.0 ** -7]


def test_quantize_roundtrip_is_exact_on_mxfp4_values():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (4, 6, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (4, 6, 2), dtype=torch.uint8, generator=g)
    v = mxfp4.dequantize(blocks, scales)
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(v)), v)
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.bfloat16).float(), v)  # lossless in bf16


def test_quantize_rounds_to_nearest_representable():
    x = torch.zeros(32)
    x[0], x[1], x[2] = 6.0, 2.4, -0.7          # scale 2^0: 2.4 -> 2.0, -0.7 -> -0.5
    v = mxfp4.dequantize(*mxfp4.quantize(x))
    assert v[:3].tolist() == [6.0, 2.0, -0.5]


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))

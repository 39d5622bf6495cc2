"""mxfp4_grouped_linear (Triton: compiled on a GPU, Triton's interpreter on CPU) equals its torch reference: rows
grouped by expert incl. empty experts, one expert holding all rows, R=1, rows past group_ends[-1]; its dequantised
weights equal model/mxfp4.py's bit for bit; its grid follows from shapes only."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from model import mxfp4, mxfp4_kernel
from model.mxfp4_kernel import block_config, mxfp4_grouped_linear, mxfp4_grouped_linear_reference

pytestmark = pytest.mark.skipif(not mxfp4_kernel.KERNEL_AVAILABLE, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"        # CPU: TRITON_INTERPRET=1 (tests/conftest.py)


def packed(E, N, K, seed, scale_lo=124, scale_hi=130):
    """Random MXFP4 experts: every byte value, scales 2^(-3..3) around 1, and an fp32 bias."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(scale_lo, scale_hi + 1, (E, N, K // 32), dtype=torch.uint8, generator=g)
    bias = torch.randn(E, N, generator=g)
    return blocks.to(DEVICE), scales.to(DEVICE), bias.to(DEVICE)


def ends_of(counts):
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(DEVICE)     # [E] group ends


# (rows R, rows per expert, N, K); R > sum(counts) leaves rows past group_ends[-1]. Covers all three block configs.
CASES = [
    (1, [0, 1, 0], 64, 64),                 # R=1, decode
    (37, [10, 0, 27], 96, 96),              # an empty expert, R not a multiple of BLOCK_M
    (40, [0, 40, 0, 0], 64, 128),           # one expert holds every row
    (45, [7, 0, 13], 32, 160),              # 25 rows past group_ends[-1]
    (100, [30, 60], 64, 96),                # BLOCK_M 32
    (150, [70, 0, 80], 128, 64),            # BLOCK_M 64, BLOCK_N 128
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,counts,N,K", CASES)
def test_kernel_equals_reference(R, counts, N, K, dtype):
    blocks, scales, bias = packed(len(counts), N, K, seed=R)
    x = torch.randn(R, K, generator=torch.Generator().manual_seed(R)).to(DEVICE, dtype)        # [R, K]
    ends = ends_of(counts)
    got = mxfp4_grouped_linear(x, ends, blocks, scales, bias.to(dtype))                        # [R, N]
    assert got.dtype == dtype and got.shape == (R, N)
    # The reference in fp32 on the same (bf16-exact) inputs: bf16 may differ by one output rounding only.
    want = mxfp4_grouped_linear_reference(x.float(), ends, blocks, scales, bias.to(dtype).float())
    held = sum(counts)
    assert want[:held].abs().max() > 1.0
    tol = dict(rtol=1e-5, atol=1e-5 * want.abs().max().item()) if dtype == torch.float32 else \
        dict(rtol=2 ** -8, atol=1e-3)
    torch.testing.assert_close(got[:held].float(), want[:held], **tol)
    assert torch.equal(got[held:], torch.zeros_like(got[held:]))                               # documented zeros


@pytest.mark.parametrize("R,counts,N,K", CASES)
def test_dot_scaled_variant_equals_dequant_variant(R, counts, N, K):
    """The packed bytes fed to tl.dot_scaled (bf16 activations) give the dequantising kernel's result, rows past
    group_ends[-1] zero too."""
    blocks, scales, bias = packed(len(counts), N, K, seed=R)
    x = torch.randn(R, K, generator=torch.Generator().manual_seed(R)).to(DEVICE, torch.bfloat16)
    ends, bias = ends_of(counts), bias.to(torch.bfloat16)
    got = mxfp4_grouped_linear(x, ends, blocks, scales, bias, variant="dot_scaled")
    want = mxfp4_grouped_linear(x, ends, blocks, scales, bias, variant="dequant")
    held = sum(counts)
    assert got.dtype == torch.bfloat16 and want[:held].abs().max() > 1.0
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -8, atol=1e-3)
    assert torch.equal(got[held:], torch.zeros_like(got[held:]))


def test_dot_scaled_variant_takes_bf16_only():
    blocks, scales, _ = packed(1, 32, 64, seed=1)
    with pytest.raises(ValueError, match="bf16"):
        mxfp4_grouped_linear(torch.zeros(2, 64, device=DEVICE), ends_of([2]), blocks, scales, variant="dot_scaled")
    with pytest.raises(ValueError, match="variant"):
        mxfp4_grouped_linear(torch.zeros(2, 64, device=DEVICE), ends_of([2]), blocks, scales, variant="fast")


def test_no_bias_strided_rows_and_int64_ends():
    blocks, scales, _ = packed(2, 64, 64, seed=5)
    x = torch.randn(20, 96, generator=torch.Generator().manual_seed(5)).to(DEVICE)[:, 16:80]  # row stride 96
    ends = torch.tensor([12, 20], dtype=torch.int64, device=DEVICE)
    want = mxfp4_grouped_linear_reference(x, ends, blocks, scales)
    torch.testing.assert_close(mxfp4_grouped_linear(x, ends, blocks, scales), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_random_groupings(seed):
    """Many small groups, the tile map's worst case: ceil(n_e / BLOCK_M) tiles for each non-empty expert."""
    g = torch.Generator().manual_seed(seed)
    E, R = 9, 40
    cuts = torch.randint(0, R + 1, (E,), generator=g).sort().values                         # non-decreasing
    blocks, scales, bias = packed(E, 32, 64, seed=seed)
    x = torch.randn(R, 64, generator=g).to(DEVICE)
    ends = cuts.to(torch.int32).to(DEVICE)
    want = mxfp4_grouped_linear_reference(x, ends, blocks, scales, bias)
    torch.testing.assert_close(mxfp4_grouped_linear(x, ends, blocks, scales, bias), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantised_weights_are_bit_exact(dtype):
    """x = identity per expert makes y = W_e^T: each element equals mxfp4.dequantize's. Every byte value and
    scales 2..252 (all products normal and finite in fp32)."""
    E, N, K = 2, 64, 128
    blocks = (torch.arange(E * N * K // 2) % 256).to(torch.uint8).view(E, N, K // 32, 16)
    scales = (2 + torch.arange(E * N * K // 32) % 251).to(torch.uint8).view(E, N, K // 32)
    scales = scales.flatten()[torch.randperm(scales.numel(), generator=torch.Generator().manual_seed(0))]
    scales = scales.view(E, N, K // 32)
    x = torch.eye(K, dtype=dtype).repeat(E, 1)                                                 # [E*K, K]
    got = mxfp4_grouped_linear(x.to(DEVICE), ends_of([K] * E), blocks.to(DEVICE), scales.to(DEVICE))
    want = mxfp4.dequantize(blocks, scales, dtype).transpose(1, 2).flatten(0, 1)               # [E*K, N]
    assert torch.equal(got.cpu(), want)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")     # 0 * inf in the interpreter
def test_k_tail_reads_nothing_past_a_row():
    """K=96 is not a multiple of BLOCK_K=128: the last K tile must mask the bytes and scales past a row's end, which
    are the next row's first ones. Odd rows get an inf scale (255) in their first block, making their own outputs
    NaN/inf; an even row that read past its end would turn NaN as well."""
    blocks, scales, _ = packed(2, 32, 96, seed=3)
    scales[:, 1::2, 0] = 255
    x = torch.randn(20, 96, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ends = ends_of([8, 12])
    assert block_config(20, 2)["BLOCK_K"] == 128
    got, want = mxfp4_grouped_linear(x, ends, blocks, scales), mxfp4_grouped_linear_reference(x, ends, blocks, scales)
    assert want[:, 0::2].isfinite().all() and not want[:, 1::2].isfinite().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, equal_nan=True)


def test_grid_is_a_function_of_shapes(monkeypatch):
    """No tensor value is read on the host (fake tensors have none) and the grid is the documented bound."""
    grids = []
    monkeypatch.setattr(mxfp4_kernel, "_launch", lambda grid, *args, **meta: grids.append((grid, meta)))
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.empty(70, 64))
        ends = mode.from_tensor(torch.empty(5, dtype=torch.int32))
        blocks, scales = (mode.from_tensor(torch.empty(5, 96, 2, *s, dtype=torch.uint8)) for s in ((16,), ()))
        y = mxfp4_grouped_linear(x, ends, blocks, scales)
    (grid, meta), = grids
    assert y.shape == (70, 96) and meta["BLOCK_M"] == block_config(70, 5)["BLOCK_M"] == 16
    assert grid == (70 // 16 + min(5 + 1, 70), -(-96 // meta["BLOCK_N"]))


def test_bad_inputs_are_rejected():
    blocks, scales, bias = packed(2, 32, 64, seed=0)
    ends = ends_of([1, 2])
    with pytest.raises(ValueError, match="x must be"):
        mxfp4_grouped_linear(torch.zeros(3, 96, device=DEVICE), ends, blocks, scales)
    with pytest.raises(ValueError, match="uint8"):
        mxfp4_grouped_linear(torch.zeros(3, 64, device=DEVICE), ends, blocks.float(), scales)
    with pytest.raises(ValueError, match="group_ends"):
        mxfp4_grouped_linear(torch.zeros(3, 64, device=DEVICE), ends[:1], blocks, scales)
    with pytest.raises(ValueError, match="bias"):
        mxfp4_grouped_linear(torch.zeros(3, 64, device=DEVICE), ends, blocks, scales, bias[:, :16])


def test_without_triton_the_wrapper_says_so(monkeypatch):
    monkeypatch.setattr(mxfp4_kernel, "KERNEL_AVAILABLE", False)
    with pytest.raises(RuntimeError, match="triton"):
        mxfp4_grouped_linear(torch.zeros(1, 32), torch.ones(1, dtype=torch.int32),
                             torch.zeros(1, 32, 1, 16, dtype=torch.uint8), torch.zeros(1, 32, 1, dtype=torch.uint8))

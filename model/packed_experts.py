"""PackedMXFP4Experts: an expert backend that keeps the experts in the checkpoint's packed MXFP4 form (~4.25 bits
per weight): on GPU a fused Triton grouped matmul dequantises in registers, elsewhere a torch loop dequantises one
hit expert at a time. Never holds a dense copy of all experts; knows nothing of checkpoints beyond
`Checkpoint.packed_experts`.
Legend: T=tokens, H=hidden, E=experts (local), K=top-k, I=intermediate, P=T*K pairs, R=held pairs, G=in/32 blocks.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from model import mxfp4
from model.config import ModelConfig
from model.moe import group_pairs, swiglu
from model.mxfp4_kernel import KERNEL_AVAILABLE, mxfp4_grouped_linear

PARTS = ("gate_up_proj", "down_proj")
PACKED_BYTES_PER_WEIGHT = (mxfp4.BYTES_PER_BLOCK + 1) / mxfp4.BLOCK    # 16 bytes of codes + 1 scale per 32: 17/32


@functools.lru_cache(maxsize=None)
def _luts(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte -> its two FP4 values [256, 2], E8M0 scale byte -> 2^(s-127) [256]) in `dtype` on `device`.

    Low nibble first (spec §3.4). Both tables are exact in bf16 and fp32, and so is their product, so the values
    equal `mxfp4.dequantize` bit for bit (2^128 for s=255 is inf in both, as in the reference loaders).
    """
    fp4 = torch.tensor(mxfp4.FP4_VALUES, dtype=torch.float32)
    byte = torch.arange(256)
    pairs = torch.stack((fp4[byte & 0x0F], fp4[byte >> 4]), dim=-1)                     # [256, 2]
    scale = torch.ldexp(torch.ones(256), torch.arange(256, dtype=torch.float32) - mxfp4.SCALE_BIAS)  # [256]
    return pairs.to(device=device, dtype=dtype), scale.to(device=device, dtype=dtype)


def dequantize_rows(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks uint8 [rows, G, 16], scales uint8 [rows, G] -> weight [rows, G*32] in `dtype` (two table lookups)."""
    pairs, scale = _luts(blocks.device, dtype)
    vals = F.embedding(blocks.int(), pairs).flatten(-2)                                  # [rows, G, 32]
    vals = vals * F.embedding(scales.int(), scale[:, None])                              # [rows, G, 32]
    return vals.flatten(-2)                                                              # [rows, G*32]


class PackedMXFP4Experts(nn.Module):
    """Experts [first_expert, first_expert + num_experts) of layer `layer_idx`, stored as the checkpoint stores them
    ("out x in", spec §3.2): `*_blocks` uint8 [E, out, in/32, 16], `*_scales` uint8 [E, out, in/32] and `*_bias`
    [E, out] in the activation dtype, all buffers named as in the checkpoint (so loading is a loop).

    forward(t [T, H], expert_ids [T, K], weights [T, K]) -> [T, H], the `ExpertBackend` seam of model/moe.py.
    Pairs routed to experts not held here contribute nothing. Two paths, equal within fp32 rounding:
    - kernel (CUDA tensors with triton, or `use_kernel=True`): pairs sorted by expert, then two launches of
      `mxfp4_grouped_linear` (model/mxfp4_kernel.py), which reads the packed bytes once and dequantises in registers,
      around clamped SwiGLU. Fixed ops per layer, no host sync, shapes depend only on T and K: CUDA-graph safe.
    - loop (CPU serving, and the reference): for each expert that received pairs, its two matrices are dequantised
      into temporaries, then matmul, SwiGLU, matmul. One host sync per layer (`counts.tolist()`).
    Both sum a token's K outputs in fp32 in expert order (as LocalExperts does). `use_kernel`: None chooses the
    kernel for CUDA inputs when triton is installed and no autograd is needed; True/False force a path (True on CPU
    tensors runs Triton's interpreter, for tests). `kernel_variant` ("dequant" or "dot_scaled", bf16 activations
    only, the default; other dtypes take "dequant"; model/mxfp4_kernel.py) picks the kernel's inner product;
    bench/gpu_check.py times both.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, num_experts: int | None = None,
                 first_expert: int = 0, layer_idx: int = 0, use_kernel: bool | None = None):
        super().__init__()
        E = config.num_local_experts if num_experts is None else num_experts
        H, I = config.hidden_size, config.intermediate_size
        if H % mxfp4.BLOCK or I % mxfp4.BLOCK:
            raise ValueError(f"packed MXFP4 experts need hidden_size ({H}) and intermediate_size ({I}) to be "
                             f"multiples of {mxfp4.BLOCK}")
        self.layer_idx = layer_idx
        self.first_expert = first_expert
        self.num_logical_experts = config.num_local_experts       # ids the gate can emit: [0, this)
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        self.dtype = dtype
        self.use_kernel = use_kernel
        self.kernel_variant = "dot_scaled"       # bf16 on CUDA: faster at every shape measured (README)
        for part, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            G = cols // mxfp4.BLOCK
            self.register_buffer(part + "_blocks", torch.empty(E, rows, G, mxfp4.BYTES_PER_BLOCK, dtype=torch.uint8))
            self.register_buffer(part + "_scales", torch.empty(E, rows, G, dtype=torch.uint8))
            self.register_buffer(part + "_bias", torch.empty(E, rows, dtype=dtype))

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj_blocks.shape[0]

    def packed_bytes(self) -> int:
        """Bytes of the packed weights (blocks + scales; biases excluded): 17/32 byte per weight."""
        return sum(getattr(self, p + s).nbytes for p in PARTS for s in ("_blocks", "_scales"))

    def load_from(self, checkpoint, dtype: torch.dtype) -> None:
        """Copy this layer's experts [first, first + num) from `checkpoint.packed_experts`, as stored."""
        lo = self.first_expert
        packed = checkpoint.packed_experts(self.layer_idx, lo, lo + self.num_experts)
        for name, value in packed.items():
            buf = getattr(self, name)
            if tuple(value.shape) != tuple(buf.shape):
                raise ValueError(f"layer {self.layer_idx}: checkpoint tensor {name} has shape {list(value.shape)}, "
                                 f"the packed expert backend expects {list(buf.shape)}")
            with torch.no_grad():
                buf.copy_(value)

    def weight(self, part: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Local expert e's `part` dequantised: [out, in] in `dtype` (a temporary)."""
        return dequantize_rows(getattr(self, part + "_blocks")[e], getattr(self, part + "_scales")[e], dtype)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert e on x [n, H] -> [n, H] (down bias included)."""
        w = self.weight("gate_up_proj", e, x.dtype)                                         # [2I, H]
        h = swiglu(F.linear(x, w, self.gate_up_proj_bias[e].to(x.dtype)), self.alpha, self.limit)  # [n, I]
        w = self.weight("down_proj", e, x.dtype)                                            # [H, I]
        return F.linear(h, w, self.down_proj_bias[e].to(x.dtype))                           # [n, H]

    def kernel_path(self, t: torch.Tensor) -> bool:
        """Whether forward(t, ...) runs the fused kernel path (see the class docstring)."""
        if self.use_kernel is not None:
            return self.use_kernel
        return t.is_cuda and KERNEL_AVAILABLE and not (torch.is_grad_enabled() and t.requires_grad)

    def forward(self, t: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.kernel_path(t):
            return self.forward_fused(t, expert_ids, weights)
        E, K = self.num_experts, expert_ids.shape[1]
        order, _, counts = group_pairs(expert_ids, self.first_expert, E)                    # [P], [E]
        counts = counts.tolist()                                                            # host sync, per layer
        order = order[:sum(counts)]                                                         # [R] held pairs
        rows = order // K                                                                   # [R] token of pair
        outputs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outputs.append(self.expert_forward(e, t.index_select(0, rows[start:start + n])))  # [n, H]
                start += n
        y = torch.cat(outputs) if outputs else t.new_zeros(0, t.shape[1])                  # [R, H]
        y = y.float().mul_(weights.flatten()[order].float()[:, None])                       # [R, H] fp32
        out = torch.zeros(t.shape, dtype=torch.float32, device=t.device)                    # [T, H]
        return out.index_add_(0, rows, y).to(t.dtype)

    def forward_fused(self, t: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The kernel path: every op's shape follows from (T, K) and no value is read on the host. All P pairs go
        through both grouped linears; pairs not held sort after group_ends[-1], where the kernel writes zeros, and
        their routing weight is zeroed, so they add exactly 0 to their token."""
        E, K = self.num_experts, expert_ids.shape[1]
        order, sorted_ids, counts = group_pairs(expert_ids.long(), self.first_expert, E)    # [P], [P], [E]
        ends = counts.cumsum(0, dtype=torch.int32)                                          # [E] group ends
        rows = order // K                                                                   # [P] token of pair
        variant = self.kernel_variant if t.dtype == torch.bfloat16 else "dequant"
        gate_up = mxfp4_grouped_linear(t.index_select(0, rows), ends, self.gate_up_proj_blocks,
                                       self.gate_up_proj_scales, self.gate_up_proj_bias, variant)  # [P, 2I]
        h = swiglu(gate_up, self.alpha, self.limit)                                         # [P, I]
        y = mxfp4_grouped_linear(h, ends, self.down_proj_blocks, self.down_proj_scales,
                                 self.down_proj_bias, variant)                              # [P, H]
        w = weights.flatten()[order].float().masked_fill_(sorted_ids == E, 0.0)             # [P] fp32
        y = y.float().mul_(w[:, None])                                                      # [P, H] fp32
        out = torch.zeros(t.shape, dtype=torch.float32, device=t.device)                    # [T, H]
        return out.index_add_(0, rows, y).to(t.dtype)

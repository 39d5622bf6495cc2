"""Triton as an optional dependency of model/'s kernels: `triton` and `tl` when installed (KERNEL_AVAILABLE), and the
choice between a kernel and its torch path that every kernel wrapper makes the same way."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    KERNEL_AVAILABLE = True
except ImportError:                                    # triton is optional: the torch paths cover every device
    triton = tl = None
    KERNEL_AVAILABLE = False

NO_WINDOW = 1 << 30                                    # what kernels take for window None: more keys than any sequence


if KERNEL_AVAILABLE:
    @triton.jit
    def online_softmax_step(s, v, m, l, acc, DOT_FP32: tl.constexpr):
        """One key tile of an online softmax: scaled scores s [R, KT] (-inf where a key is not seen), values
        v [KT, D]; running max m [R], denominator l [R] and output acc [R, D] (fp32) -> their updates. Rows start
        from a finite m (the attention kernels start it at the sink), so no row ever holds -inf - -inf."""
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])                                              # [R, KT]
        l = l * alpha + tl.sum(p, 1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l, acc


def choose_impl(name: str, impl: str | None, x: torch.Tensor) -> str:
    """impl None -> "triton" for CUDA tensors when triton imports, else "torch"; an explicit choice is validated
    ("triton" on CPU tensors runs only under TRITON_INTERPRET=1, as the tests do)."""
    if impl is None:
        return "triton" if KERNEL_AVAILABLE and x.is_cuda else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"{name}: impl must be 'triton', 'torch' or None, got {impl!r}")
    if impl == "triton" and not KERNEL_AVAILABLE:
        raise RuntimeError(f"{name}: impl='triton' needs the triton package; use impl='torch'")
    return impl

"""load_model: build a GptOssForCausalLM on a device and fill it from a Checkpoint, one tensor at a time.

Builds modules on the meta device (no init cost, no double memory); reads only the experts asked for.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import HF_BF16, Checkpoint
from model.errors import CheckpointError
from model.moe import LocalExperts
from model.packed_experts import PackedMXFP4Experts
from model.transformer import ExpertFactory, GptOssForCausalLM

EXPERT_CHOICES = ("auto", "dense", "packed")
DTYPE_CHOICES = ("auto", "float32", "bfloat16")


def dtype_name(choice: str, device: str | torch.device) -> str:
    """A `--dtype` choice as a torch dtype name: "auto" is bfloat16 on CUDA (the checkpoint's precision; half the
    memory) and float32 elsewhere (CPU matmuls are fastest and exact in fp32)."""
    if choice not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               expert_range: tuple[int, int] | None = None,
               experts: ExpertFactory | str | None = "auto") -> GptOssForCausalLM:
    """All dense weights plus each layer's experts, in `dtype` on `device`. RMSNorm weights stay fp32 (spec §2.1).

    Experts [lo, hi) of every layer (`expert_range`, default all), held as `experts` says: "auto" keeps an MXFP4
    checkpoint's experts packed (PackedMXFP4Experts: 17/32 byte per weight; 229 GB dense for 120b is never built)
    and a bf16 one dense, "dense" LocalExperts, "packed" PackedMXFP4Experts; or any backend built by
    `experts(layer)` that fills itself through `load_from(checkpoint, dtype)` (e.g. an expert-parallel rank's slots).
    None means "dense" (what `expert_factory` returns when experts are not held packed).
    """
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    experts = "dense" if experts is None else experts
    if isinstance(experts, str):
        lo, hi = expert_range or (0, cfg.num_local_experts)
        if packed_experts_chosen(model_dir, device, experts):
            experts = lambda i: PackedMXFP4Experts(cfg, dtype, hi - lo, lo, layer_idx=i)  # noqa: E731
        else:
            experts = lambda _: LocalExperts(cfg, dtype, hi - lo, lo)      # noqa: E731
    with torch.device("meta"):
        model = GptOssForCausalLM(cfg, dtype, experts=experts)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp.experts." not in name:
                param.copy_(ckpt.tensor(name))
        for i, layer in enumerate(model.model.layers):
            backend = layer.mlp.experts
            if hasattr(backend, "load_from"):
                backend.load_from(ckpt, dtype)
            else:
                lo = backend.first_expert
                for key, value in ckpt.experts(i, lo, lo + backend.num_experts, dtype).items():
                    getattr(backend, key).copy_(value)
    return model.eval().requires_grad_(False)


def packed_experts_chosen(model_dir: str | Path, device: str | torch.device, choice: str = "auto") -> bool:
    """Whether experts are held packed: "packed", "dense", or "auto" = packed whenever the checkpoint stores MXFP4
    experts (the fused kernel on CUDA, a loop dequantising one hit expert at a time elsewhere; how gpt-oss-120b fits
    one 80 GB GPU), dense for bf16 checkpoints. "packed" needs an MXFP4 checkpoint. `device` is kept for callers."""
    if choice not in EXPERT_CHOICES:
        raise ValueError(f"experts must be one of {EXPERT_CHOICES}, got {choice!r}")
    mxfp4 = Checkpoint(model_dir).layout != HF_BF16
    if choice == "packed" and not mxfp4:
        raise CheckpointError(f"{model_dir}: experts are stored unquantised (bf16); packed MXFP4 experts need an "
                              "MXFP4 checkpoint (use experts 'dense')")
    return choice == "packed" or (choice == "auto" and mxfp4)


def expert_factory(model_dir: str | Path, dtype: torch.dtype, device: str | torch.device,
                   choice: str = "auto") -> ExpertFactory | None:
    """The experts a single-process model holds (see packed_experts_chosen): PackedMXFP4Experts (MXFP4 bytes in
    memory, ~4x smaller; the fused kernel on CUDA), or None for dense LocalExperts (load_model(experts="dense"))."""
    if not packed_experts_chosen(model_dir, device, choice):
        return None
    cfg = Checkpoint(model_dir).config
    return lambda i: PackedMXFP4Experts(cfg, dtype, layer_idx=i)

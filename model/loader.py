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


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               expert_range: tuple[int, int] | None = None,
               experts: ExpertFactory | None = None) -> GptOssForCausalLM:
    """All dense weights plus each layer's experts, in `dtype` on `device`. RMSNorm weights stay fp32 (spec §2.1).

    Experts: [lo, hi) of every layer as LocalExperts (default: all), or any backend built by `experts(layer)`
    that fills itself through `load_from(checkpoint, dtype)` (e.g. an expert-parallel rank's slots).
    """
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    if experts is None:
        lo, hi = expert_range or (0, cfg.num_local_experts)
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
    """Whether experts are held packed: "packed", "dense", or "auto" = packed on CUDA when the checkpoint stores MXFP4
    experts (how gpt-oss-120b fits one 80 GB GPU), dense elsewhere. "packed" needs an MXFP4 checkpoint."""
    if choice not in EXPERT_CHOICES:
        raise ValueError(f"experts must be one of {EXPERT_CHOICES}, got {choice!r}")
    mxfp4 = Checkpoint(model_dir).layout != HF_BF16
    if choice == "packed" and not mxfp4:
        raise CheckpointError(f"{model_dir}: experts are stored unquantised (bf16); packed MXFP4 experts need an "
                              "MXFP4 checkpoint (use experts 'dense')")
    return choice == "packed" or (choice == "auto" and mxfp4 and torch.device(device).type == "cuda")


def expert_factory(model_dir: str | Path, dtype: torch.dtype, device: str | torch.device,
                   choice: str = "auto") -> ExpertFactory | None:
    """The experts a single-process model holds (see packed_experts_chosen): PackedMXFP4Experts (MXFP4 bytes in
    memory, ~4x smaller; the fused kernel on CUDA), or None for load_model's default, dense LocalExperts."""
    if not packed_experts_chosen(model_dir, device, choice):
        return None
    cfg = Checkpoint(model_dir).config
    return lambda i: PackedMXFP4Experts(cfg, dtype, layer_idx=i)

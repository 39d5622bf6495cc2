"""load_model: build a GptOssForCausalLM on a device and fill it from a Checkpoint, one tensor at a time.

Builds modules on the meta device (no init cost, no double memory); reads only the experts asked for.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import Checkpoint
from model.moe import LocalExperts
from model.transformer import GptOssForCausalLM


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               expert_range: tuple[int, int] | None = None) -> GptOssForCausalLM:
    """All dense weights plus experts [lo, hi) of every layer (default: all), in `dtype` on `device`.

    RMSNorm weights stay fp32 whatever `dtype` is (spec §2.1).
    """
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    lo, hi = expert_range or (0, cfg.num_local_experts)
    with torch.device("meta"):
        model = GptOssForCausalLM(cfg, dtype, experts=lambda _: LocalExperts(cfg, dtype, hi - lo, lo))
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp.experts." not in name:
                param.copy_(ckpt.tensor(name))
        for i, layer in enumerate(model.model.layers):
            for key, value in ckpt.experts(i, lo, hi, dtype).items():
                getattr(layer.mlp.experts, key).copy_(value)
    return model.eval().requires_grad_(False)

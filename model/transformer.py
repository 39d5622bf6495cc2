"""The gpt-oss network: embedding, decoder layers (attention + MoE, pre-norm residuals), final norm, lm_head.

Module paths equal the HF checkpoint names (`model.layers.N.self_attn.q_proj.weight` ...), so loading is a loop.
Legend: T=tokens, H=hidden, V=vocab.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from model.attention import Attention, AttentionMetadata, DenseMetadata
from model.config import ModelConfig
from model.layers import RMSNorm, RotaryEmbedding
from model.moe import MLP, LocalExperts

ExpertFactory = Callable[[int], nn.Module]  # layer index -> expert backend module


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, experts: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, experts, dtype)

    def forward(self, x, cos, sin, metadata):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, metadata)
        return x + self.mlp(self.post_attention_layernorm(x))


class GptOssModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, experts: ExpertFactory):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, experts(i), dtype)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)                                                     # [T, H]
        cos, sin = self.rotary(positions, x.dtype)                                           # [T, D/2]
        for layer in self.layers:
            x = layer(x, cos, sin, metadata)
        return self.norm(x)


class GptOssForCausalLM(nn.Module):
    """`forward` returns final hidden states [T, H]; `compute_logits` turns the rows that need them into fp32 [*, V].

    `experts` builds each layer's expert backend; by default all experts, held locally.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 experts: ExpertFactory | None = None):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.model = GptOssModel(config, dtype, experts or (lambda _: LocalExperts(config, dtype)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()                                                  # [T, V]

    @torch.no_grad()
    def prefix_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One whole sequence from position 0, no KV cache: ids [T] -> fp32 logits [T, V] (the reference path)."""
        metadata = DenseMetadata([input_ids.shape[0]], device=input_ids.device)
        return self.compute_logits(self(input_ids, metadata.positions, metadata))

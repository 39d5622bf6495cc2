"""ModelRunner: turns a ScheduledBatch into one forward pass over the paged KV cache and returns logits.

Owns the KV cache tensors; never decides what runs (Scheduler) nor samples (Sampler).
Legend: T=step tokens, R=sampling rows, V=vocab.
"""
from __future__ import annotations

import logging

import torch

from engine import config as engine_config
from engine.config import CacheConfig
from engine.decode_graphs import DecodeGraphs, capture_sizes
from engine.scheduled_batch import ScheduledBatch
from model import paged_attention
from model.decode_metadata import DecodeMetadata
from model.paged_attention import PagedKVCache, PagedMetadata, SeqSpan
from model.transformer import GptOssForCausalLM

logger = logging.getLogger(__name__)

assert (engine_config.FULL, engine_config.SLIDING) == (paged_attention.FULL, paged_attention.SLIDING)


@torch.no_grad()
def profile_forward(model: GptOssForCausalLM, device: torch.device, num_tokens: int, num_rows: int,
                    block_size: int) -> torch.Tensor:
    """The largest step's forward, for memory profiling: one sequence of `num_tokens` tokens from position 0 through a
    throwaway cache, then the logits of `num_rows` rows ([num_rows, V] fp32, returned for the sampler's share)."""
    cfg, n = model.config, -(-num_tokens // block_size)
    groups = {paged_attention.SLIDING if cfg.is_sliding(i) else paged_attention.FULL
              for i in range(cfg.num_hidden_layers)}
    cache = PagedKVCache(cfg, {g: n for g in groups}, block_size, model.dtype, device)
    metadata = PagedMetadata(cache, [SeqSpan(0, num_tokens, {g: list(range(n)) for g in groups})], device)
    hidden = model(torch.zeros(num_tokens, dtype=torch.long, device=device), metadata.positions, metadata)  # [T, H]
    return model.compute_logits(hidden[:num_rows])                                                  # [R, V]


class ModelRunner:
    """Decode-only steps (every row one token that samples) take the static-shape decode path: replayed CUDA
    graphs on CUDA when `cuda_graphs` (sizes up to max_num_seqs, captured at start), else DecodeMetadata eagerly.
    Steps with prefill chunks take PagedMetadata.
    `peers`: set when this runner's forwards share collectives with other ranks' (expert parallelism): called before
    every forward with its rows, it returns the rows all ranks agreed to run this step (>= ours, rounded up to one of
    `graph_sizes` on CUDA whether or not this rank captured), and a decode step replays the graph of that size, so
    every rank runs the same shapes."""

    def __init__(self, model: GptOssForCausalLM, cache_config: CacheConfig, device: torch.device | str,
                 max_num_seqs: int = 1, max_model_len: int = 1, cuda_graphs: bool = False):
        self.model = model
        self.device = torch.device(device)
        self.kv_cache = PagedKVCache(model.config, {g: cache_config.num_blocks(g) for g in cache_config.groups},
                                     cache_config.block_size, model.dtype, self.device)
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.graphs = None
        self.graph_sizes = capture_sizes(max_num_seqs) if self.device.type == "cuda" else []   # captured or not
        self.peers = None
        if cuda_graphs and self.device.type == "cuda":
            self.capture_graphs()
        self.forwards = 0                                   # forward passes run (EP ranks report it)
        self.last_rows = (0, 0, False)          # (rows the last forward saw, real rows first among them, graphed)
        self.step_rows = 0                      # rows every rank runs this step (peers' agreement; else ours)

    def capture_graphs(self) -> None:
        """Capture the decode graphs of every size (again: EP ranks do it together after their group changed, since a
        graph keeps its collectives' communicator and shapes); if capture fails, decode eagerly."""
        self.graphs = None
        graphs = DecodeGraphs(self.model, self.kv_cache, self.max_num_seqs, self.max_model_len, self.device)
        try:
            graphs.capture_all()
            self.graphs = graphs
        except RuntimeError as e:           # a backend that syncs (e.g. an expert loop): decode eagerly instead
            logger.warning("decode CUDA graphs disabled, capture failed: %s", str(e).splitlines()[0])

    @torch.no_grad()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Forward the batch; logits [R, V] fp32 of the sampling rows' last tokens, in row order."""
        self.forwards += 1
        spans = [SeqSpan(s.start_position, s.num_tokens, s.block_tables) for s in batch.seqs]
        self.last_rows = (batch.num_tokens, batch.num_tokens, False)
        self.step_rows = batch.num_tokens if self.peers is None else self.peers(batch.num_tokens)
        if all(s.num_tokens == 1 and s.samples for s in batch.seqs):
            return self._decode(spans, batch.input_ids())
        metadata = PagedMetadata(self.kv_cache, spans, self.device)
        input_ids = torch.tensor(batch.input_ids(), device=self.device)                    # [T]
        hidden = self.model(input_ids, metadata.positions, metadata)                        # [T, H]
        last, rows = 0, []
        for s in batch.seqs:
            last += s.num_tokens
            if s.samples:
                rows.append(last - 1)
        if len(rows) < hidden.shape[0]:                   # else every row samples (a decode-only step): no gather
            hidden = hidden[torch.tensor(rows, dtype=torch.long, device=self.device)]       # [R, H]
        return self.model.compute_logits(hidden)                                            # [R, V]

    def _decode(self, spans: list[SeqSpan], token_ids: list[int]) -> torch.Tensor:
        if self.graphs is not None and self.step_rows <= self.graphs.max_size:
            size = self.graphs.size_for(self.step_rows)                                     # padded graph rows
            self.last_rows = (size, len(spans), True)
            return self.graphs.run(spans, token_ids, size)                                  # [N, V]
        metadata = DecodeMetadata.for_step(self.kv_cache, spans, token_ids, self.device)
        hidden = self.model(metadata.input_ids, metadata.positions, metadata)               # [N, H]
        return self.model.compute_logits(hidden)                                            # [N, V]

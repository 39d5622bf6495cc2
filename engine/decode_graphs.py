"""DecodeGraphs: the decode forward (model + logits) captured as CUDA graphs at fixed batch sizes.

A decode step of N sequences replays the graph of the smallest captured size >= N: its DecodeMetadata buffers get
the step's rows (the rest is padding), one host-to-device copy, one replay, logits [N, V] read from the graph's
output. The model must be free of host synchronisation and data-dependent shapes on this path (DecodeMetadata,
model/decode_attention.py, the grouped expert paths, expert parallelism's fixed-capacity dispatch); a backend that
needs the host (the variable-split all-to-all) must not be captured (EngineConfig.cuda_graphs=False).
With capture=False the same static-buffer path runs eagerly (how CPU tests check everything but the capture).
Legend: N=sequences of the step, S=captured size, V=vocab.
"""
from __future__ import annotations

import logging

import torch

from model.decode_metadata import DecodeMetadata, table_columns
from model.paged_attention import PagedKVCache, SeqSpan
from model.transformer import GptOssForCausalLM

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_num_seqs (itself included): padding wastes < 8 rows."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8)) + [max_num_seqs]
    return sorted(set(sizes))


class _Entry:
    def __init__(self, metadata: DecodeMetadata, logits: torch.Tensor, graph=None):
        self.metadata, self.logits, self.graph = metadata, logits, graph


class DecodeGraphs:
    def __init__(self, model: GptOssForCausalLM, cache: PagedKVCache, max_num_seqs: int, max_model_len: int,
                 device: torch.device, capture: bool = True):
        self.model, self.cache, self.device, self.capture = model, cache, torch.device(device), capture
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        self.sizes = capture_sizes(max_num_seqs)
        self.columns = table_columns(cache, max_model_len)
        self._entries: dict[int, _Entry] = {}
        self._pool = None

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def size_for(self, num_rows: int) -> int:
        return next(s for s in self.sizes if s >= num_rows)

    @torch.no_grad()
    def run(self, spans: list[SeqSpan], token_ids: list[int], size: int | None = None) -> torch.Tensor:
        """Decode rows (one token each) -> logits [N, V] fp32: a view of the graph's output, valid until the
        next run (the sampler reads it first). `size`: the captured size to run (default the smallest that fits)."""
        entry = self.entry(self.size_for(len(spans)) if size is None else size)
        entry.metadata.fill(spans, token_ids)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            entry.logits = self._forward(entry.metadata)
        return entry.logits[:len(spans)]

    def capture_all(self) -> None:
        """Capture every size now (largest first, so smaller graphs reuse its memory pool)."""
        for size in reversed(self.sizes):
            self.entry(size)
        logger.info("decode CUDA graphs ready for batch sizes %s", self.sizes)

    def entry(self, size: int) -> _Entry:
        if size not in self._entries:
            self._entries[size] = self._build(size)
        return self._entries[size]

    def _forward(self, metadata: DecodeMetadata) -> torch.Tensor:
        hidden = self.model(metadata.input_ids, metadata.positions, metadata)                    # [S, H]
        return self.model.compute_logits(hidden)                                                 # [S, V]

    @torch.no_grad()
    def _build(self, size: int) -> _Entry:
        metadata = DecodeMetadata(self.cache, size, self.columns, self.device)
        metadata.fill([], [])                                  # all padding: reads nothing, writes scratch slots
        if not self.capture:
            return _Entry(metadata, self._forward(metadata))
        stream = torch.cuda.Stream(self.device)                # warm-up off the capture (lazy inits, autotuning)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(metadata)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(metadata)
        self._pool = graph.pool()
        return _Entry(metadata, logits, graph)

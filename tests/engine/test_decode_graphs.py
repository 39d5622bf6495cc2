"""The static-shape decode path (DecodeMetadata; DecodeGraphs' buffers and padding, replayed eagerly on CPU)
against the paged path (PagedMetadata) it replaces for decode-only steps, and its freedom from host syncs."""
import dataclasses

import pytest
import torch

from engine.decode_graphs import DecodeGraphs, capture_sizes
from engine.engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from model.paged_attention import PagedMetadata
from tests.sync_guard import HostSyncGuard

CONFIG = EngineConfig(max_num_seqs=6, max_num_batched_tokens=64, block_size=4, max_model_len=256)


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


def paged_decode(runner):
    """The runner's decode through PagedMetadata (the path prefill steps take), for comparison."""
    def decode(spans, token_ids):
        metadata = PagedMetadata(runner.kv_cache, spans, runner.device)
        hidden = runner.model(torch.tensor(token_ids), metadata.positions, metadata)
        return runner.model.compute_logits(hidden)
    return decode


def recorded_run(engine, log):
    """Wrap runner.run to keep (decode-only?, logits) of every step."""
    run = engine.runner.run

    def wrapped(batch):
        logits = run(batch)
        log.append((all(s.num_tokens == 1 for s in batch.seqs), batch.num_seqs, logits.clone()))
        return logits
    engine.runner.run = wrapped


def generate(engine, prompts):
    return [r[0].output_token_ids for r in engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12,
                                                                                   ignore_eos=True))]


def test_decode_paths_agree_step_by_step(tiny_model, ragged_prompts):
    prompts = ragged_prompts[::2]                                      # 12 prompts, 1..190 tokens, 6 at a time
    engines = {name: LLMEngine(tiny_model, CONFIG) for name in ("paged", "eager", "graphs")}
    engines["paged"].runner._decode = paged_decode(engines["paged"].runner)
    runner = engines["graphs"].runner
    runner.graphs = DecodeGraphs(tiny_model, runner.kv_cache, CONFIG.max_num_seqs, CONFIG.max_model_len,
                                 runner.device, capture=False)
    logs = {name: [] for name in engines}
    for name, engine in engines.items():
        recorded_run(engine, logs[name])
    tokens = {name: generate(engine, prompts) for name, engine in engines.items()}
    assert tokens["eager"] == tokens["paged"] and tokens["graphs"] == tokens["paged"]
    decode_sizes = {n for decode, n, _ in logs["graphs"] if decode}
    assert {3, 5} & decode_sizes, f"no padded decode step ran: sizes {decode_sizes}"
    assert len(logs["paged"]) == len(logs["eager"]) == len(logs["graphs"])
    for (decode, _, ref), (_, _, eager), (_, _, graphs) in zip(logs["paged"], logs["eager"], logs["graphs"]):
        torch.testing.assert_close(eager, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(graphs, ref, rtol=0, atol=1e-5)
    for engine in engines.values():
        bm = engine.block_manager
        assert all(bm.num_free_blocks(g) == bm.num_total_blocks(g) for g in bm.config.groups)


def test_padding_rows_touch_only_the_scratch_slot(tiny_model, ragged_prompts):
    engine = LLMEngine(tiny_model, CONFIG)
    runner = engine.runner
    graphs = DecodeGraphs(tiny_model, runner.kv_cache, 8, 256, runner.device, capture=False)
    engine.add_request("a", ragged_prompts[5], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.step()                                                            # prefill
    batch = engine.scheduler.schedule()
    assert [s.num_tokens for s in batch.seqs] == [1]
    cache = runner.kv_cache
    before = [(k.clone(), v.clone()) for k, v in zip(cache.k_heads, cache.v_heads)]
    logits = graphs.run([s for s in _spans(batch)], batch.input_ids())        # 1 row in a size-1 entry
    padded = graphs.entry(8)
    padded.metadata.fill(_spans(batch), batch.input_ids())
    wide = graphs._forward(padded.metadata)                                  # 1 row + 7 padding rows
    torch.testing.assert_close(wide[:1], logits, rtol=0, atol=1e-5)
    assert torch.isfinite(wide).all()
    seq = batch.seqs[0]
    for layer, (k, v) in enumerate(zip(cache.k_heads, cache.v_heads)):
        group = cache.groups[layer]
        written = seq.block_tables[group][seq.start_position // 4] * 4 + seq.start_position % 4
        changed = ((k != before[layer][0]).any(-1) | (v != before[layer][1]).any(-1)).any(0)    # [slots]
        allowed = {written, cache.scratch_slot(group)}
        assert set(torch.nonzero(changed).flatten().tolist()) <= allowed
        assert changed[written]


def _spans(batch):
    from model.paged_attention import SeqSpan
    return [SeqSpan(s.start_position, s.num_tokens, s.block_tables) for s in batch.seqs]


@pytest.mark.parametrize("num_rows", [3, 6])
def test_decode_forward_never_reads_back_to_the_host(tiny_model, ragged_prompts, num_rows):
    """The forward a CUDA graph would capture (model + logits over DecodeMetadata, LocalExperts' grouped GEMM,
    torch decode attention) issues no op that syncs; the step's one read-back is the sampler's."""
    engine = LLMEngine(tiny_model, CONFIG)
    runner = engine.runner
    graphs = DecodeGraphs(tiny_model, runner.kv_cache, CONFIG.max_num_seqs, CONFIG.max_model_len, runner.device,
                          capture=False)
    for i in range(num_rows):
        engine.add_request(f"r{i}", ragged_prompts[i * 3], SamplingParams(temperature=0.0, max_tokens=8,
                                                                          ignore_eos=True))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or \
            engine.scheduler.num_waiting:
        engine.step()
    batch = engine.scheduler.schedule()
    assert batch.num_seqs == num_rows and all(s.num_tokens == 1 for s in batch.seqs)
    entry = graphs.entry(graphs.size_for(num_rows))
    entry.metadata.fill(_spans(batch), batch.input_ids())
    assert tiny_model.model.layers[0].mlp.experts.grouped_ok(torch.zeros(1, 64))   # the GEMM path a GPU takes
    with HostSyncGuard() as guard:
        logits = graphs._forward(entry.metadata)
    assert guard.ops > 100
    expected = paged_decode(runner)(_spans(batch), batch.input_ids())   # cache already holds this step's k/v
    torch.testing.assert_close(logits[:num_rows], expected, rtol=0, atol=1e-5)


def test_mixed_step_forward_never_reads_back_to_the_host(tiny_model, ragged_prompts):
    """Prefill chunks + decodes (PagedMetadata): once the step's metadata is built, the forward does not sync
    either (no boolean-mask gathers per layer), so the host can queue a whole step ahead of the GPU."""
    engine = LLMEngine(tiny_model, CONFIG)
    for i in range(3):
        engine.add_request(f"r{i}", ragged_prompts[10 + i], SamplingParams(temperature=0.0, max_tokens=8,
                                                                           ignore_eos=True))
    engine.step()
    engine.add_request("late", ragged_prompts[20], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    batch = engine.scheduler.schedule()
    sizes = [s.num_tokens for s in batch.seqs]
    assert 1 in sizes and max(sizes) > 1, sizes                              # decodes and a prefill chunk
    runner = engine.runner
    metadata = PagedMetadata(runner.kv_cache, _spans(batch), runner.device)
    ids = torch.tensor(batch.input_ids())
    with HostSyncGuard() as guard:
        hidden = tiny_model(ids, metadata.positions, metadata)
    assert guard.ops > 100 and hidden.shape == (len(ids), tiny_model.config.hidden_size)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager_decode_on_the_gpu(tiny_model_dir, ragged_prompts):
    """Captured graphs (packed MXFP4 experts through the Triton kernel, Triton decode attention) replayed with
    padding give the eager decode's tokens and logits; the engine really replays (a graph per size)."""
    from model.config import ModelConfig
    from model.loader import load_model
    from model.packed_experts import PackedMXFP4Experts
    cfg = ModelConfig.from_dir(tiny_model_dir)
    model = load_model(tiny_model_dir, torch.float32, "cuda",
                       experts=lambda i: PackedMXFP4Experts(cfg, torch.float32, layer_idx=i))
    graphs, eager = (LLMEngine(model, dataclasses.replace(CONFIG, cuda_graphs=on)) for on in (True, False))
    assert graphs.runner.graphs is not None and eager.runner.graphs is None
    logs = {"graphs": [], "eager": []}
    recorded_run(graphs, logs["graphs"])
    recorded_run(eager, logs["eager"])
    prompts = ragged_prompts[::2]
    assert generate(graphs, prompts) == generate(eager, prompts)
    for (decode, _, a), (_, _, b) in zip(logs["graphs"], logs["eager"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)

"""An EP rank's decode step in one process (a gloo group of one, the EP code path end to end): the same greedy tokens
as the plain engine on the 24 ragged prompts, through the padded static decode path a CUDA graph captures; its
forward reads nothing back to the host and makes two collectives per MoE layer, while the variable path (and a
read-back slipped into the fixed one) trips the sync guard."""
import datetime

import pytest
import torch
import torch.distributed as dist

from cluster import ep_dispatch
from cluster.ep_experts import EPExperts, EPStats
from cluster.expert_placement import ExpertPlacement
from cluster.process_group import free_port
from engine.decode_graphs import DecodeGraphs
from engine.engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from model.config import ModelConfig
from model.decode_metadata import DecodeMetadata
from model.loader import load_model
from model.paged_attention import SeqSpan
from tests.sync_guard import HostSyncError, HostSyncGuard

CONFIG = EngineConfig(max_num_seqs=6, max_num_batched_tokens=64, block_size=4, max_model_len=256)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def group():
    """The default process group: gloo, one rank."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port('127.0.0.1')}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def ep_engine(model_dir, dispatch: str, redundant: int = 0, static_decode: bool = False):
    """An LLMEngine whose MoE layers are EPExperts of rank 0 of 1 (attached: the runner agrees, then counts)."""
    cfg = ModelConfig.from_dir(model_dir)
    stats = EPStats(cfg.num_hidden_layers, cfg.num_local_experts, "cpu")
    placement = ExpertPlacement.initial(cfg.num_hidden_layers, cfg.num_local_experts, 1, redundant)
    model = load_model(model_dir, experts=lambda i: EPExperts(cfg, i, 0, 1, placement, stats, torch.float32,
                                                              dispatch=dispatch))
    engine = LLMEngine(model, CONFIG)
    runner = engine.runner
    if static_decode:           # the path CUDA graphs capture, run eagerly (the padding included)
        runner.graphs = DecodeGraphs(model, runner.kv_cache, CONFIG.max_num_seqs, CONFIG.max_model_len,
                                     runner.device, capture=False)
        runner.graph_sizes = runner.graphs.sizes
    stats.step.attach(runner)
    return engine, stats


def tokens(engine, prompts):
    return [r[0].output_token_ids for r in engine.generate(prompts, GREEDY)]


@pytest.mark.parametrize("redundant,static_decode", [(0, True), (3, False)])
def test_ep_path_gives_the_plain_engines_tokens(group, tiny_model, tiny_model_dir, ragged_prompts, redundant,
                                                static_decode):
    want = tokens(LLMEngine(tiny_model, CONFIG), ragged_prompts)
    engine, stats = ep_engine(tiny_model_dir, "fixed", redundant, static_decode)
    rows = []
    run = engine.runner.run
    engine.runner.run = lambda batch: (run(batch), rows.append(engine.runner.last_rows))[0]
    assert tokens(engine, ragged_prompts) == want
    assert any(graphed for _, _, graphed in rows) == static_decode       # decode steps took the graphs' path
    assert stats.step.agreements == engine.runner.forwards


def decode_forward(engine, num_rows: int, prompts):
    """A decode-only step's forward input, once `num_rows` prompts are prefilled."""
    for i in range(num_rows):
        engine.add_request(f"r{i}", prompts[i * 3], GREEDY)
    while engine.scheduler.num_waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                              for s in engine.scheduler.running):
        engine.step()
    batch = engine.scheduler.schedule()
    assert batch.num_seqs == num_rows and all(s.num_tokens == 1 for s in batch.seqs)
    spans = [SeqSpan(s.start_position, s.num_tokens, s.block_tables) for s in batch.seqs]
    return DecodeMetadata.for_step(engine.runner.kv_cache, spans, batch.input_ids(), engine.runner.device)


def test_ep_decode_forward_never_reads_back_and_makes_two_collectives_per_layer(group, tiny_model_dir,
                                                                                ragged_prompts, monkeypatch):
    engine, stats = ep_engine(tiny_model_dir, "fixed", redundant=2)
    metadata = decode_forward(engine, 4, ragged_prompts)
    stats.step.agree(4)                                # the runner's agreement, before the forward
    before = stats.collectives
    with HostSyncGuard() as guard:
        engine.model(metadata.input_ids, metadata.positions, metadata)
    layers = engine.model.config.num_hidden_layers
    assert guard.ops > 100 and stats.collectives - before == 2 * layers

    unpack = ep_dispatch.RowLayout.unpack               # the guard fails once a read-back is added to the path

    def unpack_reading_back(self, recv, first_slot, num_slots):
        recv[0, 0].item()
        return unpack(self, recv, first_slot, num_slots)
    monkeypatch.setattr(ep_dispatch.RowLayout, "unpack", unpack_reading_back)
    with pytest.raises(HostSyncError, match="_local_scalar_dense"), HostSyncGuard():
        engine.model(metadata.input_ids, metadata.positions, metadata)


def test_variable_path_reads_split_sizes_back_every_layer(group, tiny_model_dir, ragged_prompts):
    engine, stats = ep_engine(tiny_model_dir, "variable")
    metadata = decode_forward(engine, 3, ragged_prompts)
    with pytest.raises(HostSyncError), HostSyncGuard():
        engine.model(metadata.input_ids, metadata.positions, metadata)
    before = stats.collectives
    engine.model(metadata.input_ids, metadata.positions, metadata)
    assert stats.collectives - before == 4 * engine.model.config.num_hidden_layers

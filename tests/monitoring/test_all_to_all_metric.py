"""epserve_all_to_all_seconds' source, EPExperts' clock: it times the dispatch and combine collectives and not the
expert MLP between them, and never synchronises the device on the step path (CUDA: events, read after the step). One rank, with collectives and MLP replaced by
fakes of known duration (no process group needed)."""
import time

import pytest
import torch

from cluster import ep_experts
from cluster.ep_experts import EPExperts, EPStats
from cluster.expert_placement import ExpertPlacement
from model.config import ModelConfig
from model.moe import route
from model.tiny import TinySpec, write_tiny

SPEC = TinySpec(seed=3, layers=1, hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=32, experts=4, top_k=2,
                vocab=1024, sliding_window=8, shards=1)
COLLECTIVE_S, MLP_S = 0.04, 0.3


@pytest.fixture(params=["fixed", "variable"])
def experts(tmp_path, monkeypatch, request):
    cfg = ModelConfig.from_dir(write_tiny(tmp_path / "m", SPEC))
    stats = EPStats(1, SPEC.experts, "cpu")
    layer = EPExperts(cfg, 0, rank=0, ep_size=1, placement=ExpertPlacement.initial(1, SPEC.experts, 1, 0),
                      stats=stats, dtype=torch.float32, dispatch=request.param)
    calls = []

    def collective(out, x, recv, send):          # one rank: what is sent comes back
        calls.append("collective")
        time.sleep(COLLECTIVE_S)
        out.copy_(x)

    def mlp(x, slot):
        calls.append("mlp")
        time.sleep(MLP_S)
        return 2 * x

    def held_mlp(x, local, w):                   # the fixed path: rows weighted and summed where they are held
        return mlp(x, local) * w.sum(dim=1, keepdim=True)
    monkeypatch.setattr(layer, "_collective", collective)
    monkeypatch.setattr(layer, "_grouped_mlp", mlp)
    monkeypatch.setattr(layer, "_held_mlp", held_mlp)
    return layer, stats, calls


def test_all_to_all_time_is_the_collectives_and_not_the_expert_mlp(experts, monkeypatch):
    layer, stats, calls = experts
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append(a))
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, SPEC.hidden, generator=g)
    weights, ids = route(torch.randn(6, SPEC.experts, generator=g), SPEC.top_k)
    out = layer(t, ids, weights)
    torch.testing.assert_close(out, 2 * t * weights.sum(dim=1, keepdim=True))   # the fakes ran, in order
    before = 3 if layer.dispatch == "variable" else 1      # counts, rows, slots | rows with their routing
    assert calls == ["collective"] * before + ["mlp", "collective"]                 # ... | MLP | combine
    counts, seconds = stats.take()
    n = before + 1
    assert n * COLLECTIVE_S <= seconds < n * COLLECTIVE_S + MLP_S / 2, seconds       # with the MLP: + 0.3
    assert int(counts.sum()) == 6 * SPEC.top_k and stats.all_to_all_s == 0.0
    assert synced == []                                                    # CPU: never a device sync


def test_cuda_timing_records_events_and_reads_them_after_the_step(monkeypatch):
    """On CUDA, mark() records an event (no sync) and take() sums event pairs' elapsed times."""
    synced, recorded = [], []

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = 0.25 * len(recorded)
            recorded.append(self)

        def synchronize(self):
            synced.append(self)

        def elapsed_time(self, end):          # milliseconds, as CUDA reports
            return (end.t - self.t) * 1e3
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("a device sync on the step path"))
    stats = EPStats(1, 2, "cpu")
    cuda = torch.device("cuda", 0)
    for _ in range(2):
        stats.add(stats.mark(cuda), stats.mark(cuda))
    assert len(recorded) == 4 and synced == []
    _, seconds = stats.take()
    assert seconds == pytest.approx(0.5) and len(synced) == 2
    assert stats.take()[1] == 0.0

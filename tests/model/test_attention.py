"""Sinks, the sliding-window boundary and GQA, on cases small enough to check by hand (gpt-oss-spec.md §2.3)."""
import math

import torch

from model.attention import DenseMetadata, sink_attention, window_mask


def test_sink_takes_its_share_and_has_no_value():
    q = torch.zeros(1, 1, 2)
    k = torch.zeros(1, 1, 2)                                   # one key, score 0
    v = torch.tensor([[[3.0, -1.0]]])
    sink = torch.tensor([math.log(3.0)])                       # exp(sink) = 3 -> key weight 1 / (1 + 3)
    o = sink_attention(q, k, v, sink, torch.ones(1, 1, dtype=torch.bool), sm_scale=1.0)
    assert torch.allclose(o[0, 0], torch.tensor([0.75, -0.25]))


def test_sink_is_not_multiplied_by_sm_scale():
    q = torch.tensor([[[2.0]]])
    k = torch.tensor([[[1.0]]])                                # score = 2 * 1 * 0.5 = 1
    v = torch.tensor([[[1.0]]])
    o = sink_attention(q, k, v, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool), sm_scale=0.5)
    assert o.item() == 0.5                                     # e^1 / (e^1 + e^1): the sink logit is 1, not 0.5


def test_window_covers_w_keys_including_the_token_itself():
    pos = torch.arange(6)
    m = window_mask(pos, pos, window=3)
    assert m[5].tolist() == [False, False, False, True, True, True]   # keys 3, 4, 5
    assert m[1].tolist() == [True, True, False, False, False, False]  # causal
    assert window_mask(pos, pos, None)[5].all()


def test_gqa_query_head_h_reads_kv_head_h_div_groups():
    T, D = 1, 1
    q = torch.zeros(T, 4, D)                                   # 4 query heads, 2 KV heads
    k = torch.zeros(T, 2, D)
    v = torch.tensor([[[10.0], [20.0]]])
    o = sink_attention(q, k, v, torch.full((4,), -1e9), torch.ones(1, 1, dtype=torch.bool), 1.0)
    assert o[0, :, 0].tolist() == [10.0, 10.0, 20.0, 20.0]


def test_dense_metadata_isolates_sequences_and_restarts_positions():
    md = DenseMetadata([2, 3])
    assert md.positions.tolist() == [0, 1, 0, 1, 2]
    q = torch.zeros(5, 1, 1)
    k = torch.zeros(5, 1, 1)
    v = torch.arange(5.0).view(5, 1, 1)
    o = md.attend(0, q, k, v, torch.tensor([-1e9]), None, 1.0)
    # equal scores: each token averages the values of its own sequence's prefix
    assert o[:, 0, 0].tolist() == [0.0, 0.5, 2.0, 2.5, 3.0]
    o = md.attend(0, q, k, v, torch.tensor([-1e9]), 2, 1.0)
    assert o[:, 0, 0].tolist() == [0.0, 0.5, 2.0, 2.5, 3.5]     # window 2: token 4 sees keys 3 and 4 only

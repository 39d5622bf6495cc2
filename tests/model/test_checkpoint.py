"""Checkpoint layouts (HF MXFP4, HF bf16 experts, original/), expert ranges, and user errors."""
import json
import shutil

import pytest
import safetensors
import torch

import model.checkpoint as checkpoint_module
from model.checkpoint import HF_BF16, HF_MXFP4, ORIGINAL, Checkpoint
from model.errors import CheckpointError
from model.loader import load_model
from tests.model.conftest import SPECS


def ids_for(spec, n=40):
    return torch.randint(0, spec.vocab, (n,), generator=torch.Generator().manual_seed(5))


def test_layout_detection(tiny_dirs, tmp_path):
    mx, bf = tiny_dirs("topk_all"), tiny_dirs("topk_all", experts_format="bf16")
    assert Checkpoint(mx).layout == HF_MXFP4 and Checkpoint(bf).layout == HF_BF16
    assert Checkpoint(mx / "original").layout == ORIGINAL
    only_original = tmp_path / "m"
    shutil.copytree(mx / "original", only_original / "original")
    assert Checkpoint(only_original).layout == ORIGINAL


@pytest.mark.parametrize("name", ["topk_all", "hd64"])
def test_mxfp4_bf16_and_original_give_identical_logits(name, tiny_dirs):
    spec = SPECS[name]
    ids = ids_for(spec)
    ref = load_model(tiny_dirs(name)).prefix_logits(ids)
    assert torch.equal(load_model(tiny_dirs(name, experts_format="bf16")).prefix_logits(ids), ref)
    assert torch.equal(load_model(tiny_dirs(name) / "original").prefix_logits(ids), ref)


def test_expert_range_yields_exactly_those_experts(tiny_dirs):
    path = tiny_dirs("hd8")                                  # 6 experts
    ckpt = Checkpoint(path)
    whole = ckpt.experts(1, 0, 6, torch.float32)
    part = ckpt.experts(1, 2, 5, torch.float32)
    assert set(part) == {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}
    for key, t in part.items():
        assert t.shape[0] == 3 and torch.equal(t, whole[key][2:5]), key
    model = load_model(path, expert_range=(2, 5), experts="dense")
    experts = model.model.layers[1].mlp.experts
    assert experts.first_expert == 2 and experts.num_experts == 3
    assert torch.equal(experts.down_proj, whole["down_proj"][2:5])
    n_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    full_params = sum(p.numel() for n, p in load_model(path, experts="dense").named_parameters()
                      if ".experts." in n)
    assert n_params * 6 == full_params * 3


def test_expert_range_reads_only_its_slice(tiny_dirs, monkeypatch):
    """Expert tensors are read through get_slice[lo:hi] and never whole (the other experts' bytes stay unread)."""
    reads = []

    class Recording:
        def __init__(self, path, **kw):
            self.f = safetensors.safe_open(path, **kw)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            reads.append((name, None))
            return self.f.get_tensor(name)

        def get_slice(self, name):
            sl = self.f.get_slice(name)

            class Slice:
                def __getitem__(_, idx):
                    reads.append((name, idx))
                    return sl[idx]
            return Slice()

    monkeypatch.setattr(checkpoint_module, "safe_open", Recording)
    load_model(tiny_dirs("hd8"), expert_range=(4, 6))
    expert_reads = [(n, idx) for n, idx in reads if ".experts." in n]
    assert len(expert_reads) == 4 * 6                        # layers x (blocks, scales, bias) x (gate_up, down)
    assert all(idx == slice(4, 6) for _, idx in expert_reads)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_named(tiny_dirs, tmp_path):
    path = copy_checkpoint(tiny_dirs("topk_all"), tmp_path / "m")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(path)


def test_missing_index_entry_is_named(tiny_dirs, tmp_path):
    path = copy_checkpoint(tiny_dirs("topk_all"), tmp_path / "m")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.self_attn.sinks"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.sinks"):
        load_model(path)


def test_wrong_tensor_shape_is_named(tiny_dirs, tmp_path):
    path = copy_checkpoint(tiny_dirs("topk_all"), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = 2048                               # the embedding no longer matches
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens.weight' has shape \[1024, 64\], config.json implies \[2048, 64\]"):
        load_model(path)

"""fp32 logits equal transformers' GptOssForCausalLM (eager attention, eager experts, MXFP4 dequantised)."""
import pytest
import torch
from transformers import GptOssForCausalLM, Mxfp4Config

from model.loader import load_model
from tests.model.conftest import SPECS


def hf_model(path, dtype):
    return GptOssForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=Mxfp4Config(dequantize=True),
                                             attn_implementation="eager", experts_implementation="eager").eval()


def prompt(spec, length, seed=0):
    return torch.randint(0, spec.vocab, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(SPECS))
def test_fp32_logits_match_transformers(name, tiny_dirs):
    spec, path = SPECS[name], tiny_dirs(name)
    ids = prompt(spec, 6 * spec.sliding_window + 5)                        # well past the window
    with torch.no_grad():
        ref = hf_model(path, torch.float32)(ids[None]).logits[0]
    ours = load_model(path, torch.float32).prefix_logits(ids)
    assert ref.abs().max() > 1.0                                            # not a degenerate model
    assert (ours - ref).abs().max().item() < 2e-4


def test_window_matters_for_the_comparison(tiny_dirs):
    """The comparison can fail: the same model with full attention everywhere differs after the window."""
    spec, path = SPECS["topk_all"], tiny_dirs("topk_all")
    ids = prompt(spec, 4 * spec.sliding_window)
    model = load_model(path, torch.float32)
    exact = model.prefix_logits(ids)
    for layer in model.model.layers:
        layer.self_attn.window = None
    wrong = model.prefix_logits(ids)
    W = spec.sliding_window
    assert torch.allclose(exact[:W], wrong[:W], atol=1e-5)                  # identical inside the window
    assert (exact[W:] - wrong[W:]).abs().max() > 1e-2                        # different beyond it


@pytest.mark.parametrize("name", ["topk_all", "hd64"])
def test_bf16_agrees_on_argmax(name, tiny_dirs):
    """bf16 is only comparable by argmax (routing near-ties flip in bf16; spec §0): with fp32 and with HF bf16."""
    spec, path = SPECS[name], tiny_dirs(name)
    ids = prompt(spec, 64, seed=1)
    with torch.no_grad():
        ref = hf_model(path, torch.bfloat16)(ids[None]).logits[0].float()
    ours = load_model(path, torch.bfloat16).prefix_logits(ids)
    exact = load_model(path, torch.float32).prefix_logits(ids)
    agree = lambda a, b: (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree(ours, exact) >= 0.95 and agree(ours, ref) >= 0.95
    assert not torch.equal(ours, exact)                                     # it did compute in bf16

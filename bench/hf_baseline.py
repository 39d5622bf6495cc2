"""transformers' GptOssForCausalLM as the GPU benchmark's side-by-side baseline: built on the device from our
model's weights (experts dequantised), timed with generate() and a logits processor that records each forward."""
from __future__ import annotations

import time

import torch

from bench.device_stats import free_bytes, prompts, sync
from bench.fast_path_check import token_agreement
from model import tiny
from model.transformer import GptOssForCausalLM


def build_transformers(spec: tiny.TinySpec, ours: GptOssForCausalLM, dtype: torch.dtype, device: torch.device):
    """transformers' GptOssForCausalLM (eager attention) with our weights; experts dequantised to `dtype`."""
    from transformers import GptOssConfig, GptOssForCausalLM as HFModel
    d = tiny.hf_config(spec, None)
    d.pop("quantization_config")
    with torch.device(device):                        # built in `dtype` on the device: no fp32 copy anywhere
        hf = HFModel._from_config(GptOssConfig.from_dict(d), dtype=dtype, attn_implementation="eager")
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name in ours_params:
                p.copy_(ours_params[name])
            elif ".mlp.experts." in name and name.endswith("_proj"):
                backend_name, part = name.rsplit(".", 1)
                backend = ours.get_submodule(backend_name)
                for e in range(backend.num_experts):
                    p[e].copy_(backend.weight(part, e, dtype).T)                      # [in, out]
            elif ".mlp.experts." in name:
                p.copy_(ours.get_buffer(name))                                         # expert biases
            else:
                raise KeyError(f"transformers parameter {name} has no counterpart in our model")
    return hf.eval().requires_grad_(False)


def generate_hf(hf, batch: list[list[int]], new_tokens: int) -> tuple[list[float], list[list[int]]]:
    """Greedy generate() without padding: [start, then the time each forward's logits were ready], the tokens."""
    from transformers import LogitsProcessorList
    ids = torch.tensor(batch, device=hf.device)                                             # [B, P]
    sync(hf.device)
    times = [time.perf_counter()]

    def stamp(input_ids, scores):                     # a logits processor that only records the clock
        sync(hf.device)
        times.append(time.perf_counter())
        return scores
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                      eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
    return times, out[:, ids.shape[1]:].tolist()                                              # [B, new]


def measure_transformers(spec, ours, plan, dtype, device, ours_tokens: dict) -> dict:
    cfg, elem = ours.config, torch.empty((), dtype=dtype).element_size()
    need = (sum(p.nbytes for p in ours.parameters()) + cfg.num_hidden_layers * cfg.num_local_experts
            * 3 * cfg.hidden_size * cfg.intermediate_size * elem)
    free = free_bytes(device)
    if need + (4 << 30) * (device.type == "cuda") > free:
        return {"skipped": f"dequantised {dtype} weights need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"}
    hf = build_transformers(spec, ours, dtype, device)
    generate_hf(hf, prompts(1, plan.prompt_tokens, cfg.vocab_size, seed=99), 3)              # warm-up
    out = {"experts_implementation": getattr(hf.config, "_experts_implementation", None), "decode": {}}
    for b in plan.batches:
        times, toks = generate_hf(hf, prompts(b, plan.prompt_tokens, cfg.vocab_size, seed=b), plan.decode_steps + 1)
        tok_s = b * plan.decode_steps / (times[-1] - times[1])                               # decode forwards only
        agree = token_agreement(ours_tokens[b], toks)
        out["decode"][str(b)] = {"tok_s": round(tok_s, 2),
                                 "greedy_match": round(agree["identical_greedy_sequences"] / b, 3),
                                 **{k: agree[k] for k in ("first_token_match", "mean_common_prefix")}}
    times = [generate_hf(hf, prompts(1, plan.ttft_prompt_tokens, cfg.vocab_size, seed=7), 1)[0] for _ in range(2)]
    out["ttft_s"] = round(min(t[1] - t[0] for t in times), 4)                             # first one warms up
    return out

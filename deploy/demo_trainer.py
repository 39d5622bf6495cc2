"""Trains the demo checkpoint: our own GptOssForCausalLM (sinks, sliding window, YaRN, top-k MoE, clamped SwiGLU) on
the harmony tasks of deploy/demo_tasks.py, on a CPU in minutes. Owns the training loop, the padded-batch attention
and greedy evaluation; the on-disk layout is model/tiny.py's `write_checkpoint`.
Legend: B=batch rows, T=padded length, n=query heads, k=KV heads, D=head_dim, H=hidden, V=vocab, E=experts.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deploy import demo_tasks
from deploy.tokenizer import Tokenizer
from engine.engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from model import mxfp4
from model.attention import sink_attention, window_mask
from model.config import ModelConfig
from model.errors import UserError
from model.loader import load_model
from model.moe import LocalExperts, swiglu
from model.tiny import TinySpec, hf_config, write_checkpoint
from model.tiny_tokenizer import write_tokenizer_files
from model.transformer import GptOssForCausalLM

logger = logging.getLogger(__name__)

# TOOLING.md's measured recipe: 2 layers, hidden 128, 4/2 heads of 32, 4 experts top-2, AdamW 1e-3, batch 64.
DEMO_ARCH = TinySpec(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=128, experts=4, top_k=2,
                     vocab=512, sliding_window=16, shards=2)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`epserve train-demo` flags map onto seed and steps; the rest is the recipe."""
    seed: int = 0
    steps: int = 1500                 # TOOLING.md: 100% on addition + reversal after 1,500 steps at batch 64
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1         # cosine decay to lr * 0.1
    weight_decay: float = 0.01        # on matrices only (not norms, biases, sinks)
    grad_clip: float = 1.0
    qat_fraction: float = 0.15        # the last 15% of steps see MXFP4-rounded experts (straight-through)
    bucket: int = 8                   # batches drawn together and cut by length, so rows carry little padding
    arch: TinySpec = DEMO_ARCH

    @property
    def qat_start(self) -> int:
        return self.steps - round(self.qat_fraction * self.steps)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or not 0 <= self.qat_fraction <= 1 or not 0 <= self.seed < 2**32:
            raise UserError(f"need steps >= 1 (got {self.steps}), batch_size >= 1 (got {self.batch_size}), "
                            f"qat_fraction in [0, 1] (got {self.qat_fraction}), seed in [0, 2**32) (got {self.seed})")


class PaddedBatchMetadata:
    """Attention for a right-padded batch [B, T] run as B*T flat tokens: row b has lengths[b] real tokens at
    positions 0..lengths[b]-1. Per row one [T, T] mask: causal, the layer's window, and real keys only."""

    def __init__(self, lengths: torch.Tensor, seq_len: int):
        pos = torch.arange(seq_len)
        self.shape = (len(lengths), seq_len)
        self.positions = pos.repeat(len(lengths))                                         # [B*T]
        self._real_keys = pos[None, :] < lengths[:, None]                                 # [B, T]
        self._pos, self._masks = pos, {}

    def attend(self, layer_idx, q, k, v, sinks, window, sm_scale):
        B, T = self.shape
        if window not in self._masks:
            self._masks[window] = window_mask(self._pos, self._pos, window)[None] & self._real_keys[:, None, :]
        o = sink_attention(q.view(B, T, *q.shape[1:]), k.view(B, T, *k.shape[1:]), v.view(B, T, *v.shape[1:]),
                           sinks, self._masks[window], sm_scale)                          # [B, T, n, D]
        return o.reshape(B * T, *o.shape[2:])


def _mxfp4_ste(w: torch.Tensor) -> torch.Tensor:
    """w [in, out] seen through MXFP4 rounding (blocks of 32 along `in`, as stored); gradients pass straight."""
    rounded = mxfp4.dequantize(*mxfp4.quantize(w.detach().T)).T
    return w + (rounded - w).detach()


class TrainExperts(LocalExperts):
    """LocalExperts (same parameter names) that can compute with MXFP4-rounded weights for quantisation-aware
    fine-tuning: forward uses dequantize(quantize(w)), backward updates the fp32 w."""
    fake_quant = False

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant:
            return super().expert_forward(e, x)
        h = swiglu(x @ _mxfp4_ste(self.gate_up_proj[e]) + self.gate_up_proj_bias[e], self.alpha, self.limit)
        return h @ _mxfp4_ste(self.down_proj[e]) + self.down_proj_bias[e]


def build_model(arch: TinySpec):
    """A GptOssForCausalLM for training, initialised like transformers' GptOss (config initializer_range 0.02:
    normal weights, zero biases, unit norms)."""
    config = ModelConfig.from_hf_dict(hf_config(arch))
    model = GptOssForCausalLM(config, torch.float32, experts=lambda _: TrainExperts(config, torch.float32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)                      # RMSNorm weights are fp32 parameters (spec §2.1)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model


def set_fake_quant(model, on: bool) -> None:
    for layer in model.model.layers:                     # TrainExperts of every layer
        layer.mlp.experts.fake_quant = on


def batches(tok: Tokenizer, cfg: TrainConfig):
    """Endless (ids [B, T], lengths [B], targets [B, T] with -100 outside the assistant's completion)."""
    rng = random.Random(cfg.seed)
    while True:
        rows = []
        for _ in range(cfg.batch_size * cfg.bucket):
            ex = demo_tasks.sample(rng)
            prompt = tok.encode(demo_tasks.prompt_text(ex, demo_tasks.random_preamble(rng)))
            rows.append((prompt, tok.encode(demo_tasks.completion_text(ex))))
        rows.sort(key=lambda r: len(r[0]) + len(r[1]))
        chunks = [rows[i:i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
        rng.shuffle(chunks)
        yield from map(_collate, chunks)


def _collate(rows: list[tuple[list[int], list[int]]]):
    T = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, (p, c) in enumerate(rows):
        seq = torch.tensor(p + c)
        ids[b, :len(seq)] = seq
        targets[b, len(p) - 1:len(seq) - 1] = seq[len(p):]        # position i predicts token i+1
    return ids, torch.tensor([len(p) + len(c) for p, c in rows]), targets


def batch_loss(model, ids: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the completion tokens of a padded batch."""
    meta = PaddedBatchMetadata(lengths, ids.shape[1])
    hidden = model(ids.flatten(), meta.positions, meta)                                    # [B*T, H]
    rows = (targets.flatten() >= 0).nonzero().squeeze(1)
    return F.cross_entropy(model.compute_logits(hidden[rows]), targets.flatten()[rows])  # logits [rows, V]


def _optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = {n: p.dim() >= 2 and not n.endswith("bias") for n, p in model.named_parameters()}  # matrices only
    groups = [[p for n, p in model.named_parameters() if decay[n] == d] for d in (True, False)]
    return torch.optim.AdamW([{"params": groups[0], "weight_decay": cfg.weight_decay},
                              {"params": groups[1], "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(cfg: TrainConfig, tok: Tokenizer, log_every: int = 100):
    """Train from scratch; returns (eval model, loss per step). Same cfg -> same losses (deterministic kernels)."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch).train()
        opt, data, losses, start = _optimizer(model, cfg), batches(tok, cfg), [], time.monotonic()
        for step in range(cfg.steps):
            set_fake_quant(model, step >= cfg.qat_start)
            for group in opt.param_groups:
                group["lr"] = _lr(cfg, step)
            loss = batch_loss(model, *next(data))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                window = losses[-log_every:]
                logger.info("step %d/%d loss %.4f (%.0f s)", step + 1, cfg.steps, sum(window) / len(window),
                            time.monotonic() - start)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    set_fake_quant(model, False)
    return model.eval().requires_grad_(False), losses


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """HF tensors (spec §3.2): dense ones bf16, experts' gate_up_proj [E, H, 2I] / down_proj [E, I, H] ("in x
    out") as MXFP4 blocks/scales over the transposed "out x in" weight, blocks of 32 along the input."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name + "_blocks"], out[name + "_scales"] = mxfp4.quantize(p.detach().transpose(1, 2))
        else:
            out[name] = p.detach().to(torch.bfloat16)
    return out


# ---- greedy evaluation through the serving engine ----
EVAL_SEED = 424242            # the evaluation's question stream (training draws from random.Random(seed))
MAX_COMPLETION_TOKENS = 80    # the longest completion (upper-casing 5 letters) is about 45 tokens


def evaluate_model(model, tok: Tokenizer, n: int = 200, seed: int = EVAL_SEED) -> tuple[float, dict[str, float]]:
    """Greedy answers to n fresh questions (with the training mix of system/developer/history preambles),
    generated by LLMEngine until <|return|>; returns (accuracy, accuracy per task) on the final channel."""
    rng = random.Random(seed)
    examples = [demo_tasks.sample(rng) for _ in range(n)]
    prompts = [tok.encode(demo_tasks.prompt_text(ex, demo_tasks.random_preamble(rng))) for ex in examples]
    stop = tok.harmony_stop_ids()
    engine = LLMEngine(model, EngineConfig(max_num_seqs=64), eos_token_ids=stop)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_COMPLETION_TOKENS, stop_token_ids=stop)
    outputs = engine.generate(prompts, params)
    hits: dict[str, list[bool]] = {}
    for ex, out in zip(examples, outputs):
        answer = demo_tasks.parse_final(tok.decode(out[0].output_token_ids))
        hits.setdefault(ex.task, []).append(answer == ex.answer)
    per_task = {task: sum(h) / len(h) for task, h in sorted(hits.items())}
    return sum(map(sum, hits.values())) / n, per_task


def evaluate(model_dir: str | Path, n: int = 200, seed: int = EVAL_SEED) -> float:
    """Greedy accuracy of a checkpoint directory on n fresh demo questions (loaded by model.loader)."""
    return evaluate_model(load_model(model_dir), Tokenizer.from_model_dir(model_dir), n, seed)[0]


def train(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), eval_size: int = 200) -> dict:
    """Train, write the checkpoint (MXFP4 experts, no original/) and a README with the numbers; returns them."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty directory; remove it or choose a new path")
    text = demo_tasks.tokenizer_text()
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp), cfg.arch.vocab, text)
        tok = Tokenizer(Path(tmp) / "tokenizer.json")
    start = time.monotonic()
    model, losses = train_model(cfg, tok)
    report = {"train_seconds": time.monotonic() - start, "losses": losses}
    report["fp32"] = evaluate_model(model, tok, eval_size)
    set_fake_quant(model, True)
    report["fp32_mxfp4_experts"] = evaluate_model(model, tok, eval_size)
    set_fake_quant(model, False)
    write_checkpoint(out, hf_config(cfg.arch), checkpoint_tensors(model), cfg.arch.vocab, shards=cfg.arch.shards,
                     tokenizer_text=text)
    report["checkpoint"] = evaluate_model(load_model(out), Tokenizer(out / "tokenizer.json"), eval_size)
    report["checkpoint_bytes"] = sum(f.stat().st_size for f in out.iterdir())
    (out / "README.md").write_text(_readme(cfg, report, eval_size), encoding="utf-8")
    return report


def _readme(cfg: TrainConfig, r: dict, n: int) -> str:
    a, losses, every = cfg.arch, r["losses"], max(1, cfg.steps // 15)
    curve = ", ".join(f"{i}: {sum(losses[i - every:i]) / every:.3f}" for i in range(every, cfg.steps + 1, every))
    rows = (("fp32", "fp32"), ("fp32, MXFP4 experts", "fp32_mxfp4_experts"), ("checkpoint: bf16 + MXFP4", "checkpoint"))
    acc = "\n".join(f"| {name} | {r[k][0]:.1%} | {', '.join(f'{t} {v:.0%}' for t, v in r[k][1].items())} |"
                    for name, k in rows)
    ex = demo_tasks.sample(random.Random(18))                                       # "Spell horse backwards."
    return f"""# epserve demo model

A {a.layers}-layer gpt-oss: hidden {a.hidden}, {a.heads} heads / {a.kv_heads} KV heads of {a.head_dim}, \
{a.experts} experts top-{a.top_k} of intermediate {a.intermediate},
sliding window {a.sliding_window} on even layers, YaRN RoPE, attention sinks, clamped SwiGLU, and a byte-level BPE
of {a.vocab} tokens with the harmony specials. Trained from scratch on synthetic harmony questions
(deploy/demo_tasks.py: {", ".join(demo_tasks.TASKS)}): a short analysis message, then the final answer:

    {demo_tasks.prompt_text(ex)}{demo_tasks.completion_text(ex)}

Files: the gpt-oss HF layout, MXFP4 experts, bf16 elsewhere, no original/; {r["checkpoint_bytes"] / 1e6:.2f} MB.

## How it was made

    epserve train-demo --out deploy/demo_model --seed {cfg.seed} --steps {cfg.steps}

fp32 on the CPU, AdamW lr {cfg.lr} (warmup {cfg.warmup_steps}, cosine to {cfg.min_lr_ratio:g}x), \
batch {cfg.batch_size}, weight decay {cfg.weight_decay},
loss on the assistant's completion only; quantisation-aware from step {cfg.qat_start + 1} (experts seen through
MXFP4 rounding, straight-through gradients). Deterministic for a seed on a given machine. Training took
{r["train_seconds"]:.0f} s wall clock on 2 shared CPU cores (about 0.25 s a step when they are idle).

Loss (mean over the previous {every} steps): {curve}.

## Greedy accuracy on {n} fresh questions (seed {EVAL_SEED}; LLMEngine, stop on <|return|>)

| weights | accuracy | per task |
|---|---|---|
{acc}
"""

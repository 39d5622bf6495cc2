"""The tiny checkpoints' tokenizer: a byte-level BPE trained with `tokenizers` on harmony-formatted text built from
model/assets/tiny_corpus.txt (or on a text the caller gives), plus the harmony special tokens (gpt-oss-spec.md §4).

Owns the training text and the tokenizer files. Special token ids are whatever training gives: look them up by
name (`tokenizer.token_to_id("<|return|>")`), never by number.
"""
from __future__ import annotations

import functools
import json
import random
import re
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from model.errors import UserError

# The harmony specials the model and deploy/ use (o200k_harmony names; their ids here are NOT 199998...).
SPECIAL_TOKENS = (
    "<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
    "<|start|>", "<|end|>", "<|message|>", "<|call|>",
)
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|startoftext|>", "<|return|>", "<|endoftext|>"  # as in HF's gpt-oss repos
BYTE_ALPHABET = 256
MIN_VOCAB = BYTE_ALPHABET + len(SPECIAL_TOKENS)  # every byte + every special; anything above becomes merges

# GPT-4o-style pre-tokenisation: cased letter runs with English contractions, digits in groups of at most 3,
# punctuation runs, newlines, and whitespace (the regex family of tiktoken's o200k_base).
SPLIT_PATTERN = "|".join((
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
))

_TEXT_SEED = 20250805  # fixed: the training text (and so the merges) never depend on the checkpoint seed
_NUM_CONVERSATIONS = 600
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Perth", "Quebec", "Tbilisi", "Hanoi", "Cork")
_ASKS = ("Tell me about {}.", "What do you know about {}?", "Explain {} in simple words.",
         "Can you describe {} briefly?", "I am curious about {}. What should I know?")
_THINKS = ("The user asks about {}. A short, clear explanation is enough.",
           "They want to learn about {}. I will explain the main idea in two sentences.",
           "Topic: {}. Keep it simple and friendly.")
_INSTRUCTIONS = ("Answer in plain English.", "Be concise.", "Show your working for arithmetic.",
                 "Use short sentences and avoid jargon.")
_TOOLS_DECL = (
    "# Tools\n\n## functions\n\nnamespace functions {\n\n// Looks up the current weather in a city.\n"
    "type get_weather = (_: {\n// Name of the city\ncity: string,\n}) => any;\n\n} // namespace functions"
)


def _corpus() -> list[tuple[str, str]]:
    """(topic, text) pairs from the shipped asset; comment lines start with '#'."""
    raw = resources.files("model").joinpath("assets/tiny_corpus.txt").read_text(encoding="utf-8")
    pairs = [line.split("\t", 1) for line in raw.splitlines() if line and not line.startswith("#")]
    return [(topic, text) for topic, text in pairs]


def _msg(role: str, content: str, channel: str | None = None, end: str = "<|end|>") -> str:
    header = role + (f"<|channel|>{channel}" if channel else "")
    return f"<|start|>{header}<|message|>{content}{end}"


def _system(rng: random.Random, tools: bool) -> str:
    lines = ["You are ChatGPT, a large language model trained by OpenAI.", "Knowledge cutoff: 2024-06"]
    if rng.random() < 0.7:
        lines.append(f"Current date: 2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
    lines += ["", f"Reasoning: {rng.choice(('low', 'medium', 'high'))}", "",
              "# Valid channels: analysis, commentary, final. Channel must be included for every message."]
    if tools:
        lines.append("Calls to these tools must go to the commentary channel: 'functions'.")
    return _msg("system", "\n".join(lines))


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    op = rng.choice("+-*/")
    if op == "+":
        steps, answer = f"{a} + {b} = {a + b}.", str(a + b)
    elif op == "-":
        steps, answer = f"{a} - {b} = {a - b}.", str(a - b)
    elif op == "*":
        tens, ones = b - b % 10, b % 10
        steps = f"{a} * {b} = {a} * {tens} + {a} * {ones} = {a * tens} + {a * ones} = {a * b}."
        answer = str(a * b)
    else:
        steps = f"{a} / {b}: {b} * {a // b} = {b * (a // b)}, remainder {a % b}."
        answer = f"{a // b} remainder {a % b}"
    question = rng.choice(("What is {} {} {}?", "Compute {} {} {}.", "Please work out {} {} {}."))
    return question.format(a, op, b), f"We need {a} {op} {b}. {steps}", f"The answer is {answer}."


def _conversation(rng: random.Random, corpus: list[tuple[str, str]]) -> str:
    """One harmony conversation: system, optional developer, then a topic, arithmetic or tool-call turn."""
    kind = rng.choices(("topic", "math", "tool"), weights=(5, 3, 2))[0]
    parts = [_system(rng, tools=kind == "tool")]
    if kind == "tool" or rng.random() < 0.4:
        dev = f"# Instructions\n\n{rng.choice(_INSTRUCTIONS)}"
        parts.append(_msg("developer", dev + ("\n\n" + _TOOLS_DECL if kind == "tool" else "")))
    if kind == "topic":
        topic, text = rng.choice(corpus)
        parts += [_msg("user", rng.choice(_ASKS).format(topic)),
                  _msg("assistant", rng.choice(_THINKS).format(topic), "analysis"),
                  _msg("assistant", text, "final", end="<|return|>")]
    elif kind == "math":
        question, thought, answer = _arithmetic(rng)
        parts += [_msg("user", question), _msg("assistant", thought, "analysis"),
                  _msg("assistant", answer, "final", end="<|return|>")]
    else:
        city, degrees = rng.choice(_CITIES), rng.randint(-5, 35)
        parts += [_msg("user", f"What is the weather like in {city} right now?"),
                  _msg("assistant", f"I should call get_weather for {city}.", "analysis"),
                  f"<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
                  f'<|message|>{{"city": "{city}"}}<|call|>',
                  _msg("functions.get_weather to=assistant", f'{{"city": "{city}", "celsius": {degrees}}}',
                       "commentary"),
                  _msg("assistant", f"It is {degrees} degrees Celsius in {city} right now.", "final",
                       end="<|return|>")]
    return "".join(parts)


@functools.cache
def training_text() -> str:
    """The full training text: deterministic harmony conversations (~200 kB), separated by newlines."""
    rng, corpus = random.Random(_TEXT_SEED), _corpus()
    return "\n".join(_conversation(rng, corpus) for _ in range(_NUM_CONVERSATIONS))


def _training_pieces(text: str) -> list[str]:
    """The text between special tokens: specials are added tokens, so BPE must not spend merges on them."""
    pattern = "|".join(re.escape(s) for s in SPECIAL_TOKENS)
    return [piece for piece in re.split(pattern, text) if piece]


def train_tokenizer(vocab_size: int, text: str | None = None) -> Tokenizer:
    """Train the BPE so that BPE tokens + specials <= vocab_size (exactly equal when the text has enough merges).

    `text`: the training text (harmony conversations with specials written by name); default `training_text()`.
    BPE ids come first (bytes, then merges in training order); the specials follow, like o200k_harmony.
    Deterministic: the same vocab_size and text give the same tokenizer.json bytes in every process.
    """
    if vocab_size < MIN_VOCAB:
        raise UserError(f"vocab={vocab_size} is too small for the tiny tokenizer: it needs at least {MIN_VOCAB} "
                         f"({BYTE_ALPHABET} byte tokens + {len(SPECIAL_TOKENS)} harmony specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(_training_pieces(training_text() if text is None else text), trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok


@functools.cache
def _tokenizer_json(vocab_size: int, text: str | None = None) -> str:
    return train_tokenizer(vocab_size, text).to_str(pretty=True)


def load_trained(vocab_size: int, text: str | None = None) -> Tokenizer:
    """A fresh copy of the trained tokenizer for `vocab_size` (and `text`), trained once per process."""
    return Tokenizer.from_str(_tokenizer_json(vocab_size, text))


def write_tokenizer_files(out_dir: Path, vocab_size: int, text: str | None = None) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (HF gpt-oss style) to out_dir.

    `text`: train the BPE on this text instead of the tiny checkpoints' default (see `train_tokenizer`)."""
    out_dir = Path(out_dir)
    tok = load_trained(vocab_size, text)
    (out_dir / "tokenizer.json").write_text(_tokenizer_json(vocab_size, text), encoding="utf-8")
    added = {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True} for s in SPECIAL_TOKENS}
    config = {
        "added_tokens_decoder": added, "bos_token": BOS_TOKEN, "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN, "extra_special_tokens": {}, "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072, "pad_token": PAD_TOKEN, "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        (out_dir / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return tok

"""Synthetic questions for the demo model and their harmony rendering (gpt-oss-spec.md §4.2).

Owns the task generator (easy, varied tasks a 2-layer model learns in minutes on a CPU) and the text of each
conversation. Works in text only: special tokens appear by name (`<|start|>` ...) and the tokenizer maps them.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

RETURN, END = "<|return|>", "<|end|>"
FINAL_HEADER = "<|start|>assistant<|channel|>final<|message|>"
ASSISTANT_START = "<|start|>assistant"
LETTERS = string.ascii_lowercase
# Real short words for friendly prompts; random letter strings (most samples) make the skill character-level.
WORDS = ("cat dog sun map red blue tree bird fish milk star moon rain snow book door lamp frog cake ship wolf "
         "apple river stone cloud bread chair plant horse table light green music water house tiger lemon "
         "song king road wind fire gold ice sea owl bee ant cup pen box key hat bus car egg"
         ).split()


@dataclass(frozen=True)
class Example:
    """One question with its reasoning (analysis channel) and its answer (final channel)."""
    task: str
    question: str
    analysis: str
    answer: str


def _word(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(WORDS)
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))


def _spell(word: str) -> str:
    return " ".join(word)


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    ask = rng.choice(("What is {} + {}?", "What is {}+{}?", "Compute {} + {}.", "Add {} and {}.",
                      "What is the sum of {} and {}?"))
    return Example("add", ask.format(a, b), f"{a} + {b} = {a + b}.", str(a + b))


def _reverse(rng: random.Random) -> Example:
    w = _word(rng)
    ask = rng.choice(("Reverse the word {}.", "Spell {} backwards.", "What is {} reversed?"))
    thought = f"The letters of {w} are {_spell(w)}. Backwards: {_spell(w[::-1])}."
    return Example("reverse", ask.format(w), thought, w[::-1])


def _upper(rng: random.Random) -> Example:
    w = _word(rng)
    ask = rng.choice(("Write {} in capital letters.", "Uppercase the word {}.", "Convert {} to uppercase."))
    thought = f"The letters of {w} are {_spell(w)}. In capitals: {_spell(w.upper())}."
    return Example("upper", ask.format(w), thought, w.upper())


def _next_letter(rng: random.Random) -> Example:
    i = rng.randrange(len(LETTERS) - 1)
    a, b = LETTERS[i], LETTERS[i + 1]
    ask = rng.choice(("What letter comes after {}?", "Which letter follows {} in the alphabet?",
                      "What is the next letter after {}?"))
    return Example("next_letter", ask.format(a), f"In the alphabet {a} is followed by {b}.", b)


def _compare(rng: random.Random) -> Example:
    a, b = rng.sample(range(10), 2)
    ask = rng.choice(("Which is larger, {} or {}?", "Which number is bigger: {} or {}?",
                      "What is the max of {} and {}?"))
    big, small = max(a, b), min(a, b)
    return Example("compare", ask.format(a, b), f"{big} is larger than {small}.", str(big))


def _count(rng: random.Random) -> Example:
    w = _word(rng)
    ask = rng.choice(("How many letters are in {}?", "Count the letters in the word {}.", "How long is the word {}?"))
    return Example("count", ask.format(w), f"The letters of {w} are {_spell(w)}. That is {len(w)} letters.",
                   str(len(w)))


TASKS = {"add": _add, "reverse": _reverse, "upper": _upper, "next_letter": _next_letter, "compare": _compare,
         "count": _count}


def sample(rng: random.Random, tasks: tuple[str, ...] = tuple(TASKS)) -> Example:
    """One question of a task drawn uniformly from `tasks`."""
    return TASKS[rng.choice(tasks)](rng)


def message(role: str, content: str, channel: str | None = None, end: str = END) -> str:
    header = role + (f"<|channel|>{channel}" if channel else "")
    return f"<|start|>{header}<|message|>{content}{end}"


def system_message(reasoning: str = "medium", date: str | None = None) -> str:
    """Harmony's canonical system message (spec §4.2), as chat templates and gateways render it."""
    lines = ["You are ChatGPT, a large language model trained by OpenAI.", "Knowledge cutoff: 2024-06"]
    if date:
        lines.append(f"Current date: {date}")
    lines += ["", f"Reasoning: {reasoning}", "",
              "# Valid channels: analysis, commentary, final. Channel must be included for every message."]
    return message("system", "\n".join(lines))


def random_preamble(rng: random.Random) -> str:
    """What may precede the question: nothing, a system message, a developer message, or an earlier turn
    (rendered as history: analysis dropped, the final answer closed with <|end|>)."""
    parts = []
    if rng.random() < 0.5:
        date = f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}" if rng.random() < 0.5 else None
        parts.append(system_message(rng.choice(("low", "medium", "high")), date))
    if rng.random() < 0.1:
        parts.append(message("developer", "# Instructions\n\n" + rng.choice(
            ("Answer briefly.", "Be concise.", "Answer the question."))))
    if rng.random() < 0.1:
        earlier = sample(rng)
        parts += [message("user", earlier.question), message("assistant", earlier.answer, "final")]
    return "".join(parts)


def prompt_text(example: Example, preamble: str = "") -> str:
    """The prompt for generation: ends with `<|start|>assistant`; the model writes the channel next."""
    return preamble + message("user", example.question) + ASSISTANT_START


def completion_text(example: Example) -> str:
    """What the model is trained to write after the prompt: analysis, then the final answer and <|return|>."""
    return (f"<|channel|>analysis<|message|>{example.analysis}{END}"
            f"{FINAL_HEADER}{example.answer}{RETURN}")


def parse_final(completion: str) -> str | None:
    """The final channel's text of a generated completion (None when the model never opened it)."""
    head = completion.rfind("<|channel|>final<|message|>")
    if head < 0:
        return None
    text = completion[head + len("<|channel|>final<|message|>"):]
    for stop in (RETURN, END):
        text = text.split(stop, 1)[0]
    return text.strip()


def tokenizer_text(num_examples: int = 3000, seed: int = 20250806) -> str:
    """Text the demo tokenizer's BPE is trained on: whole conversations, one per line. Fixed seed, so the
    tokenizer does not depend on the training seed."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_examples):
        ex = sample(rng)
        lines.append(prompt_text(ex, random_preamble(rng)) + completion_text(ex))
    return "\n".join(lines)

"""Tokenizer: the model directory's tokenizer.json (HF `tokenizers`), with harmony's special tokens by name.

Never hard-codes a token id: `<|return|>`, `<|call|>` ... are looked up in the file, so the real o200k_harmony
tokenizer.json and the project's tiny ones work the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

from model.errors import UserError

# Harmony ends an assistant turn with <|return|> (final answer) or <|call|> (tool call); never stop on <|end|>,
# which separates the analysis message from the final one (gpt-oss-spec.md §4.2).
HARMONY_STOP_TOKENS = ("<|return|>", "<|call|>")


class Tokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception subclass for unreadable files
            raise UserError(f"{path}: not a readable tokenizer.json ({e})") from None
        self.path = Path(path)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "Tokenizer | None":
        path = Path(model_dir) / "tokenizer.json"
        return cls(path) if path.is_file() else None

    def encode(self, text: str) -> list[int]:
        """Text -> ids; special tokens written in the text (`<|start|>` ...) become their single ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer can decode (added special tokens included); a model's vocab may be padded beyond."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, name: str) -> int:
        token_id = self._tok.token_to_id(name)
        if token_id is None:
            raise UserError(f"{self.path}: has no token {name!r}")
        return token_id

    def harmony_stop_ids(self) -> tuple[int, ...]:
        return tuple(self.token_id(name) for name in HARMONY_STOP_TOKENS)


def model_stop_ids(model_dir: str | Path, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """End-of-sequence ids of a model directory: generation_config.json's eos list, plus harmony's
    <|return|>/<|call|> resolved by name when a tokenizer exists."""
    ids: list[int] = []
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    if tokenizer is not None:
        ids += tokenizer.harmony_stop_ids()
    return tuple(dict.fromkeys(ids))

"""GrammarVocabulary: one tokenizer's vocabulary as xgrammar sees it, and the grammars compiled over it.

Owns loading tokenizer.json for grammars (special tokens become empty strings, so no grammar ever matches them as
text: harmony's structure tokens are placed by the automaton alone), compiling Constraints once per process and
caching them (LRU), compiling in a background thread (`prefetch`) so the step loop rarely waits, and the bitmask of
ordinary tokens for free text. One per (tokenizer path, model vocabulary size) per process: `GrammarVocabulary.get`.
Bitmasks are int32 words [ceil(V / 32)], bit j of word w standing for token 32 * w + j (xgrammar's layout), held in
numpy arrays on the host.
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from engine.structured_output import Constraint

MAX_WHITESPACE = 16          # whitespace characters in a row inside JSON: bounded, so JSON cannot loop on blanks
CACHE_SIZE = 256             # compiled grammars kept per vocabulary
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
_XGRAMMAR_LOG_PREFIX = re.compile(r"^\s*\[[\d:.]+\]\s+\S+:\d+:\s*")
_registry: dict[tuple[str, int], "GrammarVocabulary"] = {}
_registry_lock = threading.Lock()


class GrammarCompileError(ValueError):
    """A constraint xgrammar cannot compile (an unsupported regex feature, a bad schema): the client's to fix."""


def num_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def bitmask_of(ids, vocab_size: int) -> np.ndarray:
    """int32 [ceil(V / 32)] with the bits of `ids` set (numpy: host bit work never looks like a device read)."""
    words = np.zeros(num_words(vocab_size), dtype=np.uint32)
    for i in ids:
        words[i >> 5] |= np.uint32(1 << (i & 31))
    return words.view(np.int32)


class GrammarVocabulary:
    def __init__(self, tokenizer_path: str, vocab_size: int):
        import xgrammar as xgr                          # heavy (it imports transformers): only when first needed
        from tokenizers import Tokenizer
        self._xgr = xgr
        self.path, self.vocab_size = tokenizer_path, vocab_size
        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        special = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        encoded = [""] * vocab_size
        for text, i in vocab.items():
            if i < vocab_size and i not in special:
                encoded[i] = text
        self.special_ids = frozenset(special | {i for i in range(vocab_size) if not encoded[i]})
        self.text_mask = bitmask_of([i for i in range(vocab_size) if i not in self.special_ids], vocab_size)
        decoded = ((i, self.tokenizer.decode([i])) for i in range(min(vocab_size, self.tokenizer.get_vocab_size())))
        decoded = list(decoded)
        self.blank_mask = bitmask_of([i for i, text in decoded if text and not text.strip()], vocab_size)
        # Raw control characters are never valid in JSON text (\t \n \r only as blanks between tokens, never in a
        # string); xgrammar lets them into strings with minLength/maxLength.
        self.control_mask = bitmask_of([i for i, text in decoded if _CONTROL.search(text)], vocab_size)
        self.any_control_mask = bitmask_of([i for i, text in decoded if any(ord(c) < 32 for c in text)], vocab_size)
        info = xgr.TokenizerInfo(encoded, _vocab_type(xgr, tokenizer_path), vocab_size=vocab_size, stop_token_ids=[])
        self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1))
        self._futures: OrderedDict[Constraint, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")

    @classmethod
    def get(cls, tokenizer_path: str, vocab_size: int) -> "GrammarVocabulary":
        key = (os.path.abspath(tokenizer_path), vocab_size)
        with _registry_lock:
            if key not in _registry:
                if not os.path.isfile(key[0]):
                    raise ValueError(f"structured output: tokenizer file {key[0]} does not exist on this node")
                _registry[key] = cls(key[0], vocab_size)
            return _registry[key]

    def token_id(self, text: str) -> int | None:
        """The id of the single token that encodes `text` alone, if there is one."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids[0] if len(ids) == 1 and ids[0] < self.vocab_size else None

    # -- compiling -----------------------------------------------------------------------------------------------
    def prefetch(self, constraint: Constraint) -> Future:
        """Start compiling (once per process; cached, least recently used dropped past CACHE_SIZE)."""
        with self._lock:
            future = self._futures.get(constraint)
            if future is None:
                future = self._futures[constraint] = self._executor.submit(self._compile, constraint)
                while len(self._futures) > CACHE_SIZE:
                    self._futures.popitem(last=False)
            self._futures.move_to_end(constraint)
            return future

    def compile(self, constraint: Constraint):
        """The xgrammar CompiledGrammar; raises GrammarCompileError for a constraint it cannot enforce."""
        return self.prefetch(constraint).result()

    def matcher(self, constraint: Constraint, end_token_ids: tuple[int, ...]):
        return self._xgr.GrammarMatcher(self.compile(constraint), override_stop_tokens=list(end_token_ids) or None)

    def _compile(self, c: Constraint):
        whitespace = {"any_whitespace": c.any_whitespace, "max_whitespace_cnt": MAX_WHITESPACE if c.any_whitespace
                      else None, "strict_mode": False}
        try:
            if c.kind == "json_schema":
                return self._compiler.compile_json_schema(c.source, **whitespace)
            if c.kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', **whitespace)
            if c.kind == "regex":
                return self._compiler.compile_regex(c.source)
            if c.kind == "choice":
                choices = json.loads(c.source)
                return self._compiler.compile_grammar("root ::= " + " | ".join(_ebnf_string(s) for s in choices))
            return self._compiler.compile_grammar(c.source)
        except Exception as e:   # xgrammar raises RuntimeError/ValueError subclasses with a C++ log prefix
            lines = [_XGRAMMAR_LOG_PREFIX.sub("", line) for line in str(e).strip().splitlines() if line.strip()]
            raise GrammarCompileError(f"cannot compile the {c.kind.replace('_', ' ')}: "
                                      f"{lines[-1] if lines else type(e).__name__}") from None


def _ebnf_string(text: str) -> str:
    """A double-quoted EBNF literal (JSON's escapes, which xgrammar's EBNF reads)."""
    return json.dumps(text, ensure_ascii=False)


def _vocab_type(xgr, tokenizer_path: str):
    """BYTE_LEVEL for byte-level BPE (gpt-oss, the tiny models), BYTE_FALLBACK for sentencepiece-style, else RAW."""
    with open(tokenizer_path, encoding="utf-8") as f:
        decoder = json.dumps(json.load(f).get("decoder"))
    if "ByteLevel" in decoder:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in decoder:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW

"""The conversation key a request carries for routing: OpenAI's `prompt_cache_key`, else `user` (both honoured as
identifiers that change no output, deploy/openai/request_fields.py); the cache-aware router pins a key to one replica."""
from __future__ import annotations

MAX_KEY_CHARS = 256


def session_key(req) -> str | None:
    extra = getattr(req, "model_extra", None) or {}
    key = extra.get("prompt_cache_key") or getattr(req, "prompt_cache_key", None) or getattr(req, "user", None)
    return str(key)[:MAX_KEY_CHARS] if key else None

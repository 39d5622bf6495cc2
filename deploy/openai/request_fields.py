"""Fields OpenAI or vLLM define on the generation endpoints that this server does not model as its own: the values it
honours (those meaning what this server does anyway) and a 400 naming the field for any other, so no field that a
client relies on is dropped silently. Fields nobody defines are still accepted and ignored with a warning (vLLM's
behaviour, which keeps SDK `extra_body` experiments working).
"""
from __future__ import annotations

from typing import Any

ANY = None   # every value is honoured (an identifier or hint that changes no output: user ids, cache keys, metadata)

# vLLM's sampling/prompt extras that chat and completions share, with the values that equal this server's behaviour.
_VLLM_SHARED: dict[str, tuple | None] = {
    "use_beam_search": (False,), "length_penalty": (1.0,), "allowed_token_ids": (None,), "bad_words": (None, []),
    "prompt_logprobs": (None,), "truncate_prompt_tokens": (None,), "spaces_between_special_tokens": (True,),
    "priority": (0,), "request_id": ANY, "logits_processors": (None,), "return_tokens_as_token_ids": (None, False),
    "return_token_ids": (None, False), "cache_salt": (None,), "kv_transfer_params": (None,), "vllm_xargs": (None,),
    "prompt_embeds": (None,), "thinking_token_budget": (None,), "mm_processor_kwargs": (None,),
}

CHAT_FIELDS: dict[str, tuple | None] = {
    **_VLLM_SHARED,
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "function_call": (None,),
    "functions": (None,), "web_search_options": (None,), "service_tier": (None, "auto", "default"),
    "store": (None, False), "metadata": ANY, "prompt_cache_key": ANY, "safety_identifier": ANY,
    "verbosity": (None, "medium"), "best_of": (None, 1), "echo": (None, False),
    "skip_special_tokens": (None, True), "add_generation_prompt": (None, True),
    "continue_final_message": (None, False), "add_special_tokens": (None, False), "documents": (None,),
    "chat_template": (None,), "chat_template_kwargs": (None, {}), "media_io_kwargs": (None,),
}

COMPLETION_FIELDS: dict[str, tuple | None] = {
    **_VLLM_SHARED,
    "skip_special_tokens": (None, False), "add_special_tokens": ANY, "metadata": ANY, "store": (None, False),
    "service_tier": (None, "auto", "default"), "prompt_cache_key": ANY, "safety_identifier": ANY,
}

RESPONSES_FIELDS: dict[str, tuple | None] = {
    "conversation": (None,), "include": (None, []), "max_tool_calls": ANY, "prompt": (None,),
    "prompt_cache_key": ANY, "safety_identifier": ANY, "service_tier": (None, "auto", "default"),
    "stream_options": (None, {}, {"include_obfuscation": False}), "top_logprobs": (None, 0),
    "truncation": (None, "disabled"), "request_id": ANY, "priority": (0,), "cache_salt": (None,),
}


def check_known_fields(table: dict[str, tuple | None], extra: dict[str, Any]) -> list[str]:
    """Raise ValueError for a known field with a value this server does not honour; return the unknown fields."""
    unknown = []
    for name, value in extra.items():
        if name not in table:
            unknown.append(name)
        elif table[name] is not ANY and value not in table[name]:
            honoured = ", ".join(repr(v) for v in table[name] if v is not None) or "nothing but null"
            raise ValueError(f"{name}={value!r} is not supported by this server (it accepts {honoured})")
    return sorted(unknown)

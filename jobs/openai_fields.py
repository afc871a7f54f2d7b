"""Every field of an OpenAI chat completions or completions request, and vLLM's extras, with what becomes of it.

- METADATA: bookkeeping fields OpenAI documents that change nothing in the answer: /v1 accepts and drops them.
- serving.vllm_fields.VLLM_FIELDS: every other field /v1 knows, with its endpoints and what a deployment served by
  vLLM does with it (the widest of the engines' tables: serving.builtin_fields.BUILTIN_FIELDS is a subset).
- A field in neither is unknown and /v1 refuses it by name, so nothing is ever dropped without a word.
- The engine that serves a deployment refuses, naming it, what it does not honour (serving.engine.Engine.check_fields).

Data and small pure functions: the web process imports this (no torch).
"""
from __future__ import annotations

from serving.engine import CHAT, COMPLETIONS
from serving.vllm_fields import VLLM_FIELDS

__all__ = ["CHAT", "COMPLETIONS", "METADATA", "VLLM_FIELDS", "unknown_field"]


# Who asked (user, safety_identifier), the caller's own tags (metadata), whether OpenAI keeps the answer for its
# evals (store), OpenAI's cache and billing hints (prompt_cache_*, service_tier): none changes the answer, and
# clients send some of them by default, so /v1 accepts them and passes none on.
METADATA = frozenset({
    "user", "metadata", "store", "safety_identifier", "prompt_cache_key", "prompt_cache_options",
    "prompt_cache_retention", "service_tier",
})


def unknown_field(body: dict, endpoint: str) -> str | None:
    """The first field of `body` that /v1 does not know on this endpoint, or None."""
    for key in body:
        field = VLLM_FIELDS.get(key)
        if key not in METADATA and (field is None or endpoint not in field.endpoints):
            return key
    return None



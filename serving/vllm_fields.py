"""What a deployment served by vLLM does with each field of an OpenAI request (and with vLLM's extras).

VLLM_FIELDS: every field /v1 knows (beside jobs.openai_fields.METADATA), with its endpoints, and whether vLLM
takes it: passes it to vLLM, which honours it; renames it into what vLLM 0.32 takes (its removed guided_* fields,
which it would otherwise ignore); or refuses it (400, naming it) unless its value asks for nothing.

Data and small pure functions: the web process imports this (no torch), and so does the inference server.
"""
from __future__ import annotations

from dataclasses import dataclass

from .engine import CHAT, COMPLETIONS

BOTH = frozenset({CHAT, COMPLETIONS})
ONLY_CHAT, ONLY_COMPLETIONS = frozenset({CHAT}), frozenset({COMPLETIONS})


@dataclass(frozen=True)
class VllmField:
    """What a vLLM-served deployment does with one field: passed when `refused` is empty."""

    endpoints: frozenset = BOTH
    refused: str = ""  # why vLLM cannot or may not take it
    neutral: tuple = ()  # values that ask for nothing: accepted, and not passed on, even where refused
    rename: str = ""  # "structured_outputs.json": where vLLM takes it now

    @property
    def passed(self) -> bool:
        return not self.refused


def _passed(endpoints=BOTH):
    return VllmField(endpoints)


def _refused(why, endpoints=BOTH, neutral=()):
    return VllmField(endpoints, refused=why, neutral=neutral)


def _guided(key):
    return VllmField(BOTH, rename=f"structured_outputs.{key}")


_MULTIMODAL = "it is for multimodal models; Tunedeck serves text models"
_DISAGGREGATED = "it is for disaggregated serving, which Tunedeck's vLLM servers do not run"

VLLM_FIELDS: dict[str, VllmField] = {
    # OpenAI's own fields.
    "model": _passed(),
    "messages": _passed(ONLY_CHAT),
    "prompt": _passed(ONLY_COMPLETIONS),
    "max_tokens": _passed(),
    "max_completion_tokens": _passed(),  # /v1 sends it as max_tokens, which both endpoints take
    "temperature": _passed(),
    "top_p": _passed(),
    "stop": _passed(),
    "seed": _passed(),
    "stream": _passed(),
    "stream_options": _passed(),
    "n": _passed(),
    "logprobs": _passed(),  # chat: true/false; completions: how many alternatives per token
    "top_logprobs": _passed(ONLY_CHAT),
    "presence_penalty": _passed(),
    "frequency_penalty": _passed(),
    "logit_bias": _passed(),
    "response_format": _passed(),  # vLLM takes it on completions too
    "tools": _passed(ONLY_CHAT),  # called only where the model's template has a tool-call parser
    "tool_choice": _passed(ONLY_CHAT),
    "parallel_tool_calls": _passed(ONLY_CHAT),
    "reasoning_effort": _passed(ONLY_CHAT),  # handed to the chat template, which reasoning models read
    "echo": _passed(),  # vLLM's chat takes it too
    "suffix": _passed(ONLY_COMPLETIONS),  # vLLM refuses it itself, by name, for models without fill-in-the-middle
    "best_of": _refused("vLLM 0.32 removed it (ask for `n` choices instead)", ONLY_COMPLETIONS, neutral=(1,)),
    "audio": _refused("these are text models", ONLY_CHAT),
    "modalities": _refused("these are text models", ONLY_CHAT, neutral=(["text"],)),
    "moderation": _refused("no moderation runs on this server", ONLY_CHAT),
    "prediction": _refused("Predicted Outputs are an OpenAI service", ONLY_CHAT),
    "web_search_options": _refused("no web search runs on this server", ONLY_CHAT),
    "verbosity": _refused("it is a setting of OpenAI's own models", ONLY_CHAT),
    "functions": _refused("OpenAI deprecated it: send `tools`", ONLY_CHAT),
    "function_call": _refused("OpenAI deprecated it: send `tool_choice`", ONLY_CHAT),
    # vLLM's extras (vllm/entrypoints/openai/{chat_completion,completion}/protocol.py).
    "top_k": _passed(),
    "min_p": _passed(),
    "repetition_penalty": _passed(),
    "use_beam_search": _passed(),
    "length_penalty": _passed(),
    "stop_token_ids": _passed(),
    "include_stop_str_in_output": _passed(),
    "ignore_eos": _passed(),
    "min_tokens": _passed(),
    "skip_special_tokens": _passed(),
    "spaces_between_special_tokens": _passed(),
    "truncate_prompt_tokens": _passed(),
    "truncation_side": _passed(),
    "prompt_logprobs": _passed(),
    "logprob_token_ids": _passed(),
    "allowed_token_ids": _passed(),
    "bad_words": _passed(),
    "add_special_tokens": _passed(),
    "structured_outputs": _passed(),
    "cache_salt": _passed(),
    "return_tokens_as_token_ids": _passed(),
    "return_token_ids": _passed(),
    "thinking_token_budget": _passed(),
    "repetition_detection": _passed(),
    "stream_interval": _passed(),
    "include_reasoning": _passed(ONLY_CHAT),
    "add_generation_prompt": _passed(ONLY_CHAT),
    "continue_final_message": _passed(ONLY_CHAT),
    "documents": _passed(ONLY_CHAT),
    "chat_template_kwargs": _passed(ONLY_CHAT),
    "return_prompt_text": _passed(ONLY_CHAT),
    # vLLM removed these (0.32 ignores them, with a warning in its log); structured_outputs takes them.
    "guided_json": _guided("json"),
    "guided_regex": _guided("regex"),
    "guided_choice": _guided("choice"),
    "guided_grammar": _guided("grammar"),
    "guided_whitespace_pattern": _guided("whitespace_pattern"),
    "guided_decoding_backend": _refused("vLLM chooses the structured-output backend itself"),
    # vLLM's extras for its operators, not for the callers of a shared server.
    "chat_template": _refused("a deployment answers with the chat template it was trained with", ONLY_CHAT),
    "media_io_kwargs": _refused(_MULTIMODAL, ONLY_CHAT),
    "mm_processor_kwargs": _refused(_MULTIMODAL, ONLY_CHAT),
    "mm_payload": _refused(_MULTIMODAL, neutral=("tensors",)),
    "return_mm_kwargs": _refused(_MULTIMODAL),
    "prompt_embeds": _refused("Tunedeck's vLLM servers take text prompts only", ONLY_COMPLETIONS),
    "priority": _refused("Tunedeck's vLLM servers serve requests first come, first served", neutral=(0,)),
    "request_id": _refused("a vLLM server is shared by several deployments and names requests itself"),
    "session_id": _refused("it is for routers in front of several vLLM servers; Tunedeck routes by model"),
    "kv_transfer_params": _refused(_DISAGGREGATED),
    "ec_transfer_params": _refused(_DISAGGREGATED),
    "vllm_xargs": _refused("it is for vLLM extensions, which Tunedeck's vLLM servers do not load"),
    "routed_experts_prompt_start": _refused("it is for mixture-of-experts routing data", neutral=(0,)),
    "return_token_offsets": _refused("vLLM honours it only on its render endpoints", neutral=(False,)),
    "watermarking": _refused("Tunedeck's vLLM servers have no watermark configured", neutral=(False,)),
}


def is_neutral(value, neutral: tuple) -> bool:
    # Compared with their JSON type too: `0` is not `false`.
    return any(type(value) is type(n) and value == n for n in neutral)


def vllm_refusal(body: dict) -> tuple[str, str] | None:
    """(field, why) for the first field a vLLM-served deployment must refuse, or None."""
    for key, value in body.items():
        field = VLLM_FIELDS.get(key)
        if field is None:
            return key, "it is not a field of this endpoint"
        if field.refused and not is_neutral(value, field.neutral):
            return key, field.refused
    return None


def for_vllm(body: dict) -> dict:
    """The body vLLM gets (vllm_refusal found nothing to refuse): fields whose value asks for nothing left out,
    renamed ones moved to where vLLM reads them (it answers 400 itself to two constraints at once)."""
    payload, structured = {}, {}
    for key, value in body.items():
        field = VLLM_FIELDS[key]
        if field.rename:
            structured[field.rename.removeprefix("structured_outputs.")] = value
        elif field.passed:
            payload[key] = value
    if structured:
        given = payload.get("structured_outputs")
        payload["structured_outputs"] = {**(given if isinstance(given, dict) else {}), **structured}
    return payload

"""What the built-in engine does with each field of an OpenAI request.

BUILTIN_FIELDS: honours it (sampling with top-k/top-p/min-p, penalties and logit_bias are logits processors over
transformers' generate, serving.sampling), or accepts only the values that ask for nothing; the inference server
refuses everything else by name. Pure data: the web process may import it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestField:
    """One request field: `how` this engine treats it. `accepts(value, body)` is None for a field it honours;
    otherwise it says which values ask for nothing (`n: 1`, `tool_choice: "none"`), the only ones accepted.
    The inference server refuses (400, naming the field) any other value, and any field not in BUILTIN_FIELDS."""

    how: str
    accepts: object = None

    @property
    def honoured(self) -> bool:
        return self.accepts is None


def _only(*neutral):
    # Compared with their JSON type too: completions' `logprobs: 0` asks for something, `logprobs: false` not.
    return lambda value, body: any(type(value) is type(n) and value == n for n in neutral)


def _tools_accepted(tools, body) -> bool:
    return body.get("tool_choice") == "none"


BUILTIN_FIELDS: dict[str, RequestField] = {
    "model": RequestField("the deployment that answers"),
    "messages": RequestField("chat: rendered with the model's chat template"),
    "prompt": RequestField("completions: the text to continue"),
    "max_tokens": RequestField("at most this many new tokens (and what the context holds)"),
    "temperature": RequestField("0 is greedy"),
    "top_p": RequestField("nucleus sampling"),
    "top_k": RequestField("samples among the k most likely tokens (0 or -1: all), as vLLM does"),
    "min_p": RequestField("drops tokens less likely than min_p times the most likely one, as vLLM does"),
    "repetition_penalty": RequestField(
        "transformers' and vLLM's: logits of tokens in the prompt or answer divided (or negative ones multiplied)"),
    "presence_penalty": RequestField("OpenAI's: subtracted once from the logit of each token in the answer"),
    "frequency_penalty": RequestField("OpenAI's: subtracted from a token's logit per time it is in the answer"),
    "logit_bias": RequestField("added to the logits of the token ids named"),
    "stop": RequestField("up to 4 strings that end the answer (cut from it)"),
    "seed": RequestField("a generator of the request's own: the same seed gives the same answer"),
    "stream": RequestField("server-sent events, token by token"),
    "stream_options": RequestField("include_usage: a last chunk with the token counts"),
    "tool_choice": RequestField("'none' only: this engine never calls a tool", _only("none")),
    "tools": RequestField(
        "with tool_choice 'none' only: shown to the model through its chat template, as vLLM does, never called",
        _tools_accepted),
    "parallel_tool_calls": RequestField("nothing to do: this engine never calls a tool", lambda v, body: True),
    "n": RequestField("one choice per request", _only(1)),
    "best_of": RequestField("one candidate per request", _only(1)),
    "logprobs": RequestField("no log probabilities", _only(False)),
    "top_logprobs": RequestField("no log probabilities", _only(0)),
    "echo": RequestField("the answer without the prompt", _only(False)),
    "response_format": RequestField("plain text: no JSON mode or schema", _only({"type": "text"})),
    "modalities": RequestField("text", _only(["text"])),
    # vLLM's extras, sent with their default values by some clients.
    "ignore_eos": RequestField("stops at the end-of-sequence token", _only(False)),
    "min_tokens": RequestField("may stop at any token", _only(0)),
    "use_beam_search": RequestField("no beam search", _only(False)),
    "skip_special_tokens": RequestField("special tokens are left out of the text", _only(True)),
    "include_stop_str_in_output": RequestField("the stop string is cut from the answer", _only(False)),
    "add_generation_prompt": RequestField("the chat template's generation prompt is added", _only(True)),
    "continue_final_message": RequestField("the answer is a new message", _only(False)),
}
# The honoured fields that ModelServer.chat/complete take as keyword arguments (the rest pick the model and
# prompt, or are the inference server's: stream, stream_options).
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "logit_bias", "stop", "seed")

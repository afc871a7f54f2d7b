"""One request on the built-in engine: its prompt, its sampling fields, generation with stop strings, streaming.

The logits processors carry out the request in vLLM's order (penalties and biases on the raw logits, then
temperature, top-k, top-p and min-p when sampling) over transformers' generate; stop strings are watched token by
token and cut from the answer; a stream runs the generation in a thread and hands out text deltas.
torch and transformers are imported inside the functions.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from finetune.errors import TunedeckError
from finetune.generation import generate


class GenerationRequestError(TunedeckError):
    """A request the model cannot serve as asked: too long for its context, no chat template, bad messages."""



@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------


class ChatPrompt:
    def __init__(self, messages, tools=None):
        self.messages = [_plain_message(m) for m in (messages or [])]
        if not self.messages:
            raise GenerationRequestError("messages must be a non-empty list of {role, content} objects.")
        self.tools = tools or None

    def token_ids(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise GenerationRequestError(
                "This model has no chat template; use the completions endpoint instead."
            )
        encoded = tokenizer.apply_chat_template(
            self.messages, tools=self.tools, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"]


def _plain_message(message) -> dict:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise GenerationRequestError("Each message must be an object with a role and a content.")
    content = message.get("content")
    if isinstance(content, list):
        # OpenAI content parts: only text parts mean anything to a text model.
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise GenerationRequestError("A message's content must be a string or a list of text parts.")
    return {"role": message["role"], "content": content}


class TextPrompt:
    def __init__(self, prompt):
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise GenerationRequestError("prompt must be a string.")
        self.prompt = prompt

    def token_ids(self, tokenizer):
        return tokenizer(self.prompt, return_tensors="pt")["input_ids"]


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """The request's honoured sampling fields (SAMPLING_FIELDS); None means the field was not sent."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    stop: object = None
    seed: int | None = None

    def __post_init__(self):
        self.max_tokens = 256 if self.max_tokens is None else int(self.max_tokens)
        self.temperature = 1.0 if self.temperature is None else float(self.temperature)
        self.top_p = 1.0 if self.top_p is None else float(self.top_p)
        self.top_k = 0 if self.top_k is None or self.top_k < 0 else int(self.top_k)
        self.min_p = 0.0 if self.min_p is None else float(self.min_p)
        self.repetition_penalty = 1.0 if self.repetition_penalty is None else float(self.repetition_penalty)
        self.presence_penalty = float(self.presence_penalty or 0)
        self.frequency_penalty = float(self.frequency_penalty or 0)
        self.logit_bias = _token_biases(self.logit_bias)
        self.stop = stop_list(self.stop)
        if self.max_tokens < 1:
            raise GenerationRequestError("max_tokens must be at least 1.")
        if self.temperature < 0:
            raise GenerationRequestError("temperature must not be negative.")
        if not 0 < self.top_p <= 1:
            raise GenerationRequestError("top_p must be in (0, 1].")
        if not 0 <= self.min_p <= 1:
            raise GenerationRequestError("min_p must be in [0, 1].")
        if self.repetition_penalty <= 0:
            raise GenerationRequestError("repetition_penalty must be greater than 0.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _token_biases(logit_bias) -> dict[int, float]:
    try:
        return {int(token): float(bias) for token, bias in (logit_bias or {}).items()}
    except (TypeError, ValueError, AttributeError):
        raise GenerationRequestError("logit_bias must map token ids to numbers.") from None


def generate_answer(model, group, input_ids, params: SamplingParams, on_token, cancelled) -> Result:
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    prompt_tokens = input_ids.shape[1]
    max_new = _room_left(group, prompt_tokens, params.max_tokens)
    watcher = _TokenWatcher(group.tokenizer, prompt_tokens, params.stop, on_token, cancelled)
    processors = request_processors(params, prompt_tokens, _vocab_size(model))
    pad_id = group.tokenizer.pad_token_id
    pad_id = group.stop_ids[0] if pad_id is None else pad_id
    # The request decides how to decode, as in the OpenAI API. generate fills every field left None from the
    # model's generation_config, which may carry sampling and repetition-penalty defaults, so the neutral
    # values are spelled out; what the request asks for is in `processors`.
    config = GenerationConfig(
        max_new_tokens=max_new,
        do_sample=False,  # sampling, when asked for, happens in _SeededSampler with a per-request generator
        temperature=1.0,
        top_k=50,
        top_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        eos_token_id=group.stop_ids,
        pad_token_id=pad_id,
    )
    with torch.no_grad():
        output = generate(
            model,
            input_ids,
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([watcher]),
        )
    new_tokens = output[0, prompt_tokens:].tolist()
    return _finish(group, new_tokens, params.stop, prompt_tokens)


def _vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def request_processors(params: SamplingParams, prompt_tokens: int, vocab_size: int):
    """The logits processors that carry out the request, in vLLM's order: penalties and biases on the raw
    logits (so they steer greedy decoding too), then temperature, top-k, top-p and min-p when sampling."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.presence_penalty or params.frequency_penalty or params.logit_bias:
        processors.append(_AnswerPenalties(params, prompt_tokens, vocab_size))
    if not params.greedy:
        processors.append(_SeededSampler(params))
    return processors


def _room_left(group, prompt_tokens: int, max_tokens: int) -> int:
    if group.context_length is None:
        return max_tokens
    room = group.context_length - prompt_tokens
    if room < 1:
        raise GenerationRequestError(
            f"The prompt is {prompt_tokens} tokens but the model's context holds {group.context_length}."
        )
    return min(max_tokens, room)


def _finish(group, new_tokens: list[int], stops: list[str], prompt_tokens: int) -> Result:
    completion_tokens = len(new_tokens)
    ended_on_stop_token = bool(new_tokens) and new_tokens[-1] in group.stop_ids
    if ended_on_stop_token:
        new_tokens = new_tokens[:-1]
    text = group.tokenizer.decode(new_tokens, skip_special_tokens=True)
    cut = _first_stop(text, stops)
    if cut is not None:
        text = text[:cut]
    finish = "stop" if ended_on_stop_token or cut is not None else "length"
    return Result(text, finish, prompt_tokens, completion_tokens)


def _first_stop(text: str, stops: list[str]) -> int | None:
    positions = [text.find(s) for s in stops if s in text]
    return min(positions) if positions else None


def _stop_safe_length(text: str, stops: list[str]) -> int:
    """How much of `text` can be shown: everything but a tail that might still grow into a stop string."""
    for held in range(max((len(s) for s in stops), default=1) - 1, 0, -1):
        if any(s.startswith(text[-held:]) for s in stops if len(text) >= held):
            return len(text) - held
    return len(text)


class _TokenWatcher:
    """Sees every generated token: reports it, and stops on stop strings or when the client went away."""

    def __init__(self, tokenizer, prompt_tokens, stops, on_token, cancelled):
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.stops = stops
        self.on_token = on_token
        self.cancelled = cancelled
        # A stop string of n characters spans at most n tokens, plus a few for partial UTF-8 bytes.
        self.window = max((len(s) for s in stops), default=0) + 4

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self.on_token is not None:
            self.on_token(int(input_ids[0, -1]))
        done = bool(self.cancelled and self.cancelled.is_set())
        if self.stops and not done:
            tail = input_ids[0, max(self.prompt_tokens, input_ids.shape[1] - self.window) :]
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            done = _first_stop(text, self.stops) is not None
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _AnswerPenalties:
    """OpenAI's presence and frequency penalties, counted over the answer so far, and logit_bias."""

    def __init__(self, params: SamplingParams, prompt_tokens: int, vocab_size: int):
        outside = [token for token in params.logit_bias if not 0 <= token < vocab_size]
        if outside:
            raise GenerationRequestError(
                f"logit_bias names token id {outside[0]}; this model's token ids run from 0 to {vocab_size - 1}."
            )
        self.presence = params.presence_penalty
        self.frequency = params.frequency_penalty
        self.biases = params.logit_bias
        self.prompt_tokens = prompt_tokens

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.clone()
        if self.presence or self.frequency:
            answer = input_ids[:, self.prompt_tokens :]
            counts = torch.zeros_like(scores).scatter_add_(1, answer, torch.ones_like(answer, dtype=scores.dtype))
            scores -= self.frequency * counts + self.presence * (counts > 0).to(scores.dtype)
        for token, bias in self.biases.items():
            scores[:, token] += bias
        return scores


class _SeededSampler:
    """Temperature, top-k, nucleus and min-p sampling with the request's own generator.

    It picks the token itself and leaves only that token's score finite, so generate runs greedily over it. A
    private torch.Generator makes `seed` reproducible even while other threads sample from other models; the
    global RNG that generate's own sampling uses is shared by every thread in the process.
    """

    def __init__(self, params: SamplingParams):
        import torch

        self.params = params
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(params.seed))

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float() / self.params.temperature, dim=-1).cpu()
        probs = _keep_likely(probs, self.params)
        choice = torch.multinomial(probs, 1, generator=self.generator).to(scores.device)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(1, choice, 0.0)


def _keep_likely(probs, params: SamplingParams):
    """Zeroes the tokens that top-k, top-p and min-p leave out (the most likely token always stays)."""
    if 0 < params.top_k < probs.shape[-1]:
        kth = probs.topk(params.top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)  # top-p then measures the mass of what is left
    if params.top_p < 1.0:
        probs = _nucleus(probs, params.top_p)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def _nucleus(probs, top_p: float):
    import torch

    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest set of tokens whose mass reaches top_p (always at least the most likely one).
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(1, order, sorted_probs)


# ---------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------

_DONE = object()


def stream_from_thread(run):
    """Runs `run(emit, cancelled)` in a thread and yields the text deltas it emits, then the final dict.

    The thread owns the model lock for the whole generation, so a client that stops reading cannot leave the
    lock held: closing this generator sets `cancelled`, and the generation stops at its next token.
    """
    deltas: queue.Queue = queue.Queue()
    cancelled = threading.Event()
    outcome: dict = {}

    def worker():
        try:
            outcome["result"] = run(deltas.put, cancelled)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            outcome["error"] = exc
        finally:
            deltas.put(_DONE)

    threading.Thread(target=worker, name="tunedeck-generate", daemon=True).start()
    try:
        shown = ""
        while (delta := deltas.get()) is not _DONE:
            shown += delta
            yield delta
        if "error" in outcome:
            raise outcome["error"]
        result: Result = outcome["result"]
        # Normally the deltas already spell the final text; a stop string found on the last token is cut here.
        if result.text.startswith(shown) and len(result.text) > len(shown):
            yield result.text[len(shown) :]
        yield result.as_dict()
    finally:
        cancelled.set()


class DeltaDecoder:
    """Turns tokens into the newly visible text, holding back what might still become a stop string."""

    def __init__(self, tokenizer, stop_ids, stops, emit):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.stops = stops
        self.emit = emit
        self.tokens: list[int] = []
        self.shown = 0

    def __call__(self, token_id: int) -> None:
        if token_id in self.stop_ids:
            return
        self.tokens.append(token_id)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        visible = _visible_length(text, self.stops)
        if visible > self.shown:
            self.emit(text[self.shown : visible])
            self.shown = visible


def _visible_length(text: str, stops: list[str]) -> int:
    cut = _first_stop(text, stops)
    if cut is not None:
        return cut
    # A trailing U+FFFD is half of a multi-byte character still being generated.
    return _stop_safe_length(text.rstrip("\ufffd"), stops)


def stop_list(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    return [s for s in stops if s]


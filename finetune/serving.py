"""The inference engine behind the OpenAI-compatible API, run inside a worker process.

A `ModelServer` holds loaded models and answers chat and completion requests for named deployments:

- a merged deployment (or any plain model folder) is one loaded model;
- adapter deployments share ONE loaded copy of their base model: peft keeps several adapters on it and each
  request switches to its own with `set_adapter`. Adapters load on first use and the least recently used are
  evicted beyond `max_adapters` per base. Adapters of different peft types (LoRA/DoRA vs IA3 vs prefix vs
  prompt tuning) cannot share a PeftModel, so each type gets its own copy of the base, and QLoRA adapters run
  on a 4-bit copy, the base they were trained on.
- bottleneck adapter layers (method "adapter", peft_type BOTTLENECK_ADAPTER, see finetune.methods) are not a
  peft type: they hook into the base's decoder layers and cannot be switched off, so each such adapter gets its
  own copy of the base with its layers attached (not counted against `max_adapters`, never evicted).

Adapter switching and generation mutate per-base state, so each loaded base has a lock held for the whole
request; requests for different bases run in parallel.

BUILTIN_FIELDS says what this engine does with each field of an OpenAI request: honours it (sampling with
top-k/top-p/min-p, penalties and logit_bias are logits processors over transformers' generate), or accepts only
the values that ask for nothing; the inference server refuses everything else by name.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import TunedeckError
from finetune.generation import generate
from finetune.merge import AdapterFolderError, describe_adapter
from finetune.methods import BOTTLENECK_TYPE
from finetune.modelstore import load_model_and_tokenizer, stop_token_ids

# peft types that attach to the model as prompt-learning wrappers rather than injected layers.
PROMPT_LEARNING_TYPES = {"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"}


# ---------------------------------------------------------------------------------------------------------
# What this engine does with each field of an OpenAI request
# ---------------------------------------------------------------------------------------------------------


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


class UnknownModel(TunedeckError):
    pass


class GenerationRequestError(TunedeckError):
    """A request the model cannot serve as asked: too long for its context, no chat template, bad messages."""


@dataclass
class _Deployment:
    name: str
    kind: str  # "adapter" or "merged"
    group_key: tuple
    adapter_dir: Path | None = None


@dataclass
class _LoadedBase:
    """One loaded model, optionally wrapped by a PeftModel holding several adapters of one peft type."""

    path: Path
    peft_type: str | None
    quantize_4bit: bool
    bottleneck_dir: Path | None = None  # adapter layers fixed onto this copy (BOTTLENECK_ADAPTER)
    lock: threading.Lock = field(default_factory=threading.Lock)
    model: object = None
    peft_model: object = None
    tokenizer: object = None
    stop_ids: list = field(default_factory=list)
    context_length: int | None = None
    loaded_adapters: OrderedDict = field(
        default_factory=OrderedDict
    )  # slot name -> deployment name, LRU first
    next_slot: int = 0


@dataclass
class _Result:
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


class ModelServer:
    def __init__(self, *, max_adapters: int = 8, device: str = "auto", dtype="auto"):
        if max_adapters < 1:
            raise ValueError("max_adapters must be at least 1")
        self.max_adapters = max_adapters
        self.device = device
        self.dtype = dtype
        self._deployments: dict[str, _Deployment] = {}
        self._bases: dict[tuple, _LoadedBase] = {}
        self._registry_lock = threading.Lock()

    # --- registry -----------------------------------------------------------------------------------------

    def add_adapter(
        self, name: str, adapter_dir, base_path=None, *, quantize_4bit: bool | None = None
    ) -> None:
        """Registers an adapter deployment; its base defaults to the path recorded in adapter_config.json.

        `quantize_4bit` None follows the adapter: one trained on a 4-bit base (QLoRA) is served on one, which
        reproduces the trained model exactly (its merged form runs on the full-precision base instead).
        """
        adapter_dir = Path(adapter_dir)
        description = describe_adapter(adapter_dir)
        base = Path(base_path) if base_path else _recorded_base_path(adapter_dir)
        quantized = description["quantized_base"] if quantize_4bit is None else quantize_4bit
        peft_type = description["peft_type"] or "LORA"
        # Bottleneck adapter layers cannot be switched per request: one base copy per adapter folder.
        fixed = str(adapter_dir.resolve()) if peft_type == BOTTLENECK_TYPE else None
        key = (str(base.resolve()), peft_type, bool(quantized), fixed)
        self._register(_Deployment(name=name, kind="adapter", group_key=key, adapter_dir=adapter_dir))

    def add_merged(self, name: str, model_dir) -> None:
        """Registers a standalone model folder (a merged adapter, or a base model served as it is)."""
        key = (str(Path(model_dir).resolve()), None, False, None)
        self._register(_Deployment(name=name, kind="merged", group_key=key))

    def _register(self, deployment: _Deployment) -> None:
        with self._registry_lock:
            if deployment.name in self._deployments:
                raise TunedeckError(
                    f"A model named {deployment.name!r} is already being served; remove it first."
                )
            self._deployments[deployment.name] = deployment
            if deployment.group_key not in self._bases:
                path, peft_type, quantized, fixed = deployment.group_key
                self._bases[deployment.group_key] = _LoadedBase(
                    Path(path), peft_type, quantized, Path(fixed) if fixed else None
                )

    def list_models(self) -> list[dict]:
        with self._registry_lock:
            return [self._describe(d) for d in self._deployments.values()]

    def _describe(self, deployment: _Deployment) -> dict:
        group = self._bases[deployment.group_key]
        if deployment.kind == "adapter" and group.bottleneck_dir is None:
            loaded = deployment.name in group.loaded_adapters.values()
        else:
            loaded = group.model is not None
        return {
            "name": deployment.name,
            "kind": deployment.kind,
            "base": str(group.path),
            "adapter_dir": str(deployment.adapter_dir) if deployment.adapter_dir else None,
            "quantized_4bit": group.quantize_4bit,
            "loaded": loaded,
        }

    def remove(self, name: str) -> None:
        """Stops serving `name`, unloading its adapter, and its base too when nothing else uses it."""
        deployment, group = self._lookup(name)
        with group.lock:
            with self._registry_lock:
                if self._deployments.get(name) is not deployment:
                    raise UnknownModel(f"No model named {name!r} is being served.")
                del self._deployments[name]
                still_used = any(d.group_key == deployment.group_key for d in self._deployments.values())
                if not still_used:
                    del self._bases[deployment.group_key]
            if still_used and deployment.kind == "adapter" and group.bottleneck_dir is None:
                self._unload_adapter(group, name)

    def load(self, name: str) -> None:
        """Loads a deployment now rather than on its first request, so a deployment can report itself live."""
        deployment, group = self._lookup(name)
        with group.lock:
            self._check_still_served(deployment)
            self._activate(group, deployment)

    def _lookup(self, name: str) -> tuple[_Deployment, _LoadedBase]:
        with self._registry_lock:
            deployment = self._deployments.get(name)
            if deployment is None:
                raise UnknownModel(f"No model named {name!r} is being served.")
            return deployment, self._bases[deployment.group_key]

    def _check_still_served(self, deployment: _Deployment) -> None:
        # A request that waited for the model lock may find its deployment removed meanwhile.
        with self._registry_lock:
            if self._deployments.get(deployment.name) is not deployment:
                raise UnknownModel(f"No model named {deployment.name!r} is being served.")

    # --- loading and adapter switching (called with group.lock held) ---------------------------------------

    def _ensure_base(self, group: _LoadedBase) -> None:
        if group.model is not None:
            return
        model, tokenizer = load_model_and_tokenizer(
            group.path, device=self.device, dtype=self.dtype, quantize_4bit=group.quantize_4bit
        )
        if group.bottleneck_dir is not None:
            from finetune.errors import TrainingError
            from finetune.methods import load_bottleneck

            try:
                load_bottleneck(model, group.bottleneck_dir)
            except (TrainingError, KeyError, RuntimeError) as exc:
                raise AdapterFolderError(
                    f"The adapter layers in {group.bottleneck_dir} do not fit the base model {group.path}: {exc}"
                ) from None
            model.eval()
        group.model, group.tokenizer = model, tokenizer
        group.stop_ids = stop_token_ids(tokenizer, model.generation_config)
        group.context_length = getattr(model.config, "max_position_embeddings", None)

    def _activate(self, group: _LoadedBase, deployment: _Deployment):
        """Returns the model to run for `deployment`, with its adapter loaded and active."""
        self._ensure_base(group)
        if deployment.kind == "merged" or group.bottleneck_dir is not None:
            return group.model
        slot = self._slot_for(group, deployment.name)
        if slot is None:
            slot = self._load_adapter(group, deployment)
        group.loaded_adapters.move_to_end(slot)
        group.peft_model.set_adapter(slot)
        return group.peft_model

    def _slot_for(self, group: _LoadedBase, name: str) -> str | None:
        return next((slot for slot, owner in group.loaded_adapters.items() if owner == name), None)

    def _load_adapter(self, group: _LoadedBase, deployment: _Deployment) -> str:
        from peft import PeftModel

        # peft adapter names become module attribute names; deployment names may hold any characters.
        slot = f"slot{group.next_slot}"
        group.next_slot += 1
        try:
            if group.peft_model is None:
                group.peft_model = PeftModel.from_pretrained(
                    group.model, str(deployment.adapter_dir), adapter_name=slot
                )
                group.peft_model.eval()
            else:
                group.peft_model.load_adapter(str(deployment.adapter_dir), adapter_name=slot)
        except RuntimeError as exc:
            if "size mismatch" not in str(exc):
                raise
            raise AdapterFolderError(
                f"The adapter of {deployment.name!r} does not fit its base model {group.path}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        group.loaded_adapters[slot] = deployment.name
        self._evict_beyond_limit(group, keep=slot)
        return slot

    def _evict_beyond_limit(self, group: _LoadedBase, keep: str) -> None:
        while len(group.loaded_adapters) > self.max_adapters:
            oldest = next(slot for slot in group.loaded_adapters if slot != keep)
            group.peft_model.delete_adapter(oldest)
            del group.loaded_adapters[oldest]

    def _unload_adapter(self, group: _LoadedBase, name: str) -> None:
        slot = self._slot_for(group, name)
        if slot is None:
            return
        del group.loaded_adapters[slot]
        if group.loaded_adapters:
            group.peft_model.delete_adapter(slot)
            return
        # peft cannot run with zero adapters, so the wrapper goes; injected LoRA/IA3 layers are taken out of
        # the base first, prompt-learning wrappers never touched it.
        if group.peft_type not in PROMPT_LEARNING_TYPES:
            group.model = group.peft_model.unload()
        group.peft_model = None

    # --- requests ------------------------------------------------------------------------------------------

    def chat(self, name, messages, *, tools=None, **sampling) -> dict:
        """`sampling`: the request's honoured fields (SAMPLING_FIELDS: max_tokens=, temperature=, top_k=, ...);
        `tools` are only shown to the model, through its chat template (tool_choice "none": none is called)."""
        return self._run(name, _ChatPrompt(messages, tools), _SamplingParams(**sampling)).as_dict()

    def complete(self, name, prompt, **sampling) -> dict:
        return self._run(name, _TextPrompt(prompt), _SamplingParams(**sampling)).as_dict()

    def stream_chat(self, name, messages, *, tools=None, **sampling):
        """Yields text deltas, then a final dict like chat()'s."""
        return self._stream(name, _ChatPrompt(messages, tools), _SamplingParams(**sampling))

    def stream_complete(self, name, prompt, **sampling):
        return self._stream(name, _TextPrompt(prompt), _SamplingParams(**sampling))

    def _run(self, name, prompt, params, emit=None, cancelled=None) -> _Result:
        deployment, group = self._lookup(name)
        with group.lock:
            self._check_still_served(deployment)
            model = self._activate(group, deployment)
            input_ids = prompt.token_ids(group.tokenizer).to(model.device)
            on_token = _DeltaDecoder(group.tokenizer, group.stop_ids, params.stop, emit) if emit else None
            return _generate(model, group, input_ids, params, on_token, cancelled)

    def _stream(self, name, prompt, params):
        self._lookup(name)  # fail fast, before the caller starts a response
        return _stream_from_thread(lambda emit, cancelled: self._run(name, prompt, params, emit, cancelled))


def _recorded_base_path(adapter_dir: Path) -> Path:
    import json

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    recorded = config.get("base_model_name_or_path")
    if not recorded or not Path(recorded).is_dir():
        raise AdapterFolderError(
            f"The adapter in {adapter_dir} records its base model as {recorded!r}, which is not a local "
            "folder; pass the base model path explicitly."
        )
    return Path(recorded)


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    return [s for s in stops if s]


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------


class _ChatPrompt:
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


class _TextPrompt:
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
class _SamplingParams:
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
        self.stop = _stop_list(self.stop)
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


def _generate(model, group: _LoadedBase, input_ids, params: _SamplingParams, on_token, cancelled) -> _Result:
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


def request_processors(params: _SamplingParams, prompt_tokens: int, vocab_size: int):
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


def _room_left(group: _LoadedBase, prompt_tokens: int, max_tokens: int) -> int:
    if group.context_length is None:
        return max_tokens
    room = group.context_length - prompt_tokens
    if room < 1:
        raise GenerationRequestError(
            f"The prompt is {prompt_tokens} tokens but the model's context holds {group.context_length}."
        )
    return min(max_tokens, room)


def _finish(group: _LoadedBase, new_tokens: list[int], stops: list[str], prompt_tokens: int) -> _Result:
    completion_tokens = len(new_tokens)
    ended_on_stop_token = bool(new_tokens) and new_tokens[-1] in group.stop_ids
    if ended_on_stop_token:
        new_tokens = new_tokens[:-1]
    text = group.tokenizer.decode(new_tokens, skip_special_tokens=True)
    cut = _first_stop(text, stops)
    if cut is not None:
        text = text[:cut]
    finish = "stop" if ended_on_stop_token or cut is not None else "length"
    return _Result(text, finish, prompt_tokens, completion_tokens)


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

    def __init__(self, params: _SamplingParams, prompt_tokens: int, vocab_size: int):
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

    def __init__(self, params: _SamplingParams):
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


def _keep_likely(probs, params: _SamplingParams):
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


def _stream_from_thread(run):
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
        except BaseException as exc:  # handed to the consumer, which re-raises it
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
        result: _Result = outcome["result"]
        # Normally the deltas already spell the final text; a stop string found on the last token is cut here.
        if result.text.startswith(shown) and len(result.text) > len(shown):
            yield result.text[len(shown) :]
        yield result.as_dict()
    finally:
        cancelled.set()


class _DeltaDecoder:
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

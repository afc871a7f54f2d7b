"""The serving engine interface, and how the inference server picks an engine for a deployment.

Shaped like vLLM's `vllm/entrypoints/openai/`, which serves any engine through one interface: an `Engine` loads
merged models and adapters, says whether it can serve a deployment (and why not), says when a deployment is
ready, answers OpenAI chat and completion requests whole or streamed, and lists the request fields it knows.
The inference server (jobs/inference_server.py) holds an ordered list of engines (settings.TUNEDECK_SERVING_ENGINES,
vLLM then the built-in engine by default) and `choose` gives each deployment the first engine that can serve it
and is available. A third engine is one module with an `Engine` subclass plus one entry in that list.

Pure Python: no Django, no torch (an engine imports what it needs inside its methods or modules of its own).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from finetune.errors import TunedeckError

MERGED, ADAPTER = "merged", "adapter"
CHAT, COMPLETIONS = "chat", "completions"  # the two OpenAI endpoints an engine answers


@dataclass(frozen=True)
class ServedModel:
    """What a deployment asks an engine to serve: a merged model folder, or an adapter on its base model."""

    name: str  # the OpenAI `model`
    kind: str  # MERGED or ADAPTER
    model_dir: Path | None = None  # the merged folder
    adapter_dir: Path | None = None
    base_path: Path | None = None
    priority: float = 0.0  # engines that start models one by one start the highest first (when last used)

    @property
    def weights_dir(self) -> Path:
        """The folder whose config.json says what the model is: the merged folder, or the adapter's base."""
        return Path(self.model_dir if self.kind == MERGED else self.base_path)


@dataclass(frozen=True)
class Choice:
    """Which engine serves a deployment, why, and what the user should know (written to its details)."""

    engine: str
    reason: str
    warning: str = ""


@dataclass(frozen=True)
class Unavailable:
    """Why an engine cannot run on this inference server at all. `warning` may say `{fallback}`: the label of
    the engine that serves instead."""

    reason: str
    warning: str = ""


class RequestError(TunedeckError):
    """A request an engine answers with an OpenAI-shaped error (`status`, `code`, the field in `param`)."""

    def __init__(self, status: int, message: str, code: str, *, param: str | None = None,
                 err_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.param, self.err_type = status, code, param, err_type

    def payload(self) -> dict:
        return {"error": {"message": str(self), "type": self.err_type, "param": self.param, "code": self.code}}


@dataclass
class Reply:
    """An engine's answer: a whole body, or `chunks` of a server-sent event stream written as they come.
    Closing the reply (a client that went away) stops the generation behind it."""

    status: int
    content_type: str = "application/json"
    body: bytes = b""
    chunks: Iterator[bytes] | None = None
    on_close: Callable[[], None] | None = None  # also stops what `chunks` has not started reading

    def close(self) -> None:
        for close in (getattr(self.chunks, "close", None), self.on_close):
            if close is not None:
                close()


def _nothing(*args) -> None:
    return None


@dataclass
class EngineContext:
    """What the inference server gives every engine. `on_ready(name)` and `on_failed(name, reason)` are for
    engines that load in the background: a deployment became ready, or could not be served after all."""

    device: str = "auto"  # auto, cpu or cuda
    max_adapters: int = 8  # adapters kept loaded per base model
    log_dir: Path = field(default_factory=lambda: Path("."))
    on_ready: Callable[[str], None] = _nothing
    on_failed: Callable[[str, str], None] = _nothing


class Engine(ABC):
    """One way of serving deployments. Subclasses set `name` (written to details["engine"]), `label` (how
    messages name it) and `fields` (the OpenAI request fields it knows, with what it does with each)."""

    name: ClassVar[str]
    label: ClassVar[str]
    fields: ClassVar[Mapping[str, object]]

    def __init__(self, context: EngineContext | None = None, *, enabled: bool = True, **options):
        if options:
            raise TypeError(f"{type(self).__name__} has no option {', '.join(sorted(options))}")
        self.context = context or EngineContext()
        self.enabled = enabled  # False: switched off for this inference server (serve_inference --no-vllm)

    # --- whether it serves a deployment -----------------------------------------------------------------

    def unavailable(self) -> Unavailable | None:
        """Why this engine cannot run here (not installed, switched off), or None."""
        if not self.enabled:
            return Unavailable(f"{self.label} is switched off for this inference server")
        return None

    @abstractmethod
    def cannot_serve(self, model: ServedModel) -> str:
        """Why this engine cannot serve `model` (its method, its architecture), or "" when it can."""

    @abstractmethod
    def serves_because(self, model: ServedModel) -> str:
        """Why this engine serves `model`, in the user's words, when it is the first choice."""

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts background work (a monitor thread); called once before the first deployment."""

    def stop(self) -> None:
        """Stops everything it started; called once when the inference server ends."""

    @abstractmethod
    def add_merged(self, name: str, model_dir) -> None:
        """Serves a merged model folder under `name` (loading it now or in the background)."""

    @abstractmethod
    def add_adapter(self, name: str, adapter_dir, base_path) -> None:
        """Serves an unmerged adapter on its base model under `name`."""

    def add(self, model: ServedModel) -> None:
        if model.kind == MERGED:
            self.add_merged(model.name, model.model_dir)
        else:
            self.add_adapter(model.name, model.adapter_dir, model.base_path)

    @abstractmethod
    def remove(self, name: str) -> None:
        """Stops serving `name` (nothing happens for a name it does not serve)."""

    @abstractmethod
    def __contains__(self, name: str) -> bool:
        """Whether `name` was added (ready or not)."""

    @abstractmethod
    def is_ready(self, name: str) -> bool:
        """Whether `name` answers now."""

    def progress(self, name: str) -> dict | None:
        """How far a deployment that is not ready yet is (written to details["engine_progress"]), or None."""
        return None

    def models(self) -> list[dict]:
        """What it holds, for the inference server's GET /models."""
        return []

    # --- requests -----------------------------------------------------------------------------------------

    @abstractmethod
    def refused_field(self, body: dict) -> tuple[str, str] | None:
        """(field, why) for the first field of `body` this engine cannot honour as asked, or None."""

    def check_fields(self, body: dict, reason: str, ahead=()) -> None:
        """Raises a 400 naming the first field of `body` this engine cannot honour. `reason` is why it serves the
        deployment; `ahead` the engines before it in the list, which may say what would serve the field."""
        refused = self.refused_field(body)
        if refused is not None:
            key, why = refused
            raise RequestError(400, self.refusal_message(key, why, reason, list(ahead)), "unsupported_parameter",
                               param=key)

    def refusal_message(self, key: str, why: str, reason: str, ahead: list[Engine]) -> str:
        return f"'{key}' is not supported by {self.label}, which serves this deployment: {why}. Send the request " \
               "without it."

    def refusal_hint(self, key: str, why_not_here: str) -> str:
        """What to tell a user whose field `key` was refused by an engine serving in this one's place, because
        of `why_not_here` (this engine's reason for not serving the deployment)."""
        return "Send the request without it."

    @abstractmethod
    def generate(self, endpoint: str, name: str, body: dict) -> Reply:
        """Answers a request (CHAT or COMPLETIONS) whole. Raises RequestError for what the client must fix."""

    @abstractmethod
    def stream(self, endpoint: str, name: str, body: dict) -> Reply:
        """Answers a request as server-sent events (`Reply.chunks`), errors in the request raised before it."""

    def answer(self, endpoint: str, name: str, body: dict) -> Reply:
        return self.stream(endpoint, name, body) if body.get("stream") else self.generate(endpoint, name, body)


class NoEngine(TunedeckError):
    """No engine in the list can serve a deployment."""


def choose(engines, model: ServedModel, failed: Mapping[str, str] | None = None) -> tuple[Engine, Choice]:
    """The first engine of `engines` that can serve `model` and is available, and the Choice that says why.

    When engines ahead of it were passed over, the first of them gives the reason (and any warning): "vLLM
    cannot serve DoRA adapters unmerged", "vLLM is not available". `failed` maps an engine's name to why it
    already failed to serve this deployment: it is passed over too.
    """
    passed_over: tuple[str, str] | None = None
    for engine in engines:
        why = _passed_over(engine, model, (failed or {}).get(engine.name))
        if why is None:
            if passed_over is None:
                return engine, Choice(engine.name, engine.serves_because(model))
            reason, warning = passed_over
            return engine, Choice(engine.name, reason, warning.replace("{fallback}", engine.label))
        passed_over = passed_over or why
    reason = passed_over[0] if passed_over else "no serving engine is configured"
    raise NoEngine(f"No serving engine can serve {model.name!r}: {reason}.")


def _passed_over(engine: Engine, model: ServedModel, failure: str | None) -> tuple[str, str] | None:
    cannot = engine.cannot_serve(model)
    if cannot:
        return cannot, ""
    unavailable = engine.unavailable()
    if unavailable is not None:
        return unavailable.reason, unavailable.warning
    if failure:
        return (f"its {engine.label} server failed",
                f"{engine.label} could not serve it, so {{fallback}} does: {failure}"[:2000])
    return None

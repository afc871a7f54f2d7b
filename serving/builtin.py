"""The built-in engine: transformers and peft in the inference server's own process (serving.model_server).

It serves every deployment Tunedeck can train (every method, merged or not), one request at a time per loaded
base model, so it is the last entry of the engine list: whatever the engines ahead of it cannot serve, or serve
yet, it serves. Its answers are OpenAI-shaped here; streams are server-sent events, token by token.
"""
from __future__ import annotations

import json
import logging
import time
import uuid

from finetune.errors import TunedeckError

from .builtin_fields import BUILTIN_FIELDS, SAMPLING_FIELDS
from .engine import CHAT, Engine, Reply, RequestError, ServedModel

log = logging.getLogger("tunedeck.inference")


class BuiltinEngine(Engine):
    name = "builtin"
    label = "the built-in server"
    fields = BUILTIN_FIELDS

    def __init__(self, context=None, **options):
        super().__init__(context, **options)
        from .model_server import ModelServer

        self.server = ModelServer(max_adapters=self.context.max_adapters, device=self.context.device)

    # --- whether it serves a deployment -----------------------------------------------------------------

    def cannot_serve(self, model: ServedModel) -> str:
        return ""

    def serves_because(self, model: ServedModel) -> str:
        return "the built-in server serves every method, merged or not"

    # --- lifecycle: loaded at once, so `live` means it answers ------------------------------------------

    def add_merged(self, name, model_dir) -> None:
        self.server.add_merged(name, model_dir)
        self._load(name)

    def add_adapter(self, name, adapter_dir, base_path) -> None:
        self.server.add_adapter(name, adapter_dir, base_path=base_path)
        self._load(name)

    def _load(self, name: str) -> None:
        try:
            self.server.load(name)  # a model that cannot load fails here, with its reason
        except BaseException:
            self.remove(name)
            raise

    def remove(self, name: str) -> None:
        from .model_server import UnknownModel

        try:
            self.server.remove(name)
        except UnknownModel:
            pass

    def __contains__(self, name: str) -> bool:
        return any(m["name"] == name for m in self.server.list_models())

    def is_ready(self, name: str) -> bool:
        return name in self

    def models(self) -> list[dict]:
        return self.server.list_models()

    # --- requests -----------------------------------------------------------------------------------------

    def refused_field(self, body: dict) -> tuple[str, str] | None:
        for key, value in body.items():
            field = BUILTIN_FIELDS.get(key)
            if field is None or not (field.honoured or field.accepts(value, body)):
                return key, field.how if field else "it is not a field this engine knows"
        return None

    def refusal_message(self, key, why, reason, ahead) -> str:
        refused = f"'{key}' is not supported by the built-in server that serves this deployment ({reason})."
        hint = ahead[0].refusal_hint(key, reason) if ahead else "Send the request without it."
        return f"{refused} {hint}"

    def generate(self, endpoint, name, body) -> Reply:
        result = self._call(lambda: self._run(endpoint, name, body, stream=False))
        shape = _chat_response if endpoint == CHAT else _completion_response
        return Reply(200, body=json.dumps(shape(name, result)).encode())

    def stream(self, endpoint, name, body) -> Reply:
        items = self._call(lambda: self._run(endpoint, name, body, stream=True))
        first = self._call(lambda: next(items))  # request errors (too long, no template) come before the headers
        return Reply(200, "text/event-stream", chunks=_events(endpoint, name, first, items, body),
                     on_close=items.close)

    def _run(self, endpoint, name, body, *, stream):
        params = {key: body[key] for key in (*SAMPLING_FIELDS, "tools") if body.get(key) is not None}
        if endpoint == CHAT:
            call = self.server.stream_chat if stream else self.server.chat
            return call(name, body.get("messages"), **params)
        params.pop("tools", None)
        call = self.server.stream_complete if stream else self.server.complete
        return call(name, body.get("prompt"), **params)

    @staticmethod
    def _call(work):
        """Runs `work`, turning what went wrong into the OpenAI error the client gets."""
        from .model_server import UnknownModel
        from .sampling import GenerationRequestError

        try:
            return work()
        except GenerationRequestError as exc:
            raise RequestError(400, str(exc), "invalid_request") from exc
        except UnknownModel as exc:
            raise RequestError(404, str(exc), "model_not_found", param="model") from exc
        except TunedeckError as exc:
            raise RequestError(500, str(exc), "model_error", err_type="server_error") from exc
        except Exception as exc:  # reported to the client instead of a dropped connection
            log.exception("generation failed")
            raise RequestError(500, f"{type(exc).__name__}: {exc}", "model_error", err_type="server_error") from exc


# ---------------------------------------------------------------------------------------------------------
# OpenAI shapes
# ---------------------------------------------------------------------------------------------------------


def _event(payload) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {text}\n\n".encode()


def _events(endpoint, name, first, items, body):
    """The server-sent events of a streamed answer: deltas as they come, the finish reason, usage if asked."""
    ident = ("chatcmpl-" if endpoint == CHAT else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    chunk = _chat_chunk if endpoint == CHAT else _completion_chunk
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    try:
        if endpoint == CHAT:
            yield _event(chunk(ident, created, name, {"role": "assistant", "content": ""}))
        final = None
        item = first
        while item is not None:
            if isinstance(item, str):
                yield _event(chunk(ident, created, name, item if endpoint != CHAT else {"content": item}))
            else:
                final = item
            item = next(items, None)
        finish = (final or {}).get("finish_reason", "stop")
        yield _event(chunk(ident, created, name, {} if endpoint == CHAT else "", finish))
        if include_usage and final:
            yield _event({"id": ident, "object": chunk.object, "created": created, "model": name,
                          "choices": [], "usage": _usage(final)})
    except GeneratorExit:
        raise  # the client went away: `finally` stops the generation at its next token
    except Exception as exc:  # the headers are gone: report in the stream
        log.exception("streaming failed for %s", name)
        yield _event({"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error",
                                "param": None, "code": "model_error"}})
    finally:
        items.close()
    yield _event("[DONE]")


def _usage(result: dict) -> dict:
    return {
        "prompt_tokens": result["prompt_tokens"],
        "completion_tokens": result["completion_tokens"],
        "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
    }


def _chat_response(name: str, result: dict) -> dict:
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": result["text"]},
            "finish_reason": result["finish_reason"],
            "logprobs": None,
        }],
        "usage": _usage(result),
    }


def _completion_response(name: str, result: dict) -> dict:
    return {
        "id": "cmpl-" + uuid.uuid4().hex[:24],
        "object": "text_completion",
        "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "text": result["text"], "finish_reason": result["finish_reason"],
                     "logprobs": None}],
        "usage": _usage(result),
    }


def _chat_chunk(ident, created, name, delta, finish=None) -> dict:
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


_chat_chunk.object = "chat.completion.chunk"


def _completion_chunk(ident, created, name, text, finish=None) -> dict:
    return {"id": ident, "object": "text_completion", "created": created, "model": name,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


_completion_chunk.object = "text_completion"

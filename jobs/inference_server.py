"""The inference server: a long-lived process that keeps deployed models loaded and answers generation requests.

Run with `python manage.py serve_inference --port 8100`. It is the only process that imports torch for serving;
the web process validates and authenticates OpenAI requests and proxies them here.

- Every second (and whenever a request names a model it does not know) it reads the deployments that are
  `loading` or `live` from the database and makes its finetune.serving.ModelServer match: merged deployments
  load their merged folder; unmerged ones are adapters on their base, several adapters of one base sharing one
  loaded copy (multi-LoRA, loaded on demand, least recently used evicted). A `loading` deployment is loaded at
  once and marked `live` (or `failed` with the reason).
- A small internal HTTP API, bound to 127.0.0.1 by default and guarded by a random internal token
  (jobs.deploy.internal_token: TUNEDECK_INTERNAL_TOKEN, or made once in the data directory):
      GET  /health                 {"ok": true, "models": <how many>}   (no token: for liveness checks)
      GET  /models                 {"models": [{name, kind, base, adapter_dir, quantized_4bit, loaded}, ...]}
      POST /v1/chat/completions    OpenAI request body (already validated by the web side), stream or not
      POST /v1/completions
  Responses are OpenAI-shaped, streams are server-sent events over chunked HTTP/1.1, so the web side passes
  the bytes through unchanged.
"""
from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from django.db import connections

from finetune.errors import TunedeckError

from . import deploy, serving_engines
from .periodic import run_every

log = logging.getLogger("tunedeck.inference")


class InferenceService:
    """The ModelServer plus what keeps it in step with the deployments in the database."""

    def __init__(self, *, device: str = "auto", max_adapters: int = 8, poll_seconds: float = 1.0,
                 use_vllm: bool = True):
        from finetune.serving import ModelServer
        from finetune.vllm_engine import VllmSupervisor

        self.server = ModelServer(max_adapters=max_adapters, device=device)
        self.poll_seconds = poll_seconds
        self.registered: dict[str, tuple] = {}  # deployment name -> spec key it was registered with
        self.specs: dict[str, dict] = {}  # deployment name -> the spec it was registered with
        self.notes: dict[str, dict] = {}  # deployment name -> which engine serves it and why
        self.engine_reasons: dict[str, str] = {}  # built-in deployments -> why not vLLM
        self.fallbacks: dict[tuple, str] = {}  # spec key -> why its vLLM server failed (served built-in)
        self.engine_settings = serving_engines.engine_settings(device, max_adapters) if use_vllm else None
        self.vllm = VllmSupervisor(self.engine_settings, on_ready=self._vllm_ready,
                                   on_failed=self._vllm_failed) if use_vllm else None
        self._sync_lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # --- keeping in step with the database ----------------------------------------------------------------

    def start(self) -> None:
        if self.vllm is not None:
            self.vllm.start()
        self._thread = threading.Thread(target=self._poll, name="tunedeck-inference-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self.vllm is not None:
            self.vllm.stop()

    def _poll(self) -> None:
        run_every(self.poll_seconds, self.sync, self._stopped, "syncing deployments", log=log)

    def sync(self) -> None:
        with self._sync_lock:
            wanted = {spec["name"]: spec for spec in deploy.serving_specs()}
            for name, key in list(self.registered.items()):
                if name not in wanted or wanted[name]["key"] != key:
                    self._unregister(name)
            for name, spec in wanted.items():
                if name not in self.registered:
                    self._register(spec)
                elif spec["status"] == deploy.Status.LOADING:
                    self._still_loading(spec)

    def _register(self, spec: dict) -> None:
        name = spec["name"]
        self.specs[name] = spec
        if self._register_on_vllm(spec):
            return
        try:
            if spec["kind"] == "merged":
                self.server.add_merged(name, spec["model_dir"])
            else:
                self.server.add_adapter(name, spec["adapter_dir"], base_path=spec["base_path"])
            self.registered[name] = spec["key"]
            # Loaded now, not on the first request: `live` then means it answers at once, and a model that
            # cannot load fails here with its reason.
            started = time.monotonic()
            self.server.load(name)
        except Exception as exc:  # noqa: BLE001 - whatever stops it loading is the deployment's failure reason
            log.warning("deployment %s failed to load: %s", name, exc)
            self._unregister(name)
            message = str(exc) if isinstance(exc, TunedeckError) else f"{type(exc).__name__}: {exc}"
            deploy.mark_failed(spec["id"], spec["revision"], f"The inference server could not load it: {message}")
            return
        if spec["status"] == deploy.Status.LOADING:
            self._note(spec, go_live=True)
        log.info("serving %s (%s) after %.1fs", name, spec["kind"], time.monotonic() - started)

    def _register_on_vllm(self, spec: dict) -> bool:
        """Hands the deployment to a vLLM server when its method allows (True), else notes why not (False)."""
        from finetune.vllm_engine import VllmUnavailable, choose_engine

        merged = spec["kind"] == "merged"
        choice = choose_engine(
            spec["kind"], spec["model_dir"] if merged else spec["base_path"], spec["adapter_dir"],
            vllm_python=self.engine_settings.python if self.engine_settings else None,
            device=self.engine_settings.device if self.engine_settings else "cpu")
        if self.vllm is None and choice["engine"] == "vllm":
            choice = {"engine": "builtin", "reason": "vLLM is switched off for this inference server", "warning": ""}
        failed = self.fallbacks.get(spec["key"])
        if failed and choice["engine"] == "vllm":
            choice = {"engine": "builtin", "reason": "its vLLM server failed",
                      "warning": f"vLLM could not serve it, so the built-in server does: {failed}"[:2000]}
        # Noted before the hand-over: an adapter joining a running server goes live inside add_adapter, and that
        # write must already carry the engine (a page never shows live with no engine).
        self.notes[spec["name"]] = _engine_note(choice)
        if choice["engine"] == "vllm":
            try:
                if merged:
                    self.vllm.add_merged(spec["name"], spec["model_dir"])
                else:
                    self.vllm.add_adapter(spec["name"], spec["base_path"], spec["adapter_dir"])
            except (VllmUnavailable, OSError) as exc:
                choice = {"engine": "builtin", "reason": "its vLLM server failed",
                          "warning": f"vLLM could not serve it, so the built-in server does: {exc}"}
                self.notes[spec["name"]] = _engine_note(choice)
        self._note(spec, engine_progress=None)
        if choice["engine"] != "vllm":
            self.engine_reasons[spec["name"]] = choice["reason"]
            return False
        self.registered[spec["name"]] = spec["key"]
        return True

    def _still_loading(self, spec: dict) -> None:
        name = spec["name"]
        if self.vllm is not None and name in self.vllm and not self.vllm.is_ready(name):
            self._note(spec, engine_progress=self.vllm.progress(name))
            return
        # Served already, yet `loading`: the deploy task rewrote the row after the load went live. Say it again.
        self._note(spec, engine_progress=None, go_live=True)

    def _note(self, spec: dict, **extra) -> None:
        """Writes which engine serves it (again: the deploy task may have rewritten the details meanwhile)."""
        serving_engines.note(spec["id"], spec["revision"], **self.notes.get(spec["name"], {}), **extra)

    def _vllm_ready(self, name: str) -> None:
        spec = self.specs.get(name)
        if spec is not None:
            self._note(spec, engine_progress=None, go_live=True)
            log.info("serving %s on vLLM", name)
        connections.close_all()  # the monitor thread's own connection

    def _vllm_failed(self, name: str, reason: str) -> None:
        """Falls back to the built-in server at the next sync (never a failed deployment)."""
        spec = self.specs.get(name)
        log.warning("vLLM failed for %s: %s; falling back to the built-in server", name, reason)
        if spec is not None:
            self.fallbacks[spec["key"]] = reason
            self.registered.pop(name, None)
        connections.close_all()

    def _unregister(self, name: str) -> None:
        from finetune.serving import UnknownModel

        self.registered.pop(name, None)
        self.engine_reasons.pop(name, None)
        if self.vllm is not None and name in self.vllm:
            self.vllm.remove(name)
            log.info("stopped serving %s", name)
            return
        try:
            self.server.remove(name)
        except UnknownModel:
            pass
        log.info("stopped serving %s", name)

    def ensure(self, name: str) -> bool:
        """True when `name` is served, syncing first if it is not (a deployment that just went live)."""
        if name in self.registered:
            return True
        try:
            self.sync()
        finally:
            connections.close_all()  # this request thread's own connection
        return name in self.registered

    def models(self) -> list[dict]:
        return self.server.list_models()


# ---------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------


class ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TunedeckInference/1"
    service: InferenceService  # set on the subclass made by make_server
    token: str

    def log_message(self, fmt, *args):  # noqa: D401 - route the access log through logging
        log.debug("%s %s", self.address_string(), fmt % args)

    # --- plumbing ---------------------------------------------------------------------------------------------

    def _authorised(self) -> bool:
        given = self.headers.get("X-Tunedeck-Internal", "")
        if hmac.compare_digest(given, self.token):
            return True
        self._error(HTTPStatus.UNAUTHORIZED, "Missing or wrong internal token.", "unauthorized")
        return False

    def _json(self, status, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status, message, code, err_type="invalid_request_error", param=None) -> None:
        self._json(status, {"error": {"message": message, "type": err_type, "param": param, "code": code}})

    def _chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ClientGone() from exc

    def _event(self, payload) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        self._chunk(f"data: {text}\n\n".encode())

    # --- routes -------------------------------------------------------------------------------------------------

    def do_GET(self):  # noqa: N802
        if self.path == "/health":
            return self._json(200, {"ok": True, "models": len(self.service.models())})
        if not self._authorised():
            return None
        if self.path == "/models":
            return self._json(200, {"models": self.service.models()})
        return self._error(404, f"No route {self.path}.", "not_found")

    def do_POST(self):  # noqa: N802
        if not self._authorised():
            return None
        kinds = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
        kind = kinds.get(self.path)
        if kind is None:
            return self._error(404, f"No route {self.path}.", "not_found")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return self._error(400, "The body must be a JSON object.", "invalid_json")
        try:
            return self._generate(kind, body)
        except ClientGone:
            self.close_connection = True
            return None

    def _generate(self, kind: str, body: dict):
        from finetune.serving import GenerationRequestError, UnknownModel

        name = str(body.get("model") or "")
        if not self.service.ensure(name):
            return self._error(404, f"The model {name!r} does not exist or is not live.", "model_not_found",
                               param="model")
        if self.service.vllm is not None and name in self.service.vllm:
            return self._relay(kind, name, body)
        refused = serving_engines.refused_parameter(body)
        if refused:
            reason = self.service.engine_reasons.get(name, "built-in server")
            return self._error(400, serving_engines.refusal_message(refused, reason), "unsupported_parameter",
                               param=refused)
        params = serving_engines.builtin_params(body)
        server = self.service.server
        stream = bool(body.get("stream"))
        try:
            if kind == "chat":
                if not stream:
                    return self._json(200, _chat_response(name, server.chat(name, body.get("messages"), **params)))
                items = server.stream_chat(name, body.get("messages"), **params)
            else:
                if not stream:
                    return self._json(200, _completion_response(name, server.complete(name, body.get("prompt"),
                                                                                          **params)))
                items = server.stream_complete(name, body.get("prompt"), **params)
            first = next(items)  # request errors (too long, no chat template) surface before the headers
        except GenerationRequestError as exc:
            return self._error(400, str(exc), "invalid_request")
        except UnknownModel as exc:
            return self._error(404, str(exc), "model_not_found", param="model")
        except TunedeckError as exc:
            return self._error(500, str(exc), "model_error", err_type="server_error")
        except Exception as exc:  # noqa: BLE001 - reported to the client instead of a dropped connection
            log.exception("generation failed for %s", name)
            return self._error(500, f"{type(exc).__name__}: {exc}", "model_error", err_type="server_error")
        return self._stream(kind, name, first, items, body)

    def _relay(self, kind, name, body):
        from finetune.vllm_engine import VllmUnavailable

        try:
            route = self.service.vllm.route(name)
        except VllmUnavailable as exc:
            return self._error(503, str(exc), "model_loading", err_type="service_unavailable")
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        try:
            return serving_engines.relay(self, route, path, body)
        except OSError as exc:  # the server died mid-request; the monitor restarts it
            if isinstance(exc, (BrokenPipeError, ConnectionResetError)) and self.wfile.closed:
                raise ClientGone() from exc
            return self._error(503, f"The vLLM server of {name!r} is restarting: {exc}", "model_loading",
                               err_type="service_unavailable")

    def _stream(self, kind, name, first, items, body):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        chunk = _chat_chunk if kind == "chat" else _completion_chunk
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            if kind == "chat":
                self._event(chunk(ident, created, name, {"role": "assistant", "content": ""}))
            final = None
            item = first
            while True:
                if isinstance(item, str):
                    self._event(chunk(ident, created, name, item if kind != "chat" else {"content": item}))
                else:
                    final = item
                item = next(items, None)
                if item is None:
                    break
            finish = (final or {}).get("finish_reason", "stop")
            self._event(chunk(ident, created, name, {} if kind == "chat" else "", finish))
            if include_usage and final:
                self._event({"id": ident, "object": chunk.object, "created": created, "model": name,
                             "choices": [], "usage": _usage(final)})
        except ClientGone:
            items.close()  # stops the generation at its next token
            raise
        except Exception as exc:  # noqa: BLE001 - the headers are gone: report in the stream
            log.exception("streaming failed for %s", name)
            self._event({"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error",
                                   "param": None, "code": "model_error"}})
        finally:
            items.close()
        self._event("[DONE]")
        self._chunk(b"")  # the zero-length chunk that ends the response


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


def make_server(service: InferenceService, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"service": service, "token": deploy.internal_token()})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    return httpd


def _engine_note(choice: dict) -> dict:
    return {"engine": choice["engine"], "engine_reason": choice["reason"], "engine_warning": choice["warning"] or None}

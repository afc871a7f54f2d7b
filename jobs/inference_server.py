"""The inference server: a long-lived process that keeps deployed models served and answers generation requests.

Run with `python manage.py serve_inference --port 8100`. It is the only process that imports torch for serving;
the web process validates and authenticates OpenAI requests and proxies them here.

- Every second (and whenever a request names a model it does not know) it reads the deployments that are
  `loading` or `live` from the database and makes its engines match. Each deployment goes to the first engine of
  settings.TUNEDECK_SERVING_ENGINES (vLLM, then the built-in engine: serving/) that can serve it and is
  available; details["engine"] says which and why. An engine that loads at once (the built-in one) makes a
  `loading` deployment `live` (or `failed` with the reason); one that loads in the background (vLLM) calls back
  when it answers, or when it gave up, and the deployment goes to the next engine in the list.
- A small internal HTTP API, bound to 127.0.0.1 by default and guarded by a random internal token
  (jobs.deploy.internal_token: TUNEDECK_INTERNAL_TOKEN, or made once in the data directory):
      GET  /health                 {"ok": true, "models": <how many>}   (no token: for liveness checks)
      GET  /models                 {"models": [{name, engine, kind, base, adapter_dir, quantized_4bit, loaded}, ...]}
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
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from django.conf import settings
from django.db import connections

from finetune.errors import TunedeckError
from serving.engine import (
    CHAT,
    COMPLETIONS,
    Choice,
    EngineContext,
    NoEngine,
    RequestError,
    ServedModel,
    choose,
)

from . import deploy, serving_engines
from .periodic import run_every

log = logging.getLogger("tunedeck.inference")
# After an engine takes a deployment over, the one that stood in keeps it this long for requests already routed.
SWITCH_GRACE_SECONDS = 10.0


class InferenceService:
    """The engines, plus what keeps them in step with the deployments in the database."""

    def __init__(self, *, device: str = "auto", max_adapters: int = 8, poll_seconds: float = 1.0,
                 switched_off=(), engines=None):
        context = EngineContext(device=device, max_adapters=max_adapters, log_dir=Path(settings.DATA_DIR) / "logs",
                                on_ready=self._engine_ready, on_failed=self._engine_failed)
        self.engines = engines if engines is not None else serving_engines.build_engines(context, switched_off)
        for engine in self.engines:  # engines made elsewhere (tests, benches) report to this service too
            engine.context.on_ready, engine.context.on_failed = self._engine_ready, self._engine_failed
        self.poll_seconds = poll_seconds
        self.registered: dict[str, tuple] = {}  # deployment name -> spec key it was registered with
        self.specs: dict[str, dict] = {}  # deployment name -> the spec it was registered with
        self.serving: dict[str, object] = {}  # deployment name -> the engine that holds it
        self.choices: dict[str, object] = {}  # deployment name -> serving.engine.Choice: which engine and why
        self.failures: dict[tuple, dict[str, str]] = {}  # spec key -> {engine name: why it could not serve it}
        # deployment name -> (the engine chosen, its Choice) while another engine answers until it is ready
        self.preferred: dict[str, tuple] = {}
        self.usage = serving_engines.UsageLog(Path(settings.DATA_DIR) / "serving-last-used.json")
        self._sync_lock = threading.Lock()
        self._switch_lock = threading.Lock()  # which engine answers for a deployment while another loads
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # --- keeping in step with the database ----------------------------------------------------------------

    def start(self) -> None:
        for engine in self.engines:
            engine.start()
        self._thread = threading.Thread(target=self._poll, name="tunedeck-inference-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        for engine in self.engines:
            engine.stop()

    def _poll(self) -> None:
        run_every(self.poll_seconds, self.sync, self._stopped, "syncing deployments", log=log)

    def sync(self) -> None:
        with self._sync_lock:
            wanted = {spec["name"]: spec for spec in deploy.serving_specs()}
            for name, key in list(self.registered.items()):
                if name not in wanted or wanted[name]["key"] != key:
                    self._unregister(name)
            keys = {spec["key"] for spec in wanted.values()}
            self.failures = {key: failed for key, failed in self.failures.items() if key in keys}
            # Most recently used first: engines that start models one at a time start them in this order.
            for name, spec in sorted(wanted.items(), key=lambda item: -self.usage.last_used(item[0])):
                if name not in self.registered:
                    self._register(spec)
                elif name in self.preferred:
                    self._note(spec, engine_progress=self.preferred[name][0].progress(name))
                elif spec["status"] == deploy.Status.LOADING:
                    self._still_loading(spec)
            self.usage.save()

    def _register(self, spec: dict) -> None:
        """Hands the deployment to the first engine that can serve it; one that fails to take it is passed over
        (the next one serves, with a warning), and when none is left the deployment fails with the reason."""
        name = spec["name"]
        self.specs[name] = spec
        model = _served_model(spec, self.usage.last_used(name))
        failed = self.failures.setdefault(spec["key"], {})
        while True:
            try:
                engine, choice = choose(self.engines, model, failed)
            except (NoEngine, TunedeckError) as exc:  # TunedeckError: an adapter folder no engine can read
                reason = failed.get(self._last_engine_name(failed)) or str(exc)
                deploy.mark_failed(spec["id"], spec["revision"], f"The inference server could not load it: {reason}")
                return
            # Noted before the hand-over: an engine that loads at once (or an adapter joining a running vLLM
            # server) goes live inside add, and that write must already carry the engine.
            self.choices[name] = choice
            self._note(spec, engine_progress=None)
            self.registered[name], self.serving[name] = spec["key"], engine
            started = time.monotonic()
            try:
                engine.add(model)
            except Exception as exc:  # noqa: BLE001 - whatever stops it loading is the reason, for the next engine
                log.warning("%s could not serve %s: %s", engine.label, name, exc)
                self._unregister(name)
                failed[engine.name] = str(exc) if isinstance(exc, TunedeckError) else f"{type(exc).__name__}: {exc}"
                continue
            break
        if not engine.is_ready(name):
            self._serve_meanwhile(spec, model, engine, choice)
        elif spec["status"] == deploy.Status.LOADING:
            self._note(spec, go_live=True)
        log.info("serving %s (%s) on %s after %.1fs", name, spec["kind"], engine.name, time.monotonic() - started)

    def _serve_meanwhile(self, spec: dict, model: ServedModel, engine, choice) -> None:
        """While `engine` loads in the background (a vLLM server starting), the next engine in the list that can
        serve the deployment at once answers for it; `_engine_ready` switches over when `engine` answers."""
        name = spec["name"]
        for stand_in in self.engines[self.engines.index(engine) + 1:]:
            if stand_in.cannot_serve(model) or stand_in.unavailable() is not None:
                continue
            try:
                stand_in.add(model)
            except Exception as exc:  # noqa: BLE001 - no stand-in then: the deployment waits for `engine`
                log.warning("%s could not stand in for %s: %s", stand_in.label, name, exc)
                continue
            with self._switch_lock:  # `engine` may have become ready while the stand-in loaded
                stood_in = stand_in.is_ready(name) and not engine.is_ready(name)
                if stood_in:
                    self.preferred[name] = (engine, choice)
                    self.serving[name] = stand_in
                    self.choices[name] = Choice(
                        stand_in.name, f"its {engine.label} server is starting",
                        f"{stand_in.label.capitalize()} answers until {engine.label} is ready, then {engine.label} "
                        f"takes over ({choice.reason}).")
            if not stood_in:
                stand_in.remove(name)
                if engine.is_ready(name):
                    return
                continue
            self._note(spec, engine_progress=engine.progress(name), go_live=True)
            log.info("%s answers for %s until %s is ready", stand_in.label, name, engine.label)
            return

    def _last_engine_name(self, failed: dict) -> str:
        return next(reversed(failed), "")

    def _still_loading(self, spec: dict) -> None:
        name = spec["name"]
        engine = self.serving.get(name)
        if engine is not None and not engine.is_ready(name):
            self._note(spec, engine_progress=engine.progress(name))
            return
        # Served already, yet `loading`: the deploy task rewrote the row after the load went live. Say it again.
        self._note(spec, engine_progress=None, go_live=True)

    def _note(self, spec: dict, **extra) -> None:
        """Writes which engine serves it (again: the deploy task may have rewritten the details meanwhile)."""
        choice = self.choices.get(spec["name"])
        engine = {} if choice is None else {"engine": choice.engine, "engine_reason": choice.reason,
                                            "engine_warning": choice.warning or None}
        serving_engines.note(spec["id"], spec["revision"], **engine, **extra)

    def _engine_ready(self, name: str) -> None:
        """An engine that loads in the background answers for `name` now (called from its own thread): it takes
        over from the engine that stood in, which lets go once the requests it already took are answered."""
        spec = self.specs.get(name)
        with self._switch_lock:
            pending = self.preferred.pop(name, None)
            stand_in = self.serving.get(name)
            if pending is not None:
                self.serving[name], self.choices[name] = pending
        if pending is not None and stand_in is not None:
            threading.Timer(SWITCH_GRACE_SECONDS, stand_in.remove, args=(name,)).start()
        if spec is not None:
            self._note(spec, engine_progress=None, go_live=True)
            log.info("serving %s on %s", name, self.serving.get(name) and self.serving[name].name)
        connections.close_all()  # the engine thread's own connection

    def _engine_failed(self, name: str, reason: str) -> None:
        """An engine gave up on `name`: the next sync serves it with the next engine (never a failed deployment
        while one is left)."""
        spec = self.specs.get(name)
        with self._switch_lock:
            pending = self.preferred.pop(name, None)
        if pending is not None and spec is not None:  # the stand-in goes on answering, now for good
            engine, stand_in = pending[0], self.serving.get(name)
            self.failures.setdefault(spec["key"], {})[engine.name] = reason
            self.choices[name] = Choice(stand_in.name, f"its {engine.label} server failed",
                                        f"{engine.label} could not serve it, so {stand_in.label} does: {reason}"[:2000])
            self._note(spec, engine_progress=None)
            connections.close_all()
            return
        engine = self.serving.get(name)
        log.warning("%s failed for %s: %s; passing it to the next engine", engine.label if engine else "?", name,
                    reason)
        if spec is not None and engine is not None:
            self.failures.setdefault(spec["key"], {})[engine.name] = reason
            self.registered.pop(name, None)
            self.serving.pop(name, None)
        connections.close_all()

    def _unregister(self, name: str) -> None:
        self.registered.pop(name, None)
        pending = self.preferred.pop(name, None)
        if pending is not None:
            pending[0].remove(name)
        engine = self.serving.pop(name, None)
        if engine is not None:
            engine.remove(name)
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

    def engine_for(self, name: str):
        """The engine that answers for `name` now, and the engines ahead of it in the list."""
        engine = self.serving.get(name)
        if engine is None:
            return None, []
        return engine, self.engines[: self.engines.index(engine)]

    def models(self) -> list[dict]:
        return [{"engine": engine.name, **m} for engine in self.engines for m in engine.models()]


def _served_model(spec: dict, priority: float = 0.0) -> ServedModel:
    return ServedModel(name=spec["name"], kind=spec["kind"], model_dir=spec["model_dir"],
                       adapter_dir=spec["adapter_dir"], base_path=spec["base_path"], priority=priority)


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

    def log_message(self, fmt, *args):
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

    # --- routes -------------------------------------------------------------------------------------------------

    def do_GET(self):
        if self.path == "/health":
            return self._json(200, {"ok": True, "models": len(self.service.models())})
        if not self._authorised():
            return None
        if self.path == "/models":
            return self._json(200, {"models": self.service.models()})
        return self._error(404, f"No route {self.path}.", "not_found")

    def do_POST(self):
        if not self._authorised():
            return None
        endpoint = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS}.get(self.path)
        if endpoint is None:
            return self._error(404, f"No route {self.path}.", "not_found")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise TypeError("not an object")
        except (ValueError, TypeError):
            return self._error(400, "The body must be a JSON object.", "invalid_json")
        try:
            return self._generate(endpoint, body)
        except ClientGone:
            self.close_connection = True
            return None

    def _generate(self, endpoint: str, body: dict):
        name = str(body.get("model") or "")
        engine, ahead = self.service.engine_for(name) if self.service.ensure(name) else (None, [])
        if engine is None:
            return self._error(404, f"The model {name!r} does not exist or is not live.", "model_not_found",
                               param="model")
        choice = self.service.choices.get(name)
        self.service.usage.touch(name)
        try:
            engine.check_fields(body, choice.reason if choice else engine.label, ahead)
            reply = engine.answer(endpoint, name, body)
        except RequestError as exc:
            return self._json(exc.status, exc.payload())
        return self._write(reply)

    def _write(self, reply) -> None:
        """Writes an engine's reply: a whole body, or its stream chunk by chunk until it ends or the client goes."""
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            if reply.chunks is None:
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
                return
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for data in reply.chunks:
                self._chunk(data)
            self._chunk(b"")  # the zero-length chunk that ends the response
        finally:
            reply.close()  # a client that went away stops the generation behind the reply


def make_server(service: InferenceService, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"service": service, "token": deploy.internal_token()})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    return httpd

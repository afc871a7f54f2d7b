"""The inference server's two engines: the built-in one (finetune.serving) and vLLM (finetune.vllm_engine).

What lives here, so jobs/inference_server.py only calls in:
- the vLLM settings (TUNEDECK_VLLM_*) turned into finetune.vllm_engine.EngineSettings;
- notes on a deployment (details["engine"], ...) saying which engine serves it and why, its loading progress
  and any fallback warning; the page and the REST API show them;
- each engine's refusal of the OpenAI fields it cannot honour (jobs.openai_fields,
  finetune.serving.BUILTIN_FIELDS): a 400 naming the field and saying what would serve it;
- relaying a request to a deployment's vLLM server, the stream passed through byte for byte.
"""
from __future__ import annotations

import http.client
import json
import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import openai_fields
from .models import Deployment

log = logging.getLogger("tunedeck.inference")

# Why a deployment is on the built-in server, where vLLM would serve it: choose_engine's reason when vLLM's
# interpreter is missing (finetune.vllm_engine), and jobs.inference_server's two.
VLLM_MISSING = "vLLM is not available"
VLLM_OFF = "vLLM is switched off for this inference server"
VLLM_FAILED = "its vLLM server failed"


def engine_settings(device: str = "auto", max_adapters: int = 8):
    from finetune.vllm_engine import EngineSettings

    gpus = _gpus() if device in ("auto", "cuda") else []
    return EngineSettings(
        python=settings.TUNEDECK_VLLM_PYTHON,
        log_dir=settings.DATA_DIR / "logs",
        device="cuda" if gpus else "cpu",
        gpu=gpus[0] if gpus else {},
        kv_cache_gb=settings.TUNEDECK_VLLM_KV_CACHE_GB,
        max_model_len=settings.TUNEDECK_VLLM_MAX_MODEL_LEN,
        max_loras=max(max_adapters, settings.TUNEDECK_VLLM_MAX_LORAS),
        max_adapters=max_adapters,
        max_lora_rank=settings.TUNEDECK_VLLM_MAX_LORA_RANK,
        startup_timeout=settings.TUNEDECK_VLLM_STARTUP_SECONDS,
        dtype=settings.TUNEDECK_VLLM_DTYPE,
        cpu_threads=settings.TUNEDECK_VLLM_CPU_THREADS,
    )


def _gpus() -> list[dict]:
    from autotune.probe import probe_gpus

    return probe_gpus()


def refused_parameter(body: dict) -> str | None:
    """The first field of `body` the built-in engine would have to ignore (finetune.serving.BUILTIN_FIELDS:
    one it does not know, or a value it cannot honour), or None."""
    from finetune.serving import BUILTIN_FIELDS

    for key, value in body.items():
        field = BUILTIN_FIELDS.get(key)
        if field is None or not (field.honoured or field.accepts(value, body)):
            return key
    return None


def builtin_params(body: dict) -> dict:
    """The keyword arguments of ModelServer.chat/complete: the sampling fields sent, and a chat's tools."""
    from finetune.serving import SAMPLING_FIELDS

    return {key: body[key] for key in (*SAMPLING_FIELDS, "tools") if body.get(key) is not None}


def refusal_message(key: str, reason: str) -> str:
    """Why the built-in server, serving a deployment because of `reason`, refuses `key`; what would serve it."""
    refused = f"'{key}' is not supported by the built-in server that serves this deployment ({reason})."
    vllm = openai_fields.VLLM_FIELDS.get(key)
    if vllm is None or not vllm.passed:
        why = f": {vllm.refused}" if vllm else ""
        return f"{refused} vLLM does not take it either{why}. Send the request without it."
    if reason == VLLM_MISSING:
        return (f"{refused} vLLM serves it and could serve this deployment, but vLLM's environment is not "
                "installed on this server: run scripts/setup-vllm.sh (or point TUNEDECK_VLLM_PYTHON at it), "
                "then restart the inference server. Or send the request without it.")
    if reason == VLLM_OFF:
        return (f"{refused} vLLM serves it, but this inference server runs with --no-vllm. Send the request "
                "without it.")
    if reason == VLLM_FAILED:
        return (f"{refused} vLLM serves it, but this deployment's vLLM server failed (its engine warning says "
                "why). Send the request without it.")
    return f"{refused} vLLM serves it, but cannot serve this deployment. Send the request without it."


# ---------------------------------------------------------------- notes on the deployment


def note(deployment_id: int, revision: int, *, go_live: bool = False, **fields) -> bool:
    """Merges `fields` into the deployment's details (if it is still at `revision`) and marks it updated, so a
    slow vLLM start is not taken for a missing inference server."""
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().filter(pk=deployment_id, revision=revision).first()
        if deployment is None:
            return False
        details = dict(deployment.details)
        for key, value in fields.items():
            if value is None:
                details.pop(key, None)
            else:
                details[key] = value
        deployment.details = details
        deployment.updated_at = timezone.now()
        # Live and its engine note in one write: a deploy task rewriting the row in between cannot split them.
        if go_live and deployment.status == Deployment.Status.LOADING:
            deployment.status = Deployment.Status.LIVE
        deployment.save(update_fields=["details", "updated_at", "status"])
    return True


# ---------------------------------------------------------------- relaying to vLLM


def relay(handler, route, path: str, body: dict) -> None:
    """Sends `body` to the vLLM server in `route` and writes its answer to `handler` (a BaseHTTPRequestHandler)
    unchanged: status, content type, and a stream chunk by chunk. A field vLLM cannot honour is refused first
    (400, naming it), and its removed guided_* fields go as the structured_outputs it reads now."""
    refused = openai_fields.vllm_refusal(body)
    if refused:
        key, why = refused
        return handler._error(400, f"'{key}' is not supported by vLLM, which serves this deployment: {why}. Send "
                              "the request without it.", "unsupported_parameter", param=key)
    payload = json.dumps({**openai_fields.for_vllm(body), "model": route.model}).encode()
    host, port = route.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    try:
        connection.request("POST", path, body=payload, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {route.api_key}"})
        upstream = connection.getresponse()
        content_type = upstream.getheader("Content-Type", "application/json")
        handler.send_response(upstream.status)
        handler.send_header("Content-Type", content_type)
        if not content_type.startswith("text/event-stream"):
            data = upstream.read()
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            while data := upstream.read1(65536):
                handler._chunk(data)
        except (OSError, http.client.HTTPException) as exc:  # vLLM died mid-answer: say so in the stream
            handler._event({"error": {"message": f"The vLLM server stopped mid-answer: {exc}",
                                      "type": "service_unavailable", "param": None, "code": "model_loading"}})
        handler._chunk(b"")
    finally:
        connection.close()  # a client that went away (ClientGone) closes vLLM's request too: it stops generating

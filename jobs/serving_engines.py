"""The inference server's two engines: the built-in one (finetune.serving) and vLLM (finetune.vllm_engine).

What lives here, so jobs/inference_server.py only calls in:
- the vLLM settings (TUNEDECK_VLLM_*) turned into finetune.vllm_engine.EngineSettings;
- notes on a deployment (details["engine"], ...) saying which engine serves it and why, its loading progress
  and any fallback warning; the page and the REST API show them;
- the OpenAI parameters each engine can honour: the built-in server refuses the others with a 400 naming them;
- relaying a request to a deployment's vLLM server, the stream passed through byte for byte.
"""
from __future__ import annotations

import http.client
import json
import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .models import Deployment

log = logging.getLogger("tunedeck.inference")

# OpenAI request fields that change the answer and that the built-in server cannot honour, with the value that
# means "not used" (sent that way, they are accepted).
BUILTIN_UNSUPPORTED = {
    "n": 1,
    "logprobs": False,
    "top_logprobs": None,
    "response_format": None,
    "tools": None,
    "tool_choice": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "echo": False,
    "best_of": None,
    "suffix": None,
}


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
    """The first field the built-in server would have to ignore, or None."""
    for key, neutral in BUILTIN_UNSUPPORTED.items():
        value = body.get(key)
        if value is None or value == neutral or (key == "response_format" and value == {"type": "text"}):
            continue
        if key in ("tools", "logit_bias") and not value:
            continue
        return key
    return None


def refusal_message(key: str, reason: str) -> str:
    return (f"'{key}' is not supported by the built-in server that serves this deployment ({reason}). Send the "
            "request without it, or deploy a method that vLLM serves.")


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
    unchanged: status, content type, and a stream chunk by chunk."""
    payload = json.dumps({**body, "model": route.model}).encode()
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

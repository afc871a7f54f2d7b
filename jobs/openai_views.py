"""The public OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

Authenticated with the user's API token (Authorization: Bearer ...); `model` is a deployment name, and only the
user's own live deployments exist for them. The web process validates the request, then proxies it to the
inference server (settings.TUNEDECK_INFERENCE_URL), streaming the server-sent events through unchanged. It
never imports torch. Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import json
import logging

import requests
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions

from .api.auth import BearerTokenAuthentication
from .deploy import internal_token
from .models import Deployment, ObjectNotFound

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 8192
ROLES = {"system", "user", "assistant", "developer", "tool"}


class OpenAIError(Exception):
    def __init__(self, status, message, code, err_type="invalid_request_error", param=None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, err_type, param

    def response(self):
        return error_response(self.status, self.message, self.code, self.type, self.param)


def error_response(status, message, code, err_type="invalid_request_error", param=None):
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    response = JsonResponse(body, status=status)
    if status == 401:
        response["WWW-Authenticate"] = "Bearer"
    return response


def _user(request):
    try:
        found = BearerTokenAuthentication().authenticate(request)
    except exceptions.AuthenticationFailed as exc:
        raise OpenAIError(401, f"Incorrect API key provided. {exc.detail}", "invalid_api_key",
                          "authentication_error") from None
    if found is None:
        raise OpenAIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <token>' (make "
                          "one on the API tokens page).", "missing_api_key", "authentication_error")
    return found[0]


def live_deployments(user):
    return Deployment.objects.owned_by(user).filter(status=Deployment.Status.LIVE).select_related("version__line")


def _deployment(user, name) -> Deployment:
    try:
        return live_deployments(user).get_or_404(name=name)
    except ObjectNotFound:
        raise OpenAIError(404, f"The model '{name}' does not exist or is not live. GET /v1/models lists yours.",
                          "model_not_found", param="model") from None


def _openai_view(methods):
    def wrap(view):
        @csrf_exempt
        def wrapped(request, *args, **kwargs):
            if request.method not in methods:
                return error_response(405, f"Use {' or '.join(methods)} here.", "method_not_allowed")
            try:
                return view(request, *args, **kwargs)
            except OpenAIError as exc:
                return exc.response()

        wrapped.__name__ = view.__name__
        wrapped.__doc__ = view.__doc__
        return wrapped

    return wrap


def _model_entry(deployment) -> dict:
    return {
        "id": deployment.name,
        "object": "model",
        "created": int(deployment.created_at.timestamp()),
        "owned_by": deployment.owner.get_username(),
    }


@_openai_view(["GET"])
def models(request):
    user = _user(request)
    deployments = live_deployments(user).select_related("owner").order_by("name")
    return JsonResponse({"object": "list", "data": [_model_entry(d) for d in deployments]})


@_openai_view(["GET"])
def model_detail(request, name):
    user = _user(request)
    return JsonResponse(_model_entry(_deployment(user, name)))


@_openai_view(["POST"])
def chat_completions(request):
    user = _user(request)
    body = _body(request)
    payload = _common(body)
    payload["messages"] = clean_messages(body.get("messages"))
    return proxy("/v1/chat/completions", _deployment(user, payload["model"]).name, payload)


@_openai_view(["POST"])
def completions(request):
    user = _user(request)
    body = _body(request)
    payload = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise OpenAIError(400, "Send one prompt string per request (a list of one string is accepted).",
                              "invalid_prompt", param="prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise OpenAIError(400, "'prompt' is required and must be a string.", "invalid_prompt", param="prompt")
    payload["prompt"] = prompt
    return proxy("/v1/completions", _deployment(user, payload["model"]).name, payload)


# ---------------------------------------------------------------- validation


def _body(request) -> dict:
    try:
        raw = request.body
    except RequestDataTooBig:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE // 2**20
        raise OpenAIError(413, f"The request body is larger than the {limit} MiB this server accepts.",
                          "request_too_large") from None
    try:
        body = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError):
        raise OpenAIError(400, "We could not parse the JSON body of your request.", "invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", "invalid_json")
    return body


def _number(body, key, low, high, *, integer=False, low_open=False):
    value = body.get(key)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise OpenAIError(400, f"'{key}' must be {'an integer' if integer else 'a number'}.", "invalid_value",
                          param=key)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bound = f"greater than {low}" if low_open else f"at least {low}"
        raise OpenAIError(400, f"'{key}' must be {bound} and at most {high}.", "invalid_value", param=key)
    return value


def _common(body: dict) -> dict:
    """The fields both endpoints share, checked; fields that change nothing here (user, metadata) are dropped."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise OpenAIError(400, "'model' is required: the name of one of your live deployments.", "invalid_model",
                          param="model")
    payload = {"model": model.strip(), **_engine_options(body)}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        payload["max_tokens"] = _number({"max_tokens": max_tokens}, "max_tokens", 1, MAX_TOKENS_LIMIT, integer=True)
    for key, low, high, low_open, integer in (
        ("temperature", 0, 2, False, False),
        ("top_p", 0, 1, True, False),
        ("seed", -(2**63), 2**63 - 1, False, True),
    ):
        value = _number(body, key, low, high, integer=integer, low_open=low_open)
        if value is not None:
            payload[key] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
            raise OpenAIError(400, "'stop' must be a string or a list of up to 4 strings.", "invalid_value",
                              param="stop")
        payload["stop"] = stops
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError(400, "'stream' must be true or false.", "invalid_value", param="stream")
    payload["stream"] = stream
    options = body.get("stream_options")
    if isinstance(options, dict) and stream:
        payload["stream_options"] = {"include_usage": bool(options.get("include_usage"))}
    return payload


MAX_CHOICES = 16


def _engine_options(body: dict) -> dict:
    """The OpenAI fields vLLM honours, checked for shape and passed on; the inference server refuses (400) the ones
    the deployment's engine cannot honour, so none is ever silently ignored."""
    options = {}
    for key, low, high, integer in (("n", 1, MAX_CHOICES, True), ("top_logprobs", 0, 20, True),
                                    ("presence_penalty", -2, 2, False), ("frequency_penalty", -2, 2, False)):
        value = _number(body, key, low, high, integer=integer)
        if value is not None:
            options[key] = value
    logprobs = body.get("logprobs")
    if logprobs is not None:
        # chat: true/false; completions: how many alternatives per token (0-20)
        if not isinstance(logprobs, bool):
            logprobs = _number(body, "logprobs", 0, 20, integer=True)
        options["logprobs"] = logprobs
    for key, kind, what in (("response_format", dict, "an object such as {\"type\": \"json_object\"}"),
                            ("tools", list, "a list of tool definitions"),
                            ("tool_choice", (str, dict), "'none', 'auto', 'required' or a tool object"),
                            ("logit_bias", dict, "an object of token id -> bias")):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, kind):
            raise OpenAIError(400, f"'{key}' must be {what}.", "invalid_value", param=key)
        options[key] = value
    if isinstance(options.get("response_format"), dict) and options["response_format"].get("type") not in (
            "text", "json_object", "json_schema"):
        raise OpenAIError(400, "'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
                          "invalid_value", param="response_format")
    for key in ("echo", "parallel_tool_calls"):
        if isinstance(body.get(key), bool):
            options[key] = body[key]
    return options


def clean_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "'messages' must be a non-empty list of {role, content} objects.",
                          "invalid_messages", param="messages")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise OpenAIError(400, f"messages[{i}] must be an object with a role ({', '.join(sorted(ROLES))}).",
                              "invalid_messages", param=f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise OpenAIError(400, f"messages[{i}].content: only text parts are supported.",
                                  "invalid_messages", param=f"messages[{i}].content")
            content = "".join(str(p.get("text", "")) for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise OpenAIError(400, f"messages[{i}].content must be a string or a list of text parts.",
                              "invalid_messages", param=f"messages[{i}].content")
        role = "system" if message["role"] == "developer" else message["role"]
        entry = {"role": role, "content": content}
        # Tool-calling turns keep their links (the engine's chat template renders them).
        for key in ("tool_calls", "tool_call_id", "name"):
            if message.get(key) is not None:
                entry[key] = message[key]
        cleaned.append(entry)
    return cleaned


# ---------------------------------------------------------------- the proxy


def inference_url(path: str) -> str:
    return settings.TUNEDECK_INFERENCE_URL.rstrip("/") + path


def proxy(path: str, deployment_name: str, payload: dict):
    """Forwards a validated request to the inference server; streams pass through chunk by chunk."""
    payload = {**payload, "model": deployment_name}
    stream = payload.get("stream", False)
    try:
        upstream = requests.post(
            inference_url(path),
            json=payload,
            headers={"X-Tunedeck-Internal": internal_token()},
            stream=stream,
            timeout=(3, 600),
        )
    except requests.ConnectionError:
        log.warning("inference server unreachable at %s", settings.TUNEDECK_INFERENCE_URL)
        return error_response(
            503,
            "The inference server is not running, so no model can answer right now. Start it with "
            "`python manage.py serve_inference` (scripts/run.sh does) and try again.",
            "inference_unavailable", "service_unavailable",
        )
    except requests.Timeout:
        return error_response(504, "The inference server did not answer in time.", "inference_timeout",
                              "service_unavailable")
    content_type = upstream.headers.get("Content-Type", "application/json")
    if not stream or upstream.status_code != 200 or not content_type.startswith("text/event-stream"):
        return HttpResponse(upstream.content, status=upstream.status_code, content_type=content_type)

    def relay():
        try:
            for chunk in upstream.iter_content(chunk_size=None):
                if chunk:
                    yield chunk
        except requests.RequestException as exc:
            error = {"error": {"message": f"The inference server stopped mid-answer: {exc}",
                               "type": "service_unavailable", "param": None, "code": "inference_unavailable"}}
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            upstream.close()  # a client that went away stops the generation too

    response = StreamingHttpResponse(relay(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response

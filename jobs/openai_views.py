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

from . import openai_fields
from .api.auth import BearerTokenAuthentication
from .deploy import internal_token
from .models import Deployment, ObjectNotFound

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 8192
MAX_CHOICES = 16
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
    payload = request_fields(_body(request), openai_fields.CHAT)
    payload["messages"] = clean_messages(payload.get("messages"))
    return proxy("/v1/chat/completions", _deployment(user, payload["model"]).name, payload)


@_openai_view(["POST"])
def completions(request):
    user = _user(request)
    payload = request_fields(_body(request), openai_fields.COMPLETIONS)
    prompt = payload.get("prompt")
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


# Numbers checked here: (lowest, highest, integer, the lowest itself excluded). vLLM checks its other extras.
NUMBERS = {
    "max_tokens": (1, MAX_TOKENS_LIMIT, True, False),
    "temperature": (0, 2, False, False),
    "top_p": (0, 1, False, True),
    "seed": (-(2**63), 2**63 - 1, True, False),
    "n": (1, MAX_CHOICES, True, False),
    "best_of": (1, MAX_CHOICES, True, False),
    "top_logprobs": (0, 20, True, False),
    "presence_penalty": (-2, 2, False, False),
    "frequency_penalty": (-2, 2, False, False),
    "top_k": (-1, 2**31 - 1, True, False),
    "min_p": (0, 1, False, False),
    "repetition_penalty": (0, 10, False, True),
    "min_tokens": (0, MAX_TOKENS_LIMIT, True, False),
}
# Fields that must be true or false; the built-in engine compares them with the values that ask for nothing.
BOOLEANS = ("stream", "echo", "parallel_tool_calls", "ignore_eos", "use_beam_search", "include_stop_str_in_output",
            "skip_special_tokens", "add_generation_prompt", "continue_final_message")
OBJECTS = (("response_format", dict, "an object such as {\"type\": \"json_object\"}"),
           ("tools", list, "a list of tool definitions"),
           ("tool_choice", (str, dict), "'none', 'auto', 'required' or a tool object"),
           ("logit_bias", dict, "an object of token id -> bias"),
           ("structured_outputs", dict, "an object such as {\"regex\": \"[0-9]+\"}"))


def request_fields(body: dict, endpoint: str) -> dict:
    """What the inference server gets: an unknown field refused by name, OpenAI's bookkeeping fields and nulls
    ("not given") left out, the fields checked here checked; the rest pass as sent, for the engine serving the
    deployment to honour or refuse by name (jobs.openai_fields lists every field and what becomes of it)."""
    unknown = openai_fields.unknown_field(body, endpoint)
    if unknown is not None:
        what = "chat completions" if endpoint == openai_fields.CHAT else "completions"
        raise OpenAIError(400, f"Unknown parameter: '{unknown}' is not a field of {what} requests this server "
                          "knows, so it would have no effect. Send the request without it.", "unknown_parameter",
                          param=unknown)
    dropped = openai_fields.METADATA
    payload = {key: value for key, value in body.items() if value is not None and key not in dropped}
    model = payload.get("model")
    if not isinstance(model, str) or not model.strip():
        raise OpenAIError(400, "'model' is required: the name of one of your live deployments.", "invalid_model",
                          param="model")
    payload["model"] = model.strip()
    if "max_completion_tokens" in payload:  # OpenAI's newer name; both engines take max_tokens
        payload["max_tokens"] = payload.pop("max_completion_tokens")
    for key, (low, high, integer, low_open) in NUMBERS.items():
        _number(payload, key, low, high, integer=integer, low_open=low_open)
    for key in BOOLEANS:
        if key in payload and not isinstance(payload[key], bool):
            raise OpenAIError(400, f"'{key}' must be true or false.", "invalid_value", param=key)
    payload["stream"] = payload.get("stream", False)
    _check_logprobs(payload, endpoint)
    _check_objects(payload)
    _check_stop(payload)
    _check_stream_options(payload)
    return payload


def _check_logprobs(payload: dict, endpoint: str) -> None:
    if "logprobs" not in payload:
        return
    if endpoint == openai_fields.CHAT:  # chat: whether to return them
        if not isinstance(payload["logprobs"], bool):
            raise OpenAIError(400, "'logprobs' must be true or false.", "invalid_value", param="logprobs")
    else:  # completions: how many alternatives per token
        _number(payload, "logprobs", 0, 20, integer=True)


def _check_objects(payload: dict) -> None:
    for key, kind, what in OBJECTS:
        if key in payload and not isinstance(payload[key], kind):
            raise OpenAIError(400, f"'{key}' must be {what}.", "invalid_value", param=key)
    if payload.get("tools") == []:
        raise OpenAIError(400, "'tools' must not be empty: send at least one tool, or leave it out.",
                          "invalid_value", param="tools")
    if "response_format" in payload and payload["response_format"].get("type") not in (
            "text", "json_object", "json_schema"):
        raise OpenAIError(400, "'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
                          "invalid_value", param="response_format")
    for token, bias in payload.get("logit_bias", {}).items():
        if not str(token).isdigit() or isinstance(bias, bool) or not isinstance(bias, (int, float)) or not (
                -100 <= bias <= 100):
            raise OpenAIError(400, "'logit_bias' maps token ids (\"42\") to biases from -100 to 100.",
                              "invalid_value", param="logit_bias")


def _check_stop(payload: dict) -> None:
    stop = payload.get("stop")
    if stop is None:
        return
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise OpenAIError(400, "'stop' must be a string or a list of up to 4 strings.", "invalid_value",
                          param="stop")
    payload["stop"] = stops


def _check_stream_options(payload: dict) -> None:
    options = payload.get("stream_options")
    if options is None:
        return
    if not payload["stream"]:
        raise OpenAIError(400, "'stream_options' is only allowed with \"stream\": true.", "invalid_value",
                          param="stream_options")
    if not isinstance(options, dict):
        raise OpenAIError(400, "'stream_options' must be an object such as {\"include_usage\": true}.",
                          "invalid_value", param="stream_options")
    for key, value in options.items():
        if key != "include_usage":  # the one option both engines honour
            raise OpenAIError(400, f"'stream_options.{key}' is not supported: only include_usage is.",
                              "unsupported_parameter", param=f"stream_options.{key}")
        if not isinstance(value, bool):
            raise OpenAIError(400, "'stream_options.include_usage' must be true or false.", "invalid_value",
                              param="stream_options.include_usage")


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

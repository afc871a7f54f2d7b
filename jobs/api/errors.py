"""One error format for the whole API: {"error": {"code", "message", "details"}}.

DRF exceptions, Django's Http404/PermissionDenied, the services' InputError and any unexpected exception inside an
API view all come out in it; `not_found` answers the same way for /api/ paths that match no route."""
import logging

from django.core.exceptions import PermissionDenied
from django.http import Http404, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

from finetune.errors import TunedeckError

from ..models import ObjectNotFound
from ..services import InputError

log = logging.getLogger(__name__)


class ErrorBodySerializer(serializers.Serializer):
    code = serializers.CharField(help_text="machine-readable, e.g. invalid, not_found, not_authenticated")
    message = serializers.CharField(help_text="one line a person can act on")
    details = serializers.JSONField(allow_null=True, help_text="field errors or other context; may be null")


class ErrorSerializer(serializers.Serializer):
    error = ErrorBodySerializer()


def error_body(code, message, details=None) -> dict:
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(code, message, http_status, details=None, headers=None):
    return Response(error_body(code, message, details), status=http_status, headers=headers)


def _first_message(detail):
    if isinstance(detail, dict):
        for key, value in detail.items():
            inner = _first_message(value)
            return inner if key in ("non_field_errors", "detail") else f"{key}: {inner}"
        return "Invalid input."
    if isinstance(detail, list):
        return _first_message(detail[0]) if detail else "Invalid input."
    return str(detail)


def _code_of(exc) -> str:
    try:
        codes = exc.get_codes()
    except AttributeError:
        codes = None
    if isinstance(codes, str):
        return codes
    return getattr(exc, "default_code", "error")


def exception_handler(exc, context):
    if isinstance(exc, InputError):
        details = {"field": exc.field} if exc.field else None
        set_rollback()
        code = {"conflict": status.HTTP_409_CONFLICT, "forbidden": status.HTTP_403_FORBIDDEN}.get(
            exc.code, status.HTTP_400_BAD_REQUEST)
        return error_response(exc.code, str(exc), code, details)
    if isinstance(exc, TunedeckError):
        set_rollback()
        return error_response("invalid", str(exc), status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, ObjectNotFound):
        exc = exceptions.NotFound(str(exc))
    elif isinstance(exc, Http404):
        request = context.get("request")
        where = f" at {request.path}" if request is not None else ""
        exc = exceptions.NotFound(f"Not found: no such object{where} for this user.")
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        # A bug, not bad input: log it with its traceback and answer in the API's format, not Django's HTML page.
        view = context.get("view")
        log.exception("unhandled error in %s", type(view).__name__ if view else "API view", exc_info=exc)
        set_rollback()
        return error_response("server_error", "The server hit an unexpected error; it has been logged.",
                              status.HTTP_500_INTERNAL_SERVER_ERROR)
    if isinstance(exc, exceptions.ValidationError):
        code, message, details = "invalid", _first_message(exc.detail), exc.detail
    elif isinstance(exc, exceptions.Throttled):
        code, message, details = "throttled", _first_message(exc.detail), {"retry_after": exc.wait}
    else:
        code = _code_of(exc)
        message = _first_message(exc.detail) if hasattr(exc, "detail") else str(exc)
        details = None
    response.data = error_body(code, message, details)
    return response


@csrf_exempt  # no route here to protect; a POST with a session cookie must get this JSON 404, not an HTML 403
def not_found(request, *args, **kwargs):
    """For /api/ paths that match no route: the API's 404, not Django's HTML page."""
    return JsonResponse(error_body("not_found", f"No API endpoint at {request.path}."), status=404)

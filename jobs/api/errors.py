"""One error format for the whole API: {"error": {"code", "message", "details"}}."""
from django.core.exceptions import PermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from finetune.errors import TunedeckError

from ..services import InputError


def error_response(code, message, http_status, details=None):
    return Response({"error": {"code": code, "message": message, "details": details}}, status=http_status)


def _first_message(detail):
    if isinstance(detail, dict):
        for key, value in detail.items():
            inner = _first_message(value)
            return inner if key == "non_field_errors" else f"{key}: {inner}"
    if isinstance(detail, list) and detail:
        return _first_message(detail[0])
    return str(detail)


def exception_handler(exc, context):
    if isinstance(exc, InputError):
        details = {"field": exc.field} if exc.field else None
        return error_response(exc.code, str(exc), status.HTTP_400_BAD_REQUEST, details)
    if isinstance(exc, TunedeckError):
        return error_response("invalid", str(exc), status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        code, message, details = "invalid", _first_message(exc.detail), exc.detail
    else:
        code = getattr(exc, "default_code", "error")
        message = _first_message(exc.detail) if hasattr(exc, "detail") else str(exc)
        details = None
    response.data = {"error": {"code": code, "message": message, "details": details}}
    return response

"""Reading what forms and the API send: forms send JSON text where the API sends the object itself."""
from __future__ import annotations

import json

from ..errors import InputError


def json_value(value, field: str):
    """Forms send JSON text; the API sends the object itself."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise InputError(f"{field} is not valid JSON: {exc.msg}.", field=field) from exc

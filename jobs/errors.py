"""Errors the services raise for a person to read. Apart from jobs/services so that every service module
(jobs/base_models.py, jobs/limits.py, ...) can raise them without importing the package."""
from finetune.errors import TunedeckError


class InputError(TunedeckError):
    """Bad input from a user: shown to them, with the field it concerns. code "conflict" answers 409 in the API,
    "forbidden" 403, anything else 400."""

    def __init__(self, message, field=None, code="invalid"):
        super().__init__(message)
        self.field = field
        self.code = code


class NotAllowed(InputError):
    """The user may not do this at all. The message never depends on the input, so a refusal tells nothing
    about what the input named (a folder on the server, another user's object)."""

    def __init__(self, message):
        super().__init__(message, code="forbidden")

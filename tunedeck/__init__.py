"""The Django project. Named `tunedeck`, not `platform`: a top-level `platform` package would hide Python's
standard `platform` module, and torch, celery and django fail at import when that happens."""
from .celery import app as celery_app

__all__ = ["celery_app"]

"""The Django project. Named `tunedeck`, not `platform`: a top-level `platform` package would hide Python's
standard `platform` module, and torch, celery and django fail at import when that happens.

Importing this package loads nothing: the `tunedeck` command-line client lives here and must start without Django
or Celery. The Celery app is tunedeck/celery.py (workers: `celery -A tunedeck.celery worker`); Django creates it
in jobs.apps.JobsConfig.ready()."""

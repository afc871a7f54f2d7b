from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        # The Celery app is made here rather than in tunedeck/__init__.py, so that importing the `tunedeck`
        # package (its command-line client) loads neither Django nor Celery; shared_task and the sending in
        # jobs/queue.py find it as the current app.
        import tunedeck.celery  # noqa: F401

        from . import worker_signals  # noqa: F401 - connects the worker's signal handlers

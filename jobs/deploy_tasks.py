"""The thin Celery task behind a deployment; jobs/tasks.py re-exports it so the worker finds it.

Named jobs.tasks.deploy_version so CELERY_TASK_ROUTES sends it to the gpu queue, where merges run.
"""
from celery import shared_task
from django.db import close_old_connections

__all__ = ["deploy_version"]


@shared_task(name="jobs.tasks.deploy_version", acks_late=True, ignore_result=True)
def deploy_version(deployment_id: int, revision: int):
    from .deploy import run_deploy

    close_old_connections()
    return run_deploy(deployment_id, revision)

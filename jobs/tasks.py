"""Every Celery task of Tunedeck. Each hands its ids to a plain service function; the database row, not Celery,
holds the status. Tasks are sent by name through jobs/queue.py; which queue each goes to is set in one place,
settings.CELERY_TASK_ROUTES (docs/internals.md has the map)."""
import logging
import socket

from celery import shared_task
from django.db import close_old_connections

from .deploy_worker import run_deploy
from .models import Dataset
from .runner import run_training
from .services.dataset_processing import process_dataset
from .services.evaluation_runs import run_evaluation
from .services.hub_download import pull_base_model
from .services.search_stage import run_helper_trials

log = logging.getLogger(__name__)


@shared_task(acks_late=True, ignore_result=True)
def process_dataset_task(dataset_id: int):
    close_old_connections()
    try:
        process_dataset(dataset_id)
    except Dataset.DoesNotExist:
        # A message for a dataset deleted meanwhile (or left in the broker from another database): nothing to do.
        log.info("dataset %s no longer exists; skipped", dataset_id)


@shared_task(bind=True, acks_late=True, ignore_result=True)
def train_job(self, job_id: int):
    close_old_connections()
    run_training(job_id, self.request.hostname or socket.gethostname())


# issue 20 (search): a helper running trials of a job's search on another training worker (services/search_stage.py)
@shared_task(bind=True, acks_late=True, ignore_result=True)
def search_trials_task(self, job_id: int):
    close_old_connections()
    run_helper_trials(job_id, self.request.hostname or socket.gethostname())


# issue 36: this worker trains one node of a job that spans several workers (jobs/node_join.py)
@shared_task(bind=True, acks_late=True, ignore_result=True)
def join_job_task(self, job_id: int, node_rank: int):
    from .node_join import run_join

    close_old_connections()
    run_join(job_id, node_rank, self.request.hostname or socket.gethostname())


@shared_task(acks_late=True, ignore_result=True)
def deploy_version(deployment_id: int, revision: int):
    close_old_connections()
    return run_deploy(deployment_id, revision)


@shared_task(acks_late=True, ignore_result=True)
def evaluate_versions_task(version_ids: list[int], set_id: str):
    close_old_connections()
    run_evaluation(version_ids, set_id)


@shared_task(acks_late=True, ignore_result=True)
def evaluate_interactive(version_ids: list[int], set_id: str):
    """The same work for a few prompts a user waits for; settings route this name to the interactive queue."""
    close_old_connections()
    run_evaluation(version_ids, set_id)


# issue 34: a base model pulled from the Hugging Face Hub (jobs/hub_pulls.py sends it; the downloads queue)
@shared_task(acks_late=True, ignore_result=True)
def pull_base_model_task(model_id: int):
    close_old_connections()
    pull_base_model(model_id)

"""What the pages, the API and the command-line tools call: plain functions over the database rows.

Web side (the web process loads these):
    datasets.py            an upload stored as an immutable dataset version; retry, drop invalid rows, delete
    plans.py               overrides, methods, the training workers' inventory, make_plan
    training_jobs.py       a job queued with its plan, cancelled, retried
    inputs.py              what forms send as JSON text and the API as objects
    ../base_models.py      base models: registering a folder, the default one
Worker side (only Celery workers import these; tests/test_architecture.py holds the web process to that):
    dataset_processing.py  validating and splitting an upload under a renewed lease; recovering stuck ones
    worker_planning.py     a worker's inventory for its heartbeat; replanning a job for the worker that took it
    version_recording.py   a trained adapter moved into the store as the next version of its line
    evaluation_runs.py     running a queued evaluation of adapter versions (../evaluation.py queues it)
    search_stage.py        a job's search trials on this and the helper workers, the winner into the plan

The names below are the web side's public API (`from jobs import services; services.create_job(...)`); import the
worker side from its own module.
"""
from ..base_models import (
    ADMINS_ONLY,
    base_model_fields,
    configured_model_roots,
    default_base_model,
    may_register_folders,
    register_base_model,
)
from ..errors import InputError, NotAllowed
from .datasets import (
    SCHEMAS,
    create_dataset,
    dataset_name_from_file,
    delete_dataset,
    reprocess_dataset_dropping_invalid,
    retry_dataset,
)
from .plans import clean_method, clean_overrides, make_plan
from .training_jobs import create_job, request_cancel, retry_job

__all__ = [
    "ADMINS_ONLY", "SCHEMAS", "InputError", "NotAllowed",
    "base_model_fields", "clean_method", "clean_overrides", "configured_model_roots", "create_dataset", "create_job",
    "dataset_name_from_file", "default_base_model", "delete_dataset", "make_plan", "may_register_folders",
    "register_base_model", "reprocess_dataset_dropping_invalid", "request_cancel", "retry_dataset", "retry_job",
]

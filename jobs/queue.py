"""Sending work to the Celery workers. Tasks are sent by name, so this module imports no task (the web process
never loads jobs/tasks.py and its worker-side imports) and the queue each task goes to is decided in one place,
settings.CELERY_TASK_ROUTES. Callers send after their transaction commits (transaction.on_commit), so a worker
never looks for a row it cannot see yet."""
from celery import current_app

TRAIN = "jobs.tasks.train_job"
PROCESS_DATASET = "jobs.tasks.process_dataset_task"
DEPLOY = "jobs.tasks.deploy_version"
EVALUATE = "jobs.tasks.evaluate_versions_task"
SEARCH_TRIALS = "jobs.tasks.search_trials_task"  # issue 20
JOIN_JOB = "jobs.tasks.join_job_task"  # issue 36: a worker joining a job trained across several workers
EVALUATE_INTERACTIVE = "jobs.tasks.evaluate_interactive"  # routed to the "interactive" queue


def send(task_name: str, *args, queue: str | None = None) -> None:
    app = current_app
    if app.conf.task_always_eager:
        # Eager mode (CELERY_TASK_ALWAYS_EAGER=1, a debugging aid) runs the task in this process, where it must be
        # registered: load the task modules the worker would load.
        app.loader.import_default_modules()
    # A signature runs eagerly when that is configured; otherwise it publishes by name like send_task.
    app.signature(task_name, args=args).apply_async(**({"queue": queue} if queue else {}))


def dataset_queue(size_bytes: int) -> str:
    """The one routing decision not in CELERY_TASK_ROUTES, since it depends on the file: files over
    DATASET_LARGE_BYTES go to their own queue and worker, so a large upload never holds up small ones."""
    from django.conf import settings

    return settings.DATASET_LARGE_QUEUE if size_bytes > settings.DATASET_LARGE_BYTES else settings.DATASET_QUEUE


def send_dataset_processing(dataset_id: int, size_bytes: int = 0) -> None:
    send(PROCESS_DATASET, dataset_id, queue=dataset_queue(size_bytes))


def send_training(job_id: int) -> None:
    send(TRAIN, job_id)


def send_deploy(deployment_id: int, revision: int) -> None:
    send(DEPLOY, deployment_id, revision)


def send_evaluation(version_ids: list[int], set_id: str) -> None:
    send(EVALUATE, list(version_ids), set_id)


def send_search_trials(job_id: int) -> None:  # issue 20: a helper running trials of the job's search
    send(SEARCH_TRIALS, job_id)


def send_join(job_id: int, node_rank: int) -> None:  # issue 36: another worker trains this node of the job
    send(JOIN_JOB, job_id, node_rank)


def send_interactive_evaluation(version_ids: list[int], set_id: str) -> None:
    """A few prompts a user waits for: its own queue and worker, never behind a training run."""
    send(EVALUATE_INTERACTIVE, list(version_ids), set_id)

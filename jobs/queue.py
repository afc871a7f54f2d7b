"""Sending work to the Celery workers. Tasks are sent by name, so this module imports no task (the web process
never loads jobs/tasks.py and its worker-side imports) and the queue each task goes to is decided in one place,
settings.CELERY_TASK_ROUTES. Callers send after their transaction commits (transaction.on_commit), so a worker
never looks for a row it cannot see yet."""
from celery import current_app

TRAIN = "jobs.tasks.train_job"
PROCESS_DATASET = "jobs.tasks.process_dataset_task"
DEPLOY = "jobs.tasks.deploy_version"
EVALUATE = "jobs.tasks.evaluate_versions_task"
EVALUATE_INTERACTIVE = "jobs.tasks.evaluate_interactive"  # routed to the "interactive" queue


def send(task_name: str, *args) -> None:
    app = current_app
    if app.conf.task_always_eager:
        # Eager mode (CELERY_TASK_ALWAYS_EAGER=1, a debugging aid) runs the task in this process, where it must be
        # registered: load the task modules the worker would load.
        app.loader.import_default_modules()
    # A signature runs eagerly when that is configured; otherwise it publishes by name like send_task.
    app.signature(task_name, args=args).apply_async()


def send_dataset_processing(dataset_id: int) -> None:
    send(PROCESS_DATASET, dataset_id)


def send_training(job_id: int) -> None:
    send(TRAIN, job_id)


def send_deploy(deployment_id: int, revision: int) -> None:
    send(DEPLOY, deployment_id, revision)


def send_evaluation(version_ids: list[int], set_id: str) -> None:
    send(EVALUATE, list(version_ids), set_id)


def send_interactive_evaluation(version_ids: list[int], set_id: str) -> None:
    """A few prompts a user waits for: its own queue and worker, never behind a training run."""
    send(EVALUATE_INTERACTIVE, list(version_ids), set_id)

"""Worker side of a job's search stage (issue 20): the study in the project's database, trials mirrored into
SearchTrial rows with a heartbeat, helper tasks on the other training workers, stale trials failed, and the winner
written into the job's plan. Called by jobs/runner.py (run_search_stage, before the final training) and by
jobs.tasks.search_trials_task (run_helper_trials); the web process never imports this module. The budget and what
the pages show are jobs/search.py.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from urllib.parse import quote

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.utils import timezone

from autotune import search
from autotune.parallel import one_process_equivalent, spread_over_ranks

from .. import limits
from ..models import FineTuneJob, JobEvent, JobStatus, SearchTrial, Worker
from ..periodic import run_every
from ..search import search_pending

log = logging.getLogger(__name__)

WAIT_POLL_SECONDS = 2.0


DB_ERRORS = (OperationalError, InterfaceError)


def storage_url() -> str:
    """The Django database as an SQLAlchemy URL, for optuna's RDBStorage (the test database in tests)."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    if db["ENGINE"].endswith("postgresql"):
        user = quote(db.get("USER") or "", safe="")
        password = f":{quote(str(db['PASSWORD']), safe='')}" if db.get("PASSWORD") else ""
        host = db.get("HOST") or "localhost"
        port = f":{db['PORT']}" if db.get("PORT") else ""
        return f"postgresql+psycopg://{user}{password}@{host}{port}/{db['NAME']}"
    raise RuntimeError(f"search needs PostgreSQL or SQLite, not {db['ENGINE']}")


def open_job_study(job: FineTuneJob, metric: str):
    import optuna

    url = storage_url()
    engine = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine["connect_args"] = {"timeout": 30}
    storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
    budget = job.plan["search"]
    return search.open_study(storage, f"tunedeck-job-{job.pk}", metric, seed=int(job.plan.get("seed") or 42),
                             eval_every=int(budget["eval_every"]))


def job_setup(job: FineTuneJob) -> search.SearchSetup:
    budget = job.plan["search"]
    return search.SearchSetup(
        # issue 36: trials run in one process, at the global batch of the job's ranks
        plan=one_process_equivalent({k: v for k, v in job.plan.items() if k not in ("search",)}),
        model_config=job.base_model.config, base_model_path=job.base_model.path,
        train_file=job.dataset.train_path, eval_file=job.dataset.validation_path,
        work_dir=str(job.checkpoint_dir / "search"), trial_steps=int(budget["trial_steps"]),
        eval_every=int(budget["eval_every"]), trust_remote_code=job.base_model.trust_remote_code,
        fixed=fixed_params(job))


def fixed_params(job: FineTuneJob) -> dict:
    """What the user set is not searched: overrides of searched fields, and a method other than auto."""
    overrides = job.overrides or {}
    fixed = {name: overrides[name] for name in ("learning_rate", "rank", "micro_batch") if name in overrides}
    if job.method != "auto" or "method" in overrides:
        fixed["method"] = job.plan.get("method")
    if "alpha" in overrides and "rank" in overrides:
        fixed["alpha_ratio"] = float(overrides["alpha"]) / int(overrides["rank"])
    return fixed


class RowObserver(search.Observer):
    """Mirrors each trial into a SearchTrial row (and the job's event log), with a heartbeat while it runs."""

    def __init__(self, job: FineTuneJob, worker_name: str):
        self.job_id, self.worker = job.pk, worker_name
        self.beats: dict[int, threading.Event] = {}

    def _write(self, record: search.TrialRecord, **extra):
        SearchTrial.objects.update_or_create(
            job_id=self.job_id, number=record.number,
            defaults={"params": record.params, "state": record.state, "score": record.score,
                      "metric": record.metric, "curve": record.curve, "duration": record.duration,
                      "reason": record.reason, "worker": self.worker, "updated_at": timezone.now(), **extra})

    def started(self, record):
        self._write(record)
        stopped = self.beats[record.number] = threading.Event()
        touch = lambda n=record.number: SearchTrial.objects.filter(
            job_id=self.job_id, number=n, state=SearchTrial.State.RUNNING).update(updated_at=timezone.now())
        threading.Thread(target=run_every, daemon=True, args=(settings.WORKER_HEARTBEAT_SECONDS / 2, touch, stopped,
                         f"trial {record.number} heartbeat"), kwargs={"wait_first": True, "log": log}).start()

    def point(self, record):
        self._write(record)

    def finished(self, record):
        if record.number in self.beats:
            self.beats.pop(record.number).set()
        self._write(record)
        JobEvent.objects.create(job_id=self.job_id, kind="search_trial", message=trial_message(record),
                                data={"number": record.number, "state": record.state})


def trial_message(record: search.TrialRecord) -> str:
    params = ", ".join(f"{k} {search.format_value(v)}" for k, v in record.params.items())
    if record.state == search.STATE_COMPLETE:
        return f"Trial {record.number} ({params}): validation {record.metric} {record.score:.3g}."
    return f"Trial {record.number} ({params}) {record.state}: {record.reason or 'stopped'}."


def run_search_stage(job: FineTuneJob, should_stop, worker_name: str) -> FineTuneJob:
    """Runs the search (with helpers on other workers) and returns the job with the winner's plan."""
    if not search_pending(job):
        return job
    try:
        return _search(job, should_stop, worker_name)
    except DB_ERRORS:
        raise  # the runner leaves the job for requeue; the study resumes where it was
    except Exception as exc:
        log.exception("job %s: search failed", job.pk)
        plan = {**job.plan, "search_result": {"winner": None, "error": f"{type(exc).__name__}: {exc}"[:500]}}
        plan["reasons"] = [*plan.get("reasons", []), (f"Search failed ({type(exc).__name__}: {exc}); "
                                                      "training with the rules' settings.")]
        FineTuneJob.objects.filter(pk=job.pk).update(plan=plan)
        job.plan = plan
        JobEvent.objects.create(job=job, kind="search_failed", message=plan["reasons"][-1])
        return job


def _search(job: FineTuneJob, should_stop, worker_name: str) -> FineTuneJob:
    metric = search.choose_metric(job.dataset.validation_path)
    study = open_job_study(job, metric)
    JobEvent.objects.create(job=job, kind="search_started", message=job.plan["search"]["summary"])
    fail_stale_trials(job, study)
    send_helpers(job)
    budget = search.Budget.from_plan(job.plan["search"])
    search.run_trials(study, job_setup(job), budget, RowObserver(job, worker_name), should_stop)
    wait_for_other_trials(job, study, should_stop)
    if should_stop():
        return job
    return finish_search(job, study)


def run_helper_trials(job_id: int, worker_name: str) -> int:
    """A helper task's work: trials of a running job's study, until its budget is spent."""
    job = FineTuneJob.objects.select_related("base_model", "dataset").filter(pk=job_id).first()
    if job is None or job.status != JobStatus.RUNNING or not search_pending(job):
        return 0
    study = open_job_study(job, search.choose_metric(job.dataset.validation_path))

    checked = {"at": 0.0, "over": False}

    def job_over():  # asked between micro-batches: the database is read at most every few seconds
        if time.monotonic() - checked["at"] >= WAIT_POLL_SECONDS:
            checked["over"] = not FineTuneJob.objects.filter(pk=job_id, status=JobStatus.RUNNING,
                                                             cancel_requested=False).exists()
            checked["at"] = time.monotonic()
        return checked["over"]

    return search.run_trials(study, job_setup(job), search.Budget.from_plan(job.plan["search"]),
                             RowObserver(job, worker_name), job_over)


def send_helpers(job: FineTuneJob) -> int:
    """One helper task per other live worker that takes training work (none with a single worker), at most
    MAX_SEARCH_HELPERS of them: one job's search never takes every training worker."""
    from ..queue import send_search_trials

    now = timezone.now()
    others = [w for w in Worker.objects.exclude(hostname=job.worker)
              if w.is_alive(now) and "gpu" in (w.queues or "").split(",")]
    expected = int(job.plan["search"].get("expected_trials") or job.plan["search"].get("max_trials") or 0)
    helpers = limits.helper_workers(len(others), expected - 1)
    for _ in range(helpers):
        send_search_trials(job.pk)
    return helpers


def wait_for_other_trials(job: FineTuneJob, study, should_stop):
    """Until no trial of the study is running (the helpers' last trials), failing those of dead workers."""
    while not should_stop():
        fail_stale_trials(job, study)
        if not SearchTrial.objects.filter(job=job, state=SearchTrial.State.RUNNING).exists():
            return
        time.sleep(WAIT_POLL_SECONDS)


def fail_stale_trials(job: FineTuneJob, study) -> list[int]:
    """A trial whose row has not been touched for a lease period lost its worker: failed, and the study goes on."""
    import optuna

    stale = timezone.now() - timedelta(seconds=settings.JOB_LEASE_SECONDS)
    numbers = list(SearchTrial.objects.filter(job=job, state=SearchTrial.State.RUNNING, updated_at__lt=stale)
                   .values_list("number", flat=True))
    # Trials the study started that never got a row (killed between ask and the first write) count too.
    known = set(SearchTrial.objects.filter(job=job).values_list("number", flat=True))
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number in numbers:
        trial = trials.get(number)
        if trial is not None and trial.state == optuna.trial.TrialState.RUNNING:
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        SearchTrial.objects.filter(job=job, number=number, state=SearchTrial.State.RUNNING).update(
            state=SearchTrial.State.FAILED, reason="its worker stopped answering", updated_at=timezone.now())
    for number, trial in trials.items():
        if number not in known and trial.state == optuna.trial.TrialState.RUNNING and \
                trial.datetime_start and trial.datetime_start.timestamp() < stale.timestamp():
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    if numbers:
        JobEvent.objects.create(job=job, kind="search_trial",
                                message=f"Trial(s) {', '.join(map(str, numbers))} failed: their worker stopped "
                                        "answering; the search goes on.")
    return numbers


def finish_search(job: FineTuneJob, study) -> FineTuneJob:
    records = search.trial_records(study)
    rules = {k: v for k, v in job.plan.items() if k != "search"}
    final = search.apply_winner(one_process_equivalent(rules), records, job.base_model.config)
    final = spread_over_ranks(final, int(rules.get("gpus") or 1))  # issue 36: back onto the job's ranks
    if rules.get("parallel"):
        final["parallel"] = rules["parallel"]
    final["search"] = job.plan["search"]
    winner = final["search_result"].get("winner")
    SearchTrial.objects.filter(job=job).update(winner=False)
    if winner is not None:
        SearchTrial.objects.filter(job=job, number=winner).update(winner=True)
    FineTuneJob.objects.filter(pk=job.pk).update(plan=final)
    job.plan = final
    JobEvent.objects.create(job=job, kind="search_done", message=final["reasons"][0],
                            data=final["search_result"])
    return job

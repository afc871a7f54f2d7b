"""A worker that dies mid-trial (issue 20): its trial is marked failed, in the study (optuna's tables in the project's
PostgreSQL database) and in the SearchTrial row, and the study goes on with the next trial."""
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.models import Dataset, FineTuneJob, SearchTrial
from jobs.services import search_stage as job_search

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_trial_whose_worker_stopped_answering_is_failed_and_the_study_goes_on(user, tiny_base_model, settings):
    import optuna

    dataset = Dataset.objects.create(owner=user, name="d", content_hash="d", file_path="/nonexistent",
                                     status=Dataset.Status.READY, rows=10, train_rows=8, validation_rows=2)
    job = FineTuneJob.objects.create(owner=user, base_model=tiny_base_model, dataset=dataset, method="auto",
                                     plan={"method": "lora", "search": {"enabled": True, "eval_every": 2}},
                                     adapter_name="a", status="running")
    study = job_search.open_job_study(job, "exact_match")
    dead = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)})
    long_ago = timezone.now() - timedelta(seconds=settings.JOB_LEASE_SECONDS + 5)
    SearchTrial.objects.create(job=job, number=dead.number, params=dict(dead.params), state="running",
                               worker="gone@host", updated_at=long_ago)
    alive = study.ask()
    SearchTrial.objects.create(job=job, number=alive.number, state="running", worker="here@host")

    assert job_search.fail_stale_trials(job, study) == [dead.number]

    row = SearchTrial.objects.get(job=job, number=dead.number)
    assert row.state == "failed" and "stopped answering" in row.reason
    assert SearchTrial.objects.get(job=job, number=alive.number).state == "running"
    states = {t.number: t.state for t in job_search.open_job_study(job, "exact_match").get_trials()}
    assert states[dead.number] == optuna.trial.TrialState.FAIL
    assert states[alive.number] == optuna.trial.TrialState.RUNNING
    assert job.events.filter(kind="search_trial", message__contains="stopped answering").exists()
    # the study goes on: a new trial is numbered after the failed one
    assert study.ask().number == alive.number + 1

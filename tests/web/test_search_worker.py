"""A job with search on a real Celery worker (issue 20): the worker runs the trials (stored as SearchTrial rows and
in optuna's tables in the same PostgreSQL database), then trains the final run with the winner's parameters."""
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from tinymodel import learnable_chat_rows, write_jsonl

from jobs import services
from jobs.models import Dataset, FineTuneJob, JobEvent, JobStatus, SearchTrial
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_job_searches_then_trains_with_the_winner(user, tiny_base_model, celery_worker, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", learnable_chat_rows(48))
    dataset, _ = services.create_dataset(user, SimpleUploadedFile("chat.jsonl", path.read_bytes()), name="pairs",
                                         validation_fraction="0.25")
    wait_for(lambda: Dataset.objects.get(pk=dataset.pk).status != Dataset.Status.VALIDATING, timeout=120,
             what="dataset validation", log_proc=celery_worker)
    dataset.refresh_from_db()
    job = services.create_job(user, tiny_base_model, dataset, "lora",
                              {"search_trials": 3, "max_steps": 8, "max_seq_len": 64, "max_new_tokens": 4}, "searched")
    assert job.plan["search"]["enabled"] and job.plan["search"]["max_trials"] == 3

    wait_for(lambda: FineTuneJob.objects.get(pk=job.pk).status in (JobStatus.SUCCEEDED, JobStatus.FAILED),
             timeout=400, what="search and training", log_proc=celery_worker)
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED, job.error
    trials = list(SearchTrial.objects.filter(job=job))
    assert len(trials) == 3 and all(t.state != SearchTrial.State.RUNNING for t in trials)
    assert all(t.params["method"] == "lora" for t in trials)  # the method was chosen: not searched
    winners = [t for t in trials if t.winner]
    assert len(winners) == 1 and winners[0].state == SearchTrial.State.COMPLETE
    winner = winners[0]
    # the final run used the winner's parameters
    assert job.plan["search_result"]["winner"] == winner.number
    assert job.plan["learning_rate"] == pytest.approx(winner.params["learning_rate"])
    assert job.plan["rank"] == winner.params["rank"] and job.plan["micro_batch"] == winner.params["micro_batch"]
    assert job.adapter_version.plan["learning_rate"] == pytest.approx(winner.params["learning_rate"])
    # "of 3 trials", or "of 2 trials fast enough to train (of 3)" when a slow one was left out (search.py)
    assert any("best of" in r and "3" in r.split("validation")[0] for r in job.plan["reasons"])
    kinds = list(JobEvent.objects.filter(job=job).values_list("kind", flat=True))
    assert kinds.index("search_started") < kinds.index("search_done") < kinds.index("succeeded")
    assert kinds.count("search_trial") == 3

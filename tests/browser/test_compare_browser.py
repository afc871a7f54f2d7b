"""Two versions of the tiny model trained by a real Celery worker, compared side by side in Chromium (issue 7):
both version columns, the base model baseline column, highlighted settings differences, the overlaid loss chart,
generations from both versions and the baseline, and the prompt box run on every column."""
import pytest

from jobs import services
from jobs.models import AdapterVersion, FineTuneJob, JobStatus
from tests.conftest import wait_for

from .conftest import log_in
from .test_monitor_browser import ready_dataset

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def train(user, base_model, dataset, worker, rank):
    job = services.create_job(user, base_model, dataset, "lora", {
        "max_steps": 6, "micro_batch": 4, "grad_accum": 1, "rank": rank, "learning_rate": 3e-3,
        "max_eval_generations": 2, "max_new_tokens": 8,
    }, "support-intents")
    wait_for(lambda: FineTuneJob.objects.get(pk=job.pk).status not in (JobStatus.QUEUED, JobStatus.RUNNING),
             timeout=240, what=f"training job {job.pk}", log_proc=worker)
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED, job.error
    return AdapterVersion.objects.get(job=job)


def test_compare_two_trained_versions_with_the_baseline(page, live_server, user, tiny_base_model, celery_worker,
                                                         tmp_path):
    dataset = ready_dataset(user, tmp_path, celery_worker, rows=24)
    v1 = train(user, tiny_base_model, dataset, celery_worker, rank=4)
    v2 = train(user, tiny_base_model, dataset, celery_worker, rank=8)
    assert (v1.version, v2.version) == (1, 2)
    assert v2.lineage["dataset"]["content_hash"] == dataset.content_hash and v2.lineage["curves"]["step"]

    log_in(page, live_server.url, "alice", "alice-pw")
    page.goto(f"{live_server.url}/versions/")
    page.check(f"input[name=ids][value='{v1.pk}']")
    page.check(f"input[name=ids][value='{v2.pk}']")
    page.click("#compare-button")
    page.wait_for_url("**/versions/compare/?ids=*")

    headers = page.locator("#compare-metrics thead th").all_inner_texts()
    assert "support-intents v1" in headers and "support-intents v2" in headers
    assert any("base model" in h for h in headers), headers
    assert page.locator("#compare-columns tr.differs[data-field='rank']").count() == 1
    page.wait_for_function("Number(document.querySelector('#compare-loss-chart').dataset.series || 0) >= 2")

    # Opening the comparison starts nothing; the user asks for the validation prompts on both versions and the
    # base model, and the section polls until the worker has generated every column.
    assert page.locator("#compare-evaluation-empty").count() == 1
    page.click("#compare-evaluate-button")
    page.wait_for_selector("#compare-evaluation[data-status='done']", timeout=180_000)
    rows = page.locator("#compare-evaluation tbody tr")
    assert rows.count() >= 1
    assert rows.first.locator("td").count() == 2 + 2 + 1, "prompt, reference, two versions, baseline"
    assert rows.first.locator("td.baseline pre").count() == 1

    page.fill("#prompt-input", "ping")
    page.click("#prompt-submit")
    page.wait_for_selector("#prompt-run[data-status='done']", timeout=120_000)
    assert page.locator("#prompt-run td pre").count() == 3, "an answer from each version and the base model"
    page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)

"""Watching a running job in Chromium (issue 6): the progress bar and the Chart.js loss chart move without a page
reload while a real Celery worker trains the tiny model, and Cancel stops the job within seconds."""
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from tinymodel import learnable_chat_rows, write_jsonl

from jobs import services
from jobs.models import Dataset, FineTuneJob, JobStatus
from tests.conftest import wait_for

from .conftest import log_in

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def ready_dataset(user, tmp_path, worker, rows=40):
    """A dataset validated by the worker, as an upload in the browser would make it."""
    path = write_jsonl(tmp_path / "chat.jsonl", learnable_chat_rows(rows))
    upload = SimpleUploadedFile("chat.jsonl", path.read_bytes())
    dataset, _ = services.create_dataset(user, upload, name="support", validation_fraction="0.2")
    wait_for(lambda: Dataset.objects.get(pk=dataset.pk).status != Dataset.Status.VALIDATING, timeout=120,
             what="dataset validation", log_proc=worker)
    dataset.refresh_from_db()
    assert dataset.status == Dataset.Status.READY, dataset.error
    return dataset


def canvas_points(page, canvas_id):
    return int(page.get_attribute(f"#{canvas_id}", "data-points") or 0)


def test_watch_progress_and_chart_then_cancel(page, live_server, user, tiny_base_model, celery_worker, tmp_path):
    dataset = ready_dataset(user, tmp_path, celery_worker)
    # Long enough to watch on a fast machine (the test cancels it): small steps on the tiny model, a validation pass now and then.
    job = services.create_job(user, tiny_base_model, dataset, "lora", {
        "max_steps": 20000, "micro_batch": 2, "grad_accum": 1, "eval_every_steps": 25, "checkpoint_every_steps": 40,
    }, "watched")
    log_in(page, live_server.url, "alice", "alice-pw")
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    page.wait_for_selector("#job-status:text('running')", timeout=120_000)
    page.wait_for_function("Number(document.querySelector('#loss-chart').dataset.points || 0) > 0", timeout=60_000)
    first_points = canvas_points(page, "loss-chart")
    first_step = int(page.text_content("#job-step"))
    first_pct = float(page.get_attribute("#job-progress", "aria-valuenow"))
    navigations = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)

    # The page polls: the step counter, the progress bar and the chart all move on their own.
    page.wait_for_function(f"Number(document.querySelector('#job-step').textContent) > {first_step + 5}",
                           timeout=60_000)
    page.wait_for_function(
        f"Number(document.querySelector('#loss-chart').dataset.points) > {first_points}", timeout=30_000)
    assert float(page.get_attribute("#job-progress", "aria-valuenow")) >= first_pct
    assert int(page.get_attribute("#loss-chart", "data-last-step")) > first_step
    assert canvas_points(page, "lr-chart") > 0 and canvas_points(page, "speed-chart") > 0
    assert page.text_content("#tokens-per-second").strip() not in ("", "–")
    assert "step" in page.text_content("#job-log")
    assert "started" in page.text_content("#job-events")
    page.screenshot(path=str(tmp_path / "job-running.png"), full_page=True)

    page.click("#cancel-open")  # a confirmation first; the page's polling keeps it open
    page.wait_for_timeout(1500)
    page.click("#cancel-button")
    page.wait_for_selector("#job-stopping, #job-status:text('cancelled')", timeout=10_000)
    page.wait_for_selector("#job-status:text('cancelled')", timeout=60_000)
    assert navigations == [], f"the page updated itself without reloads, got {navigations}"
    stopped_at = FineTuneJob.objects.get(pk=job.pk)
    assert stopped_at.status == JobStatus.CANCELLED and stopped_at.step < 20000
    page.wait_for_selector("#job-events:has-text('Stopped at step')", timeout=10_000)
    assert page.locator("#retry-button").count() == 1, "a cancelled job can be retried from its checkpoint"
    assert page.locator("#cancel-button").count() == 0

    # The jobs list shows it with its model, dataset and method, and filters by status.
    page.goto(f"{live_server.url}/jobs/?status=cancelled")
    row = page.locator(f"tr[data-job='{job.pk}']")
    for text in ("watched", "cancelled", "tiny-llama", "support", "lora"):
        assert text in row.inner_text(), text

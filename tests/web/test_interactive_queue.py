"""The compare page's prompt box is answered by the interactive worker while the gpu queue holds a training job
that nobody is taking (issue 23): short generations never wait behind training. A real Celery worker consuming
only the interactive queue, the tiny model, the page's own endpoints."""
import uuid

import pytest

from jobs import services
from jobs.models import FineTuneJob, JobStatus, Worker
from tests.web.test_finish_pages import dataset  # noqa: F401 - the fixture
from tests.web.test_versions import train_version

from .conftest import purge_broker, start_worker, stop_worker, wait_for, wait_for_worker_row

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_prompt_box_runs_while_training_waits(client, user, tiny_base_model, dataset, tmp_path):  # noqa: F811
    v1 = train_version(user, tiny_base_model, dataset, tmp_path, seed=1)
    v2 = train_version(user, tiny_base_model, dataset, tmp_path, seed=2)
    FineTuneJob.objects.filter(pk__in=[v1.job_id, v2.job_id]).update(status=JobStatus.SUCCEEDED)
    purge_broker()
    name = f"interactive-{uuid.uuid4().hex[:6]}"
    worker = start_worker(name, tmp_path / "interactive.log", queues="interactive")
    try:
        wait_for_worker_row(name, worker)
        # A training job queued on the gpu queue: no gpu worker runs, so it waits there the whole test.
        training = services.create_job(user, tiny_base_model, dataset, "lora", {"max_steps": 2}, "waiting")
        client.force_login(user)
        html = client.post("/versions/compare/prompt", {"ids": f"{v1.pk},{v2.pk}", "prompt": "ping",
                                                         "max_new_tokens": "4"}).content.decode()
        set_id = html.split("set=")[1].split('"')[0]

        def answered():
            page = client.get(f"/versions/compare/prompt?ids={v1.pk},{v2.pk}&set={set_id}").content.decode()
            return 'data-status="done"' in page and page.count("<pre>") == 3

        wait_for(answered, timeout=180, what="the prompt box's answers", log_proc=worker)
        # The interactive worker answered and never took the training job (the session's gpu worker may).
        job = FineTuneJob.objects.get(pk=training.pk)
        assert not job.worker.startswith(name), "training is not interactive"
        assert Worker.objects.get(hostname__startswith=f"{name}@").queues == "interactive"
        if job.status == JobStatus.QUEUED:  # run alone, no gpu worker exists: the page says what it waits for
            job_page = client.get(f"/jobs/{training.pk}/").content.decode()
            assert 'id="job-waiting"' in job_page and "a free worker on the gpu queue" in job_page
    finally:
        stop_worker(worker)
        purge_broker()

"""The first user path in a real browser: log in, upload a chat dataset, click Train, watch the job finish on a
real Celery worker (PostgreSQL + Redis), and find the adapter version."""
import json

import pytest

from tinymodel import learnable_chat_rows

from .conftest import log_in

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_upload_train_and_see_the_version(page, live_server, user, tiny_base_model, celery_worker, tmp_path):
    data = tmp_path / "support.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in learnable_chat_rows(40)))
    log_in(page, live_server.url, "alice", "alice-pw")

    page.goto(f"{live_server.url}/datasets/")
    page.set_input_files("#upload-form input[name=file]", str(data))
    page.click("#upload-form button[type=submit]")
    page.wait_for_url("**/datasets/*/")
    # The status fragment refreshes itself until the worker has validated the file.
    page.wait_for_selector(".badge.ready", timeout=120_000)
    assert "messages" in page.content()
    assert page.locator("pre.preview mark").count() > 0  # the preview marks what will be learned

    page.goto(f"{live_server.url}/jobs/new/")
    page.select_option("select[name=dataset]", index=1)
    page.wait_for_selector("#plan .plan, #plan table, #plan dl", timeout=30_000)
    page.fill("input[name=max_steps]", "6")
    page.click("#train-submit")
    page.wait_for_url("**/jobs/*/")
    # Live status: the page updates itself (no reload) until the worker reports success.
    page.wait_for_selector("text=succeeded", timeout=240_000)
    assert page.locator("svg, canvas").count() > 0  # the loss chart
    page.goto(f"{live_server.url}/versions/")
    assert page.locator("text=support").count() > 0
    page.click("text=v1")
    assert "lora" in page.content().lower() or "qlora" in page.content().lower() or "adapter" in page.content()

"""The dataset page in a real browser: a pretty-printed JSON export and a KTO file come out ready with their
report, a zip is refused with its own message, and the page's Process again and Delete buttons work; a CSV whose
columns match no layout is mapped on the page, with a live preview, and processed again ready."""
import json

import pytest

from .conftest import log_in

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _upload(page, base_url, path):
    page.goto(f"{base_url}/datasets/")
    page.set_input_files("#upload-form input[name=file]", str(path))
    page.click("#upload-form button[type=submit]")
    page.wait_for_url("**/datasets/*/")


def test_wild_files_on_the_dataset_page(page, live_server, user, tiny_base_model, celery_worker, tmp_path):
    log_in(page, live_server.url, "alice", "alice-pw")
    page.goto(f"{live_server.url}/datasets/")
    assert "separated by one or more blank lines" in page.locator("#format-help").inner_text()

    kto = tmp_path / "feedback.json"
    kto.write_text(json.dumps([{"instruction": "ping", "output": a, "kto_tag": good}
                               for a, good in [("pong", True), ("no", False)] * 4], indent=2))
    _upload(page, live_server.url, kto)
    page.wait_for_selector(".badge.ready", timeout=120_000)
    assert "4 desirable, 4 undesirable" in page.locator("#kto-labels").inner_text()

    broken = tmp_path / "bundle.zip"
    broken.write_bytes(b"PK\x03\x04\x14\x00not really")
    _upload(page, live_server.url, broken)
    page.wait_for_selector(".badge.invalid", timeout=120_000)
    assert "zip archives are not supported" in page.locator("#dataset-error").inner_text()

    # Process again: back to validating, then the same verdict.
    with page.expect_navigation():
        page.click("#retry-button")
    page.wait_for_selector(".badge.invalid", timeout=120_000)
    assert "zip archives are not supported" in page.locator("#dataset-error").inner_text()

    page.click("#dataset-delete summary")  # one delete control, confirmed on the page, no browser dialog
    page.click("#delete-button")
    page.wait_for_url("**/datasets/")
    assert "bundle.zip" not in page.locator("table").last.inner_text()
    assert "feedback" in page.locator("table").last.inner_text()  # named after the file, without its extension


def test_unrecognised_columns_are_mapped_with_a_live_preview(page, live_server, user, tiny_base_model, celery_worker,
                                                              tmp_path):
    log_in(page, live_server.url, "alice", "alice-pw")
    faq = tmp_path / "faq.csv"
    faq.write_text("question,reply\n" + "".join(f"What is {i} plus {i}?,It is {2 * i}.\n" for i in range(6)))
    _upload(page, live_server.url, faq)
    page.wait_for_selector(".badge.invalid", timeout=120_000)
    assert "Map your columns" in page.locator("#dataset-error").inner_text()

    page.select_option("#map-prompt", "question")
    page.wait_for_function("document.querySelector('#mapping-preview').innerText.includes(\"no 'completion'\")")
    page.select_option("#map-completion", "reply")
    page.wait_for_function("document.querySelector('#mapping-preview').innerText.includes('It is 2.')")
    assert "What is 1 plus 1?" in page.locator("#mapping-preview").inner_text()
    with page.expect_navigation():
        page.click("#mapping-submit")
    page.wait_for_selector(".badge.ready", timeout=120_000)
    assert page.locator("#column-mapping").count() == 0 and page.locator("#train-button").is_visible()

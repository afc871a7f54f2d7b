"""Deploy and chat in a real browser: click Deploy on a version, watch the deployment go live (merged by a real
Celery worker, loaded by a real inference server process), open the playground and get a streamed answer."""
import pytest

from tests.web.test_deploy import (  # noqa: F401 - fixtures shared with tests/web/test_deploy.py
    make_version,
    serving,
    trained_adapters,
)

from .conftest import log_in

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_deploy_a_version_and_chat_with_it(
    page, live_server, user, tiny_base_model, trained_adapters, serving, celery_worker
):
    version = make_version(user, tiny_base_model, trained_adapters["pong"], "browser-bot")
    log_in(page, live_server.url, "alice", "alice-pw")

    page.goto(f"{live_server.url}/versions/{version.pk}/")
    assert page.is_checked("#deploy-form input[name=merge]")
    page.click("#deploy-button")
    page.wait_for_url("**/deployments/*/")
    # The status fragment refreshes itself (merging -> loading -> live) without a reload.
    page.wait_for_selector("#deployment-status-badge[data-status=live]", timeout=120_000)
    assert "Merge check: max |merged − unmerged| logit difference" in page.content()
    assert page.inner_text("#vllm-merged").startswith("vllm serve ./browser-bot")
    assert "LORA_ADAPTERS=browser-bot=" in page.inner_text("#tgi-adapter")
    assert page.get_attribute("#export-link", "href").endswith("/export")

    page.click("#chat-link")
    page.wait_for_url("**/chat/")
    page.fill("#chat-input", "ping")
    page.click("#chat-send")
    page.wait_for_selector(".msg.assistant[data-done=true]", timeout=60_000)
    answer = page.locator(".msg.assistant").last
    assert answer.inner_text() == "pong"
    assert not page.locator(".msg.error").count()
    # "pong" is four tokens of the tiny tokenizer: it arrived as separate server-sent events, one delta each.
    assert int(answer.get_attribute("data-deltas")) >= 2
    assert answer.get_attribute("data-finish-reason") == "stop"
    # After the answer: its latency and speed, counted from the stream's usage chunk (issue 23).
    stats = page.locator(".chat-stats[data-done=true]").last.inner_text()
    assert "first token after" in stats and "tokens/s" in stats and " tokens in " in stats, stats

    # The conversation goes on with its history; the list page offers the chat too.
    page.fill("#chat-input", "ping")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done=true]').length === 2")
    assert page.locator(".msg.user").count() == 2
    page.goto(f"{live_server.url}/deployments/")
    assert page.locator("#deployment-rows [data-status=live]").count() == 1
    assert page.locator("#deployment-rows a.button", has_text="Chat").count() == 1

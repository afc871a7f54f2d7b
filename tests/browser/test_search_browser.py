"""The job page's search section in Chromium (issue 20): the trials table, and the Chart.js chart with a curve per
trial that has one, pruned ones faded, the winner marked; the new-job page shows the search budget before Train."""
import pytest

from jobs.models import Dataset, FineTuneJob, SearchTrial

from .conftest import log_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_trials_table_and_chart(page, live_server, user, tiny_base_model):
    dataset = Dataset.objects.create(owner=user, name="chat.jsonl", content_hash="c", file_path="/nonexistent",
                                     status=Dataset.Status.READY, schema="messages", rows=440, train_rows=400,
                                     validation_rows=40, token_stats={"p50": 20, "p99": 40, "max": 48, "mean": 22})
    job = FineTuneJob.objects.create(
        owner=user, base_model=tiny_base_model, dataset=dataset, method="auto", adapter_name="a", status="succeeded",
        plan={"method": "lora", "search": {"enabled": True, "summary": "Search first: 3 trials (set)."},
              "search_result": {"winner": 1}, "reasons": ["Learning rate 0.0004: best of 3 trials."]})
    params = {"rank": 8, "alpha_ratio": 2.0, "target_set": "attention", "method": "lora", "micro_batch": 8}
    SearchTrial.objects.create(job=job, number=0, params={**params, "learning_rate": 2e-4}, state="complete",
                               score=0.85, metric="exact_match", curve=[[2, 1.5], [4, 1.2]])
    SearchTrial.objects.create(job=job, number=1, params={**params, "learning_rate": 4e-4}, state="complete",
                               score=0.97, metric="exact_match", curve=[[2, 1.3], [4, 0.9]], winner=True)
    SearchTrial.objects.create(job=job, number=2, params={**params, "learning_rate": 3e-3}, state="pruned",
                               metric="exact_match", curve=[[2, 4.0]], reason="stopped early")
    SearchTrial.objects.create(job=job, number=3, params={**params, "micro_batch": 64, "learning_rate": 1e-3},
                               state="pruned", metric="exact_match", reason="needs 9 GB by the estimator; not run")

    log_in(page, live_server.url, "alice", "alice-pw")
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    assert page.locator("#trials-table tbody tr").count() == 4
    assert page.locator("tr[data-trial='1'] #trial-winner").is_visible()
    assert "not run" in page.text_content("tr[data-trial='3']")
    page.wait_for_function("document.querySelector('#trials-chart').dataset.trials === '3'")
    assert page.get_attribute("#trials-chart", "data-winner") == "1"
    colors = page.evaluate("Chart.getChart('trials-chart').data.datasets.map(d => [d.label, d.borderColor])")
    assert any(label == "trial 1 (winner)" for label, _ in colors)
    assert any(label == "trial 2 (pruned)" and color.startswith("rgba(") and color.endswith(",0.25)")
               for label, color in colors)

    page.goto(f"{live_server.url}/jobs/new/")
    page.select_option("select[name=dataset]", str(dataset.pk))
    page.fill("input[name=search_trials]", "5")
    page.wait_for_selector("#plan-search:has-text('5 trials (set)')")
    page.select_option("select[name=search]", "false")
    page.wait_for_selector("#plan-search:has-text('skipped as asked')")

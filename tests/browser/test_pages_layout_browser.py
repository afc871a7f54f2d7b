"""Every page, in each state that has its own layout, opened in Chromium at a desktop (1440 px) and a phone
(390 px) width (issue 23). A page fails on horizontal overflow (the document wider than the viewport), on a
console error or an uncaught exception, on a failed request (4xx/5xx or a request that never completed), and on
any serious or critical accessibility violation found by axe-core (npm, injected from node_modules).
Tables (issue 37): a page also fails on a table cell squeezed to a few characters' width, on a box whose content
is clipped sideways without the visible "scroll sideways" hint, and, at the desktop width, on any table wider
than its card.

The states are made directly in the database (a real training run adds nothing to the layout); the adapter
files of the versions are real, built on the tiny model. Screenshots go to $TUNEDECK_SCREENSHOT_DIR when set."""
import os
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from jobs import services
from jobs.models import ApiToken, Dataset, Deployment, FineTuneJob, JobEvent, JobStatus, MetricPoint, Worker
from jobs.services.version_recording import record_adapter_version
from tests.finetune.adapter_factory import make_adapter
from tests.helpers import make_ready_dataset

from .conftest import log_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

AXE = Path(__file__).resolve().parents[2] / "node_modules" / "axe-core" / "axe.min.js"
WIDTHS = {"desktop": (1440, 900), "phone": (390, 844)}
SERIOUS = ("serious", "critical")
LONG_NAME = "customer-support-conversations-2026-q3-cleaned-and-deduplicated"


def _job(user, dataset, base_model, status, **fields):
    plan = services.make_plan(base_model, dataset, "lora", {"max_steps": 10, "micro_batch": 4})
    job = FineTuneJob.objects.create(owner=user, base_model=base_model, dataset=dataset, method="lora", plan=plan,
                                     overrides={"max_steps": 10, "micro_batch": 4}, adapter_name=LONG_NAME,
                                     status=status, **fields)
    JobEvent.objects.create(job=job, kind="queued", message="Queued for a worker.")
    return job


def _running(user, dataset, base_model):
    now = timezone.now()
    job = _job(user, dataset, base_model, JobStatus.RUNNING, started_at=now - timedelta(minutes=3), step=6,
               total_steps=10, progress=0.6, worker="gpu@workstation-with-a-long-hostname",
               metrics={"train_loss": 1.234, "eval_loss": 1.5, "perplexity": 4.48, "learning_rate": 2.44e-5,
                        "tokens_per_second": 812.0, "eta_seconds": 95, "memory_bytes": 3803709440,
                        "fit_check": {"fits": True, "measured_bytes": 2_684_354_560,
                                      "estimated_bytes": 2_791_728_742, "micro_batch": 4, "batch_tokens": 256,
                                      "max_seq_len": 64, "device": "cuda", "device_name": "NVIDIA RTX 4090"}})
    MetricPoint.objects.bulk_create([
        MetricPoint(job=job, step=i, train_loss=2.0 - i * 0.1, learning_rate=2.4e-5, tokens_per_second=800.0,
                    memory_bytes=3_000_000_000, grad_norm=1.0) for i in range(1, 7)])
    JobEvent.objects.create(job=job, kind="started", message="Started on gpu@workstation.")
    return job


def _version(user, dataset, base_model, tmp_path, seed, rank):
    plan = {**services.make_plan(base_model, dataset, "lora", {"rank": rank}), "learning_rate": 2.44e-5}
    job = FineTuneJob.objects.create(owner=user, base_model=base_model, dataset=dataset, method="lora", plan=plan,
                                     adapter_name="support", status=JobStatus.RUNNING, total_steps=3, step=3)
    MetricPoint.objects.bulk_create([MetricPoint(job=job, step=i + 1, train_loss=loss, learning_rate=2.44e-5)
                                     for i, loss in enumerate((2.0, 1.5, 1.1))])
    adapter = make_adapter(base_model.path, tmp_path / f"adapter-{seed}", seed=seed)
    metrics = {"train_loss": 1.3, "final_step_loss": 1.1, "eval_loss": 1.2 + seed / 10, "perplexity": 3.3,
               "tokens_per_second": 900.0, "steps": 3, "initial_eval_loss": 5.0,
               "peak_memory_bytes": 3803709440, "trainable_parameters": 163840, "tokens_seen": 123456}
    generations = [{"prompt": "How do I reset my password on the mobile app?", "output": f"answer {seed} " * 30,
                    "reference": "Open Settings, then Account, then Reset password."}]
    version = record_adapter_version(job, adapter, metrics, generations, plan)
    FineTuneJob.objects.filter(pk=job.pk).update(status=JobStatus.SUCCEEDED, progress=1.0,
                                                 finished_at=timezone.now(), metrics=metrics)
    return version


def _queued_evaluation(versions, queue):
    """A custom evaluation waiting in a queue, written as evaluation.queue_evaluation writes it (no message)."""
    entry = {"name": "your prompts", "kind": "custom", "status": "queued", "queue": queue, "max_new_tokens": 32,
             "queued_at": timezone.now().isoformat(),
             "prompts": [{"prompt": "What is the refund policy for annual plans?", "reference": "30 days"}]}
    for v in versions:
        v.metrics = {**v.metrics, "evaluation": {"latest": "s1", "sets": {"s1": entry}}}
        v.save(update_fields=["metrics"])


@pytest.fixture
def states(user, tiny_base_model, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Question %d: " % i + "word " * (i % 40)},
                          {"role": "assistant", "content": "Answer " * (1 + i % 25)}]} for i in range(120)]
    ready = make_ready_dataset(user, rows=rows, name=LONG_NAME)
    invalid = Dataset.objects.create(
        owner=user, name="broken-upload", content_hash="b" * 64, options_hash="o" * 16, file_path="/unused",
        status=Dataset.Status.INVALID, format="jsonl", schema="messages", rows=3,
        error="3 of 5 rows are invalid: row 2 has no assistant turn.",
        report={"problem_counts": {"no_assistant_turn": 3}, "valid_rows": 2,
                "errors": [{"row": 2, "kind": "no_assistant_turn", "message": "no assistant turn " + "x" * 200}]})
    queued = _job(user, ready, tiny_base_model, JobStatus.QUEUED)
    running = _running(user, ready, tiny_base_model)
    failed = _job(user, ready, tiny_base_model, JobStatus.FAILED, error="CUDA out of memory at step 0.",
                  finished_at=timezone.now())
    v1 = _version(user, ready, tiny_base_model, tmp_path, 1, 4)
    v2 = _version(user, ready, tiny_base_model, tmp_path, 2, 8)
    _queued_evaluation([v1, v2], "interactive")
    live = Deployment.objects.create(owner=user, version=v1, name=LONG_NAME[:40], merge=True,
                                     status=Deployment.Status.LIVE, revision=1,
                                     details={"merged": True, "serving": "merged model"})
    merging = Deployment.objects.create(owner=user, version=v2, name="support-v2", merge=True,
                                        status=Deployment.Status.MERGING, revision=1, details={})
    ApiToken.issue(user, name="laptop-cli")
    Worker.objects.create(hostname="gpu@workstation-with-a-long-hostname", queues="gpu", current_job=running,
                          last_heartbeat=timezone.now(),
                          inventory={"gpus": [{"index": 0, "name": "NVIDIA RTX 4090", "total_bytes": 25_757_220_864,
                                               "free_bytes": 20_000_000_000, "bf16": True}],
                                     "cpu": {"cores": 16, "ram_total_bytes": 68_719_476_736,
                                             "ram_available_bytes": 40_000_000_000}})
    return {
        "dataset ready": f"/datasets/{ready.pk}/", "dataset invalid": f"/datasets/{invalid.pk}/",
        "datasets": "/datasets/", "new job": f"/jobs/new/?dataset={ready.pk}", "jobs": "/jobs/",
        "job queued": f"/jobs/{queued.pk}/", "job running": f"/jobs/{running.pk}/",
        "job succeeded": f"/jobs/{v1.job_id}/", "job failed": f"/jobs/{failed.pk}/",
        "versions": "/versions/", "version": f"/versions/{v1.pk}/", "version delete": f"/versions/{v2.pk}/delete",
        "compare": f"/versions/compare/?ids={v1.pk},{v2.pk}", "deployments": "/deployments/",
        "deployment live": f"/deployments/{live.pk}/", "deployment queued": f"/deployments/{merging.pk}/",
        "playground": f"/deployments/{live.pk}/chat/", "tokens": "/tokens/", "workers": "/workers/",
        "dashboard": "/", "api docs": "/api/docs",
    }


EMPTY_PAGES = {"dashboard": "/", "datasets": "/datasets/", "jobs": "/jobs/", "new job": "/jobs/new/",
               "versions": "/versions/", "deployments": "/deployments/", "tokens": "/tokens/",
               "workers": "/workers/", "api docs": "/api/docs"}


class PageProblems:
    """Console errors, uncaught exceptions and failed requests seen by one page."""

    def __init__(self, page):
        self.items, self.page = [], page
        self.handlers = {
            "console": lambda m: m.type == "error" and self.items.append(f"console: {m.text}"),
            "pageerror": lambda e: self.items.append(f"exception: {e}"),
            # net::ERR_ABORTED is the browser cancelling a request (a favicon or poll overtaken by the next
            # navigation), not a server failing it; 4xx/5xx answers are caught below.
            "requestfailed": lambda r: "ERR_ABORTED" not in (r.failure or "")
            and self.items.append(f"request failed: {r.url} {r.failure}"),
            "response": lambda r: r.status >= 400 and self.items.append(f"HTTP {r.status}: {r.url}"),
        }
        for event, handler in self.handlers.items():
            page.on(event, handler)

    def stop(self):
        """Stops listening, then leaves the page: a poll still in flight is aborted by leaving, not failed."""
        for event, handler in self.handlers.items():
            self.page.remove_listener(event, handler)
        self.page.goto("about:blank")


# Table cells narrower than this many times their font size while holding a longer text read as "2", "c", "reac".
SQUEEZED_EMS = 2.5

TABLE_PROBLEMS = """(desktop) => {
    const found = [];
    const label = e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
        (e.className && typeof e.className === 'string' ? '.' + e.className.trim().split(/\\s+/).join('.') : '');
    const visible = e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0 &&
                                                                      getComputedStyle(e).visibility !== 'hidden'; };
    for (const cell of document.querySelectorAll('td, th')) {
        if (!visible(cell)) continue;
        const text = cell.innerText.trim();
        const style = getComputedStyle(cell);
        const inner = cell.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
        if (text.length >= 4 && inner < """ + str(SQUEEZED_EMS) + """ * parseFloat(style.fontSize)) {
            found.push(`table cell squeezed to ${Math.round(inner)} px: "${text.slice(0, 30)}"`);
        }
    }
    for (const box of document.querySelectorAll('body *')) {
        const overflowX = getComputedStyle(box).overflowX;
        if (!['auto', 'scroll', 'hidden', 'clip'].includes(overflowX) || !visible(box)) continue;
        if (box.matches('.chart-box, .memory-bar, .bar, .track, .sr-only, textarea, select, input')) continue;
        if (box.scrollWidth <= box.clientWidth + 1) continue;
        const hint = box.previousElementSibling;
        const cued = box.classList.contains('overflowing') && hint && hint.matches('.scroll-hint') && visible(hint);
        if (desktop && box.querySelector('table')) {
            found.push(`table wider than its card at desktop width: ${label(box)} ${box.scrollWidth} px in ${box.clientWidth} px`);
        } else if (!cued) {
            found.push(`content clipped sideways without a visible cue: ${label(box)} ${box.scrollWidth} px in ${box.clientWidth} px`);
        }
    }
    return found.slice(0, 8);
}"""


def check_page(page, url, name, width_name):
    problems = PageProblems(page)
    page.goto(url, wait_until="load")
    page.wait_for_timeout(400)  # charts draw, htmx loads the plan preview
    found = []
    sizes = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    if sizes[0] > sizes[1]:
        wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
            .filter(e => !e.closest('.scroll, pre, .chart-box'))
            .slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className)""")
        found.append(f"horizontal overflow: {sizes[0]} px wide in a {sizes[1]} px viewport ({wide})")
    found += page.evaluate(TABLE_PROBLEMS, width_name == "desktop")
    page.add_script_tag(path=str(AXE))
    violations = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                       nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}));
    }""")
    found += [f"axe {v['impact']}: {v['id']} ({v['help']}) at {v['nodes']}" for v in violations
              if v["impact"] in SERIOUS]
    found = list(problems.items) + found
    folder = os.environ.get("TUNEDECK_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        stem = Path(folder) / f"{name.replace(' ', '-')}-{width_name}"
        page.screenshot(path=f"{stem}.png", full_page=True)
        page.screenshot(path=f"{stem}-top.png")  # the first screen, readable at its own size
    problems.stop()
    return [f"{name} @ {width_name}: {p}" for p in found]


def open_all(browser, base_url, pages):
    problems = []
    for width_name, (width, height) in WIDTHS.items():
        context = browser.new_context(viewport={"width": width, "height": height})
        page = context.new_page()
        page.set_default_timeout(30_000)
        log_in(page, base_url, "alice", "alice-pw")
        for name, path in pages.items():
            problems += check_page(page, base_url + path, name, width_name)
        context.close()
    return problems


def test_empty_pages_hold_their_layout(browser, live_server, user, tiny_base_model):
    problems = open_all(browser, live_server.url, EMPTY_PAGES)
    assert not problems, "\n".join(problems)


def test_pages_with_data_hold_their_layout(browser, live_server, states):
    problems = open_all(browser, live_server.url, states)
    assert not problems, "\n".join(problems)


def test_login_page_and_a_wrong_password_keeps_the_username(browser, live_server, user):
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    problems = PageProblems(page)
    page.goto(f"{live_server.url}/login/")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "wrong")
    page.click("button[type=submit]")
    page.wait_for_selector("p.error")
    assert page.input_value("input[name=username]") == "alice"
    assert [p for p in problems.items if "HTTP 4" not in p] == [], problems.items  # the wrong password is a 200
    assert check_page(page, page.url, "login", "phone") == []
    context.close()

"""Adapter versions (issue 7): lineage recorded at training time and immutable afterwards; evaluation of versions
and the bare base model on a fixed prompt set with known scores; the compare page and API; champion, download,
and delete with confirmation (refused while deployed).

Versions are recorded by the product's own record_adapter_version (jobs/services/version_recording.py) from
adapters built on the tiny model (tests/finetune/adapter_factory.py); the training loop itself is exercised by the
browser test."""
import io
import json
import zipfile

import pytest
from django.core.exceptions import ValidationError

from finetune.evaluate import score_answers
from jobs import evaluation
from jobs.compare import compare_versions
from jobs.models import AdapterVersion, Dataset, Deployment, FineTuneJob, JobStatus, MetricPoint
from jobs.services.evaluation_runs import run_evaluation
from jobs.services.version_recording import record_adapter_version
from tests.finetune.adapter_factory import make_adapter

pytestmark = pytest.mark.django_db

PLAN = {"method": "lora", "rank": 4, "alpha": 8, "target_modules": "all-linear", "micro_batch": 2, "grad_accum": 1,
        "max_seq_len": 64, "gradient_checkpointing": False, "learning_rate": 1e-3, "epochs": 1,
        "memory": {"total_bytes": 1000, "breakdown": {}, "capacity_bytes": 10_000}, "reasons": ["test"]}
VALIDATION = [("ping", "pong"), ("cat", "chat")]


@pytest.fixture
def dataset(user, tmp_path):
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                           {"role": "assistant", "content": a}]}) + "\n"
                                  for q, a in VALIDATION))
    return Dataset.objects.create(owner=user, name="support", content_hash="d" * 64, options_hash="o" * 16,
                                  file_path="/unused", status=Dataset.Status.READY, schema="messages", rows=10,
                                  train_rows=8, validation_rows=2, validation_path=str(validation))


def train_version(user, base_model, dataset, tmp_path, *, seed=1, plan=None, losses=(2.0, 1.5, 1.0), eval_loss=1.2):
    """A finished job with metric points, recorded as the next version of the 'support' line."""
    plan = {**PLAN, **(plan or {})}
    job = FineTuneJob.objects.create(owner=user, base_model=base_model, dataset=dataset, method="lora", plan=plan,
                                     adapter_name="support", status=JobStatus.RUNNING, total_steps=len(losses))
    MetricPoint.objects.bulk_create([MetricPoint(job=job, step=i + 1, train_loss=loss, learning_rate=1e-3)
                                     for i, loss in enumerate(losses)])
    MetricPoint.objects.create(job=job, step=len(losses), eval_loss=eval_loss)
    adapter = make_adapter(base_model.path, tmp_path / f"adapter-{seed}-{job.pk}", seed=seed)
    metrics = {"train_loss": losses[-1], "eval_loss": eval_loss, "perplexity": 2.718 ** eval_loss,
               "tokens_per_second": 100.0 * seed, "steps": len(losses), "initial_eval_loss": 5.0}
    generations = [{"prompt": "ping", "output": f"out-{seed}", "reference": "pong"}]
    return record_adapter_version(job, adapter, metrics, generations, plan)


@pytest.fixture
def two_versions(user, tiny_base_model, dataset, tmp_path):
    v1 = train_version(user, tiny_base_model, dataset, tmp_path, seed=1, eval_loss=1.4)
    v2 = train_version(user, tiny_base_model, dataset, tmp_path, seed=2, plan={"rank": 8, "alpha": 16}, eval_loss=1.1)
    return v1, v2


def test_lineage_is_recorded(two_versions, tiny_base_model, dataset):
    v1, v2 = two_versions
    assert (v1.version, v2.version) == (1, 2) and v1.line_id == v2.line_id
    lineage = v2.lineage
    assert lineage["base_model"] == {"id": tiny_base_model.pk, "name": "tiny-llama", "sha256": "tiny"}
    assert lineage["dataset"]["content_hash"] == "d" * 64 and lineage["dataset"]["options_hash"] == "o" * 16
    assert lineage["dataset"]["train_rows"] == 8 and lineage["dataset"]["validation_rows"] == 2
    assert lineage["plan"]["rank"] == 8 and v2.plan["rank"] == 8
    assert {"python", "torch", "transformers", "peft"} <= set(lineage["libraries"])
    assert lineage["created_by"] == "alice" and lineage["created_at"]
    assert lineage["curves"]["step"] == [1, 2, 3] and lineage["curves"]["train_loss"] == [2.0, 1.5, 1.0]
    assert lineage["curves"]["eval_loss"][-1] == 1.1
    assert (v2.metrics["eval_loss"], v2.generations[0]["output"]) == (1.1, "out-2")


def test_lineage_is_immutable(two_versions):
    v1, _ = two_versions
    for field, value in [("plan", {**v1.plan, "rank": 64}), ("lineage", {**v1.lineage, "created_by": "mallory"}),
                         ("metrics", {**v1.metrics, "eval_loss": 0.01}), ("generations", []), ("path", "/tmp/x"),
                         ("version", 7)]:
        fresh = AdapterVersion.objects.get(pk=v1.pk)
        setattr(fresh, field, value)
        with pytest.raises(ValidationError, match="immutable"):
            fresh.save()
    fresh = AdapterVersion.objects.get(pk=v1.pk)
    assert fresh.plan == v1.plan and fresh.lineage == v1.lineage and fresh.metrics == v1.metrics
    # Evaluations are added next to the training metrics, which stay as they were.
    fresh.metrics = {**fresh.metrics, "evaluation": {"latest": None, "sets": {}}}
    fresh.save()
    # Deleting the job keeps the version, its lineage and its curves.
    FineTuneJob.objects.filter(pk=v1.job_id).delete()
    kept = AdapterVersion.objects.get(pk=v1.pk)
    assert kept.job_id is None and kept.lineage["curves"]["step"] == [1, 2, 3]


def test_scores_of_known_outputs():
    prompts = [{"prompt": "a", "reference": "pong"}, {"prompt": "b", "reference": "the cat sat"},
               {"prompt": "c", "reference": None}]
    scored = score_answers(prompts, ["Pong.", "cat sat on the mat", "anything"])
    first, second, third = scored["results"]
    assert (first["exact_match"], first["token_f1"], first["rouge_l"]) == (1.0, 1.0, 1.0)
    assert second["exact_match"] == 0.0
    assert second["token_f1"] == pytest.approx(2 / 3) and second["rouge_l"] == pytest.approx(2 / 3)
    assert "token_f1" not in third and third["output"] == "anything"
    assert scored["summary"]["scored"] == 2
    assert scored["summary"]["token_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert scored["summary"]["exact_match"] == pytest.approx(0.5)


def test_evaluation_of_versions_and_the_base_model(two_versions):
    v1, v2 = two_versions
    prompts = evaluation.validation_prompts(v1)
    assert prompts == [{"prompt": "ping", "reference": "pong"}, {"prompt": "cat", "reference": "chat"}]
    set_id = evaluation.queue_evaluation([v1, v2], prompts, name="validation", kind="validation", max_new_tokens=4)
    v1.refresh_from_db()
    assert evaluation.entry_of(v1, set_id)["status"] == "queued"
    # The worker's side of the task, run here (the Celery task is a thin wrapper around it).
    statuses = run_evaluation([v1.pk, v2.pk], set_id)
    assert statuses == {v1.pk: "done", v2.pk: "done"}
    data = compare_versions(AdapterVersion.objects.filter(pk__in=[v1.pk, v2.pk]).select_related("line")
                            .order_by("version"), set_id)
    ev = data["evaluation"]
    assert ev["status"] == "done" and len(ev["rows"]) == 2
    assert ev["baseline"]["ready"] and ev["baseline"]["base_model"]["name"] == "tiny-llama"
    for row in ev["rows"]:
        assert row["baseline"] is not None and all(cell is not None for cell in row["outputs"])
        for cell in [row["baseline"], *row["outputs"]]:
            assert {"output", "exact_match", "token_f1", "rouge_l"} <= set(cell)
    assert {r["metric"] for r in ev["summary_rows"]} == {"exact_match", "token_f1", "rouge_l"}
    v1.refresh_from_db()
    assert v1.metrics["eval_loss"] == 1.4, "training metrics untouched by the evaluation"
    # The same prompts again: nothing to do, same set id.
    assert evaluation.queue_evaluation([v1], prompts, name="validation", max_new_tokens=4) == set_id


def test_compare_settings_diff_and_best_metric(two_versions):
    v1, v2 = two_versions
    data = compare_versions([v1, v2])
    settings = {row["field"]: row for row in data["settings"]}
    assert settings["rank"]["differs"] and settings["rank"]["values"] == [4, 8]
    assert not settings["method"]["differs"] and not settings["base_model"]["differs"]
    metrics = {row["metric"]: row for row in data["metrics"]}
    assert metrics["eval_loss"]["best"] == 1, "lower validation loss wins"
    assert metrics["tokens_per_second"]["best"] == 1, "higher throughput wins"
    assert metrics["eval_loss"]["baseline"] == 5.0, "the base model's loss before training"
    assert [c["label"] for c in data["versions"]] == ["support v1", "support v2"]
    assert [p["step"] for p in data["versions"][0]["curve"]] == [1, 2, 3]
    assert data["generations"][0]["outputs"] == ["out-1", "out-2"]


def test_compare_leaves_out_the_fields_no_compared_method_uses(user, tiny_base_model, dataset, tmp_path, client):
    ia3 = train_version(user, tiny_base_model, dataset, tmp_path, seed=1, plan={"method": "ia3"})
    prompt = train_version(user, tiny_base_model, dataset, tmp_path, seed=2,
                           plan={"method": "prompt", "num_virtual_tokens": 20})
    fields = {row["field"] for row in compare_versions([ia3, prompt])["settings"]}
    assert not {"rank", "alpha"} & fields, "neither IA3 nor prompt tuning has a rank or alpha"
    assert {"target_modules", "num_virtual_tokens", "method", "learning_rate"} <= fields, "IA3 adapts layers"
    fields = {row["field"] for row in compare_versions([ia3])["settings"]}
    assert not {"rank", "alpha", "num_virtual_tokens"} & fields and "target_modules" in fields
    lora = train_version(user, tiny_base_model, dataset, tmp_path, seed=3)
    rows = {row["field"]: row for row in compare_versions([ia3, lora])["settings"]}
    assert rows["rank"]["values"] == [4, 4] and "alpha" in rows, "LoRA uses them: shown for both, as planned"
    client.force_login(user)
    page = client.get(f"/versions/compare/?ids={ia3.pk},{prompt.pk}").content.decode()
    assert 'data-field="method"' in page and 'data-field="rank"' not in page and 'data-field="alpha"' not in page


def test_compare_page(client, user, other_user, two_versions):
    v1, v2 = two_versions
    client.force_login(user)
    page = client.get(f"/versions/compare/?ids={v1.pk},{v2.pk}").content.decode()
    assert page.count('class="version-col"') >= 4 and "support v1" in page and "support v2" in page
    assert 'id="baseline-column"' in page and "base model (no adapter)" in page
    assert 'class="differs" data-field="rank"' in page
    assert '<td class="best">1.1' in page
    assert 'id="compare-curves"' in page and 'id="prompt-form"' in page
    # Opening the comparison starts nothing: the prompt box never waits behind an evaluation nobody asked for.
    assert 'id="compare-evaluation-empty"' in page and "validation prompts of support" in page
    v1.refresh_from_db()
    assert "evaluation" not in v1.metrics
    assert "<th scope=\"row\">Learning rate</th><td>1.0e-03</td>" in page and ">learning_rate<" not in page
    assert client.get(f"/versions/compare/?ids={v1.pk}").status_code == 400
    assert client.get("/versions/compare/?ids=1,2,3,4,5").status_code == 400
    assert client.get("/versions/compare/?ids=x,y").status_code == 400
    client.force_login(other_user)
    assert client.get(f"/versions/compare/?ids={v1.pk},{v2.pk}").status_code == 404


def test_prompt_box_queues_one_prompt_on_every_version(client, user, two_versions):
    v1, v2 = two_versions
    client.force_login(user)
    response = client.post("/versions/compare/prompt", {"ids": f"{v1.pk},{v2.pk}", "prompt": "ping",
                                                         "max_new_tokens": "4"})
    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-status="queued"' in html and "support v1" in html and "base model" in html
    set_id = html.split("set=")[1].split('"')[0]
    v1.refresh_from_db()
    assert evaluation.entry_of(v1, set_id)["queue"] == "interactive", "never behind a training job"
    from django.conf import settings
    assert settings.CELERY_TASK_ROUTES["jobs.tasks.evaluate_interactive"] == {"queue": "interactive"}
    run_evaluation([v1.pk, v2.pk], set_id)
    done = client.get(f"/versions/compare/prompt?ids={v1.pk},{v2.pk}&set={set_id}").content.decode()
    assert 'data-status="done"' in done and "hx-get" not in done and done.count("<pre>") == 3
    empty = client.post("/versions/compare/prompt", {"ids": f"{v1.pk},{v2.pk}", "prompt": "  "})
    assert empty.status_code == 400 and "empty" in empty.content.decode()


def test_api_compare_aligned(client, user, token_for, two_versions):
    v1, v2 = two_versions
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token_for(user)}"}
    data = client.get(f"/api/v1/adapter-versions/compare?ids={v1.pk},{v2.pk}", **auth).json()
    assert [v["id"] for v in data["versions"]] == [v1.pk, v2.pk]
    assert all(len(row["values"]) == 2 for row in data["settings"] + data["metrics"])
    assert data["generations"][0]["outputs"] == ["out-1", "out-2"]


def test_version_page_champion_download_and_delete(client, user, other_user, two_versions):
    v1, v2 = two_versions
    client.force_login(user)
    page = client.get(f"/versions/{v1.pk}/").content.decode()
    for text in ("Lineage", "d" * 16, "created by alice", "torch", 'id="version-curves"', "Mark as champion"):
        assert text in page, text
    client.post(f"/versions/{v2.pk}/champion")
    assert 'id="champion-badge"' in client.get(f"/versions/{v2.pk}/").content.decode()
    assert "champion" in client.get("/versions/").content.decode()
    client.post(f"/versions/{v1.pk}/champion")
    v2.line.refresh_from_db()
    assert v2.line.champion_id == v1.pk, "one champion per line"

    archive = zipfile.ZipFile(io.BytesIO(b"".join(client.get(f"/versions/{v1.pk}/download").streaming_content)))
    assert "adapter_config.json" in archive.namelist()

    deployment = Deployment.objects.create(owner=user, version=v2, name="support-live", status=Deployment.Status.LIVE)
    refused = client.post(f"/versions/{v2.pk}/delete", {"confirm": "support v2"})
    assert refused.status_code == 409 and "is deployed" in refused.content.decode()
    assert AdapterVersion.objects.filter(pk=v2.pk).exists()
    assert 'id="delete-refused"' in client.get(f"/versions/{v2.pk}/delete").content.decode()
    deployment.status = Deployment.Status.STOPPED
    deployment.save()
    wrong = client.post(f"/versions/{v2.pk}/delete", {"confirm": "v2"})
    assert wrong.status_code == 200 and AdapterVersion.objects.filter(pk=v2.pk).exists()
    assert client.post(f"/versions/{v2.pk}/delete", {"confirm": "support v2"}).status_code == 302
    assert not AdapterVersion.objects.filter(pk=v2.pk).exists()

    client.force_login(other_user)
    for url in (f"/versions/{v1.pk}/", f"/versions/{v1.pk}/download", f"/versions/{v1.pk}/delete"):
        assert client.get(url).status_code == 404, url
    assert client.post(f"/versions/{v1.pk}/champion").status_code == 404


def test_api_delete_refused_while_deployed(client, user, token_for, two_versions):
    _, v2 = two_versions
    Deployment.objects.create(owner=user, version=v2, name="support-api", status=Deployment.Status.LOADING)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token_for(user)}"}
    response = client.delete(f"/api/v1/adapter-versions/{v2.pk}", **auth)
    assert response.status_code == 409 and response.json()["error"]["code"] == "deployed"

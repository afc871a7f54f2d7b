"""Hub pulls, continued (issue 34): a pull whose worker is killed mid-file resumes on a new worker with a Range request;
a GGUF-only repository is converted and becomes ready; a gated model pulled with the site token is shared and the
token never shows; a model without a chat template trains with one the user chose on the train page."""
import json
import shutil
from pathlib import Path

import pytest
from django.test import Client

from jobs.models import AdapterVersion, BaseModel

from .conftest import make_base_model, wait_for
from .hub_fake import FakeHub, FakeRepo, api_for, model_files, pointed_at

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]
SITE_TOKEN = "hf_siteSecretToken9876543210"
RESUME_AT = 2 * 1024 * 1024
# A rate the tiny random model learns at within a few steps, so the learning guard (validation must beat the base
# model) passes for the right reason (as tests/web/test_pipeline.py trains it).
TRAIN_QUICKLY = {"max_steps": 6, "micro_batch": 4, "grad_accum": 1, "learning_rate": 3e-3, "max_seq_len": 64,
                 "max_eval_generations": 0, "early_stopping_patience": 0}


@pytest.fixture(scope="module")
def hub(tiny_model_dir, tmp_path_factory):
    from serving.gguf_export import export_gguf

    server = FakeHub()
    files = model_files(tiny_model_dir, **{"README.md": b"---\nlicense: apache-2.0\n---\n# tiny\n"})
    # A download reaches the disk 1 MiB at a time (finetune.hub.WRITE_CHUNK): a model card whose first 2 MiB come at
    # once and the rest trickle (4 KiB every 0.1 s) lets a worker be killed with part of a file on disk.
    card = files["README.md"] + b"\n" + b"x" * (RESUME_AT + 1024 * 1024)
    server.repos["slow-org/tiny-resume"] = FakeRepo(dict(files, **{"README.md": card}), delay=0.1, chunk=4096,
                                                    slow_files={"README.md"}, slow_after=RESUME_AT + 64 * 1024)
    server.repos["site-org/tiny-gated"] = FakeRepo(dict(files), gated=True, token=SITE_TOKEN, license="llama3.2")
    gguf = export_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf"), name="tiny", kinds=("f16",))["f16"]
    server.repos["gguf-org/tiny-GGUF"] = FakeRepo({"tiny-f16.gguf": Path(gguf).read_bytes(),
                                                   "README.md": b"# tiny, GGUF only\n"})
    yield server
    server.close()


@pytest.fixture
def endpoint(hub, settings):
    yield from pointed_at(hub, settings)


def pull(client, repo_id, confirm=True):
    return client.post("/api/v1/base-models/pull", {"repo_id": repo_id, "confirm": confirm},
                       content_type="application/json")


def wait_pull(client, model_id, worker, timeout=240):
    return wait_for(lambda: (m := client.get(f"/api/v1/base-models/{model_id}").json())["status"]
                    in ("ready", "failed", "cancelled") and m,
                    what=f"pull {model_id} to finish", log_proc=worker, timeout=timeout)


def incomplete_bytes(model: BaseModel) -> int:
    """Bytes huggingface_hub has written of the file it is downloading (its .incomplete file in the partial folder)."""
    partial = Path(model.path).with_name(Path(model.path).name + ".partial")
    return sum(p.stat().st_size for p in partial.glob(".cache/huggingface/download/**/*.incomplete"))


def test_a_pull_whose_worker_is_killed_resumes_on_a_new_worker(endpoint, hub, user, tmp_path):
    from helpers import PrivateRedis, kill_worker, start_worker, wait_for_worker_ready

    from jobs import hub_pulls
    from jobs.tasks import pull_base_model_task
    from tunedeck.celery import app

    redis = PrivateRedis(tmp_path / "redis").start()  # no other test's worker can take this pull
    lease = {"TUNEDECK_HEARTBEAT_SECONDS": "1", "TUNEDECK_HUB_LEASE_SECONDS": "8"}
    workers = []
    try:
        workers.append(start_worker("pull-a", tmp_path / "pull-a.log", "downloads", broker_url=redis.url,
                                    lease=lease))
        wait_for_worker_ready(workers[0])
        model = hub_pulls.record_pull(user, hub_pulls.preview_pull(user, "slow-org/tiny-resume"))
        with app.connection_for_write(url=redis.url) as conn:
            pull_base_model_task.apply_async(args=[model.pk], connection=conn)  # routed to "downloads"
        size = len(hub.repos["slow-org/tiny-resume"].files["README.md"])
        wait_for(lambda: incomplete_bytes(model) >= RESUME_AT, interval=0.05, timeout=120,
                 what="2 MiB of the model card on disk", log_proc=workers)
        kill_worker(workers[0])
        stopped_at = incomplete_bytes(model)
        assert BaseModel.objects.get(pk=model.pk).status == "downloading"
        hub.repos["slow-org/tiny-resume"].delay = 0.0  # the network got better meanwhile

        workers.append(start_worker("pull-b", tmp_path / "pull-b.log", "downloads", broker_url=redis.url,
                                    lease=lease))
        # The new worker's heartbeat finds the lease stale and sends the pull again, to itself.
        done = wait_for(lambda: (m := BaseModel.objects.get(pk=model.pk)).status in ("ready", "failed") and m,
                        timeout=240, what="the resumed pull", log_proc=workers)
    finally:
        for proc in workers:
            kill_worker(proc)
        redis.stop()
    assert done.status == "ready", done.error
    assert done.attempts == 2 and done.bytes_done == done.bytes_total
    resumed = [r for path, r in hub.ranges if path.endswith("/README.md")]
    assert resumed, "the partial file was resumed with a Range request"
    assert int(resumed[-1].removeprefix("bytes=").split("-")[0]) >= stopped_at >= RESUME_AT
    folder = Path(done.path)
    assert (folder / "README.md").stat().st_size == size and not (folder / ".cache").exists()


def test_a_gguf_only_repository_is_converted_and_trains(endpoint, user, tiny_base_model, celery_worker):
    from helpers import make_ready_dataset

    client = api_for(user)
    look = pull(client, "gguf-org/tiny-GGUF", confirm=False).json()
    assert look["kind"] == "gguf" and [f["name"] for f in look["files"]] == ["tiny-f16.gguf", "README.md"]
    assert look["needed_bytes"] > look["total_bytes"], "room for the converted folder is asked for too"
    started = pull(client, "gguf-org/tiny-GGUF")
    assert started.status_code == 202, started.content
    model = wait_pull(client, started.json()["id"], celery_worker)
    assert model["status"] == "ready", model
    assert model["architecture"] == "LlamaForCausalLM" and model["parameters"] > 0 and model["has_chat_template"]
    folder = Path(BaseModel.objects.get(pk=model["id"]).path)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))

    job = client.post("/api/v1/jobs", {"dataset": make_ready_dataset(user).pk, "base_model": model["id"],
                                       "method": "lora", "overrides": TRAIN_QUICKLY},
                      content_type="application/json")
    assert job.status_code == 201, job.content
    done = wait_for(lambda: (j := client.get(f"/api/v1/jobs/{job.json()['id']}").json())["status"]
                    not in ("queued", "running") and j, timeout=300, what="training", log_proc=celery_worker)
    assert done["status"] == "succeeded", done.get("error")


def test_the_site_token_pulls_a_gated_model_for_everyone(endpoint, hub, user, other_user, django_user_model,
                                                         celery_worker):
    admin = django_user_model.objects.create_user("root", password="root-pw", is_staff=True, is_superuser=True)
    refused = api_for(user).post("/api/v1/hub-token", {"token": SITE_TOKEN, "site": True},
                                 content_type="application/json")
    assert refused.status_code == 403
    saved = api_for(admin).post("/api/v1/hub-token", {"token": SITE_TOKEN, "site": True},
                                content_type="application/json")
    assert saved.status_code == 200 and saved.json()["site_set"] is True and SITE_TOKEN not in saved.content.decode()
    status = api_for(user).get("/api/v1/hub-token").json()
    assert status["user_set"] is False and status["site_set"] is True

    started = pull(api_for(user), "site-org/tiny-gated")
    assert started.status_code == 202, started.content
    model = wait_pull(api_for(user), started.json()["id"], celery_worker)
    assert model["status"] == "ready" and model["shared"] and model["license"] == "llama3.2"
    assert ("GET", "/site-org/tiny-gated/resolve/" + BaseModel.objects.get(pk=model["id"]).hub_commit
            + "/model.safetensors", f"Bearer {SITE_TOKEN}") in hub.requests, "the site token was sent to the Hub"
    second = pull(api_for(other_user), "site-org/tiny-gated")
    assert second.status_code == 200 and second.json()["id"] == model["id"], "one shared row"
    assert BaseModel.objects.filter(hub_repo="site-org/tiny-gated").count() == 1

    texts = [Path(celery_worker.log_path).read_text(errors="replace")]
    for who in (user, other_user, admin):
        page = Client()
        page.force_login(who)
        texts += [page.get("/models/").content.decode(), page.get(f"/api/v1/base-models/{model['id']}").content
                  .decode(), page.get("/api/v1/base-models").content.decode(),
                  page.get("/api/v1/hub-token").content.decode()]
    assert "Site token: set on" in texts[1] and "Your token: not set" in texts[1], "the user's Models page"
    for text in texts:
        assert SITE_TOKEN not in text


@pytest.fixture
def model_without_template(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    model = make_base_model(folder, name="tiny-no-template", default=False)
    BaseModel.objects.filter(pk=model.pk).update(has_chat_template=False)
    return model


def test_a_model_without_a_chat_template_trains_with_the_one_chosen(user, tiny_base_model, model_without_template,
                                                                   celery_worker):
    from helpers import make_ready_dataset

    from finetune.chat_templates import ZEPHYR

    page = Client()
    page.force_login(user)
    form = page.get("/jobs/new/").content.decode()
    assert 'name="chat_template"' in form and 'value="zephyr"' in form and 'value="chatml"' in form
    models_page = page.get("/models/").content.decode()
    assert "no (pick one on the train page)" in models_page

    client = api_for(user)
    dataset = make_ready_dataset(user)
    bad = client.post("/api/v1/jobs", {"dataset": dataset.pk, "base_model": model_without_template.pk,
                                       "method": "lora", "overrides": {**TRAIN_QUICKLY, "chat_template": "alpaca"}},
                      content_type="application/json")
    assert bad.status_code == 400 and "Unknown chat template 'alpaca'" in bad.json()["error"]["message"]

    job = client.post("/api/v1/jobs", {"dataset": dataset.pk, "base_model": model_without_template.pk,
                                       "method": "lora", "overrides": {**TRAIN_QUICKLY, "chat_template": "zephyr"}},
                      content_type="application/json")
    assert job.status_code == 201, job.content
    done = wait_for(lambda: (j := client.get(f"/api/v1/jobs/{job.json()['id']}").json())["status"]
                    not in ("queued", "running") and j, timeout=300, what="training", log_proc=celery_worker)
    assert done["status"] == "succeeded", done.get("error")
    adapter = Path(AdapterVersion.objects.get(job_id=job.json()["id"]).path)
    assert (adapter / "chat_template.jinja").read_text() == ZEPHYR, "trained with the chosen template, saved with it"

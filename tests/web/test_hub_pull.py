"""Pulling base models from the Hugging Face Hub (issue 34), through the REST API, a real Celery worker and the real
huggingface_hub client, against a local server in the Hub's layout (hub_fake.py): look before pulling, pull, watch
the progress, train on the result, cancel, gated repositories and tokens, sharing, isolation, clear refusals."""
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.test import Client

from jobs.models import BaseModel, HubToken

from .conftest import wait_for
from .hub_fake import FakeHub, FakeRepo, api_for, model_files, pointed_at

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]
GATED_TOKEN = "hf_gatedSecretToken0123456789"
BIG = 40 * 1024 * 1024


@pytest.fixture(scope="module")
def hub(tiny_model_dir):
    server = FakeHub()
    files = model_files(tiny_model_dir, **{"README.md": b"---\nlicense: apache-2.0\n---\n# tiny\n",
                                           "LICENSE": b"Apache License 2.0\n", "pytorch_model.bin": b"pickle",
                                           "modeling_tiny.py": b"import os\n", "onnx/model.onnx": b"onnx"})
    server.repos["tiny-org/tiny-llama"] = FakeRepo(files)
    server.repos["gated-org/tiny-gated"] = FakeRepo(dict(files), gated=True, token=GATED_TOKEN, license="llama3.2")
    slow = dict(files, **{"z-padding.safetensors": b"\0" * BIG})
    server.repos["slow-org/tiny-slow"] = FakeRepo(slow, delay=0.05)
    server.repos["pickle-org/only-bin"] = FakeRepo({"config.json": files["config.json"], "pytorch_model.bin": b"x"})
    yield server
    server.close()


@pytest.fixture
def endpoint(hub, settings):
    yield from pointed_at(hub, settings)


def pull(client, repo_id, confirm=True, **extra):
    return client.post("/api/v1/base-models/pull", {"repo_id": repo_id, "confirm": confirm, **extra},
                       content_type="application/json")


def wait_pull(client, model_id, worker, until=("ready", "failed", "cancelled")):
    return wait_for(lambda: (m := client.get(f"/api/v1/base-models/{model_id}").json())["status"] in until and m,
                    what=f"pull {model_id} to reach {until}", log_proc=worker, timeout=180)


def test_look_then_pull_a_public_model_then_train_on_it(endpoint, user, tiny_base_model, celery_worker):
    from helpers import make_ready_dataset

    client = api_for(user)
    preview = pull(client, "tiny-org/tiny-llama", confirm=False)
    assert preview.status_code == 200, preview.content
    look = preview.json()
    names = {f["name"] for f in look["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json", "LICENSE", "README.md"} <= names
    assert not names & {"pytorch_model.bin", "modeling_tiny.py", "onnx/model.onnx"}, "no pickles, code or subfolders"
    assert look["total_bytes"] > 0 and look["disk_ok"] and look["license"] == "apache-2.0"
    assert look["architecture"] == "LlamaForCausalLM" and look["context_length"] == 512
    # the fake Hub states no safetensors metadata (as many repositories): the count comes from config.json alone
    assert look["parameters"] > 0
    assert not BaseModel.objects.filter(hub_repo="tiny-org/tiny-llama").exists(), "looking creates nothing"

    started = pull(client, "tiny-org/tiny-llama")
    assert started.status_code == 202, started.content
    model = wait_pull(client, started.json()["id"], celery_worker)
    assert model["status"] == "ready", model
    assert model["bytes_done"] == model["bytes_total"] == look["total_bytes"]
    assert model["architecture"] == "LlamaForCausalLM" and model["parameters"] > 0 and model["size_bytes"] > 0
    assert model["license"] == "apache-2.0" and model["has_chat_template"] and model["shared"]
    folder = Path(BaseModel.objects.get(pk=model["id"]).path)
    assert folder.is_relative_to(django_settings.MODEL_DIR) and not (folder / ".cache").exists()
    assert not (folder / "pytorch_model.bin").exists()

    dataset = make_ready_dataset(user)
    job = client.post("/api/v1/jobs", {"dataset": dataset.pk, "base_model": model["id"], "method": "lora",
                                       "overrides": {"max_steps": 6, "micro_batch": 4, "grad_accum": 1,
                                                     "learning_rate": 3e-3,
                                                     "max_seq_len": 64, "max_eval_generations": 0,
                                                     "early_stopping_patience": 0}},
                      content_type="application/json")
    assert job.status_code == 201, job.content
    done = wait_for(lambda: (j := client.get(f"/api/v1/jobs/{job.json()['id']}").json())["status"]
                    not in ("queued", "running") and j, timeout=300, what="training", log_proc=celery_worker)
    assert done["status"] == "succeeded", done


def test_two_users_pulling_the_same_model_store_it_once(endpoint, user, other_user, celery_worker):
    first = pull(api_for(user), "tiny-org/tiny-llama")
    second = pull(api_for(other_user), "tiny-org/tiny-llama")
    assert first.status_code == 202 and second.status_code in (200, 202)
    assert first.json()["id"] == second.json()["id"], "one shared row for a public repository and commit"
    wait_pull(api_for(user), first.json()["id"], celery_worker)
    assert BaseModel.objects.filter(hub_repo="tiny-org/tiny-llama").count() == 1
    again = pull(api_for(other_user), "tiny-org/tiny-llama", confirm=False).json()
    assert again["existing"] == first.json()["id"] and again["needed_bytes"] == 0


def test_progress_moves_and_a_pull_can_be_cancelled(endpoint, hub, user, celery_worker):
    client = api_for(user)
    started = pull(client, "slow-org/tiny-slow")
    assert started.status_code == 202, started.content
    model_id = started.json()["id"]
    moving = wait_for(lambda: (m := client.get(f"/api/v1/base-models/{model_id}").json())["bytes_done"] > 0
                      and m, what="download progress", log_proc=celery_worker)
    assert moving["status"] == "downloading" and 0 < moving["bytes_done"] < moving["bytes_total"]
    cancelled = client.post(f"/api/v1/base-models/{model_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    folder = Path(BaseModel.objects.get(pk=model_id).path)
    partial = folder.with_name(folder.name + ".partial")
    wait_for(lambda: not partial.exists(), what="partial files removed", log_proc=celery_worker)
    assert not folder.exists()
    assert client.post(f"/api/v1/base-models/{model_id}/cancel").status_code == 409
    other = api_for(user)
    assert other.get("/api/v1/base-models").status_code == 200


def test_a_gated_model_needs_a_token_that_is_never_shown_again(endpoint, user, other_user, celery_worker):
    client = api_for(user)
    refused = pull(client, "gated-org/tiny-gated", confirm=False)
    assert refused.status_code == 400
    assert "gated" in refused.json()["error"]["message"] and "token" in refused.json()["error"]["message"]

    bad = client.post("/api/v1/hub-token", {"token": "not a token!"}, content_type="application/json")
    assert bad.status_code == 400
    set_token = client.post("/api/v1/hub-token", {"token": GATED_TOKEN}, content_type="application/json")
    assert set_token.status_code == 200 and set_token.json()["user_set"] is True
    assert GATED_TOKEN not in set_token.content.decode()
    assert GATED_TOKEN not in HubToken.objects.get(owner=user).encrypted, "encrypted at rest"
    assert api_for(other_user).get("/api/v1/hub-token").json()["user_set"] is False

    started = pull(client, "gated-org/tiny-gated")
    assert started.status_code == 202, started.content
    model = wait_pull(client, started.json()["id"], celery_worker)
    assert model["status"] == "ready" and not model["shared"] and model["license"] == "llama3.2"
    assert api_for(other_user).get(f"/api/v1/base-models/{model['id']}").status_code == 404, "theirs alone"
    assert pull(api_for(other_user), "gated-org/tiny-gated").status_code == 400, "no token, no access"

    client.force_login(user)
    for text in (client.get("/models/").content.decode(), client.get("/api/v1/base-models").content.decode(),
                 client.get("/api/v1/hub-token").content.decode(),
                 Path(celery_worker.log_path).read_text(errors="replace")):
        assert GATED_TOKEN not in text


@pytest.mark.parametrize("repo_id, words", [
    ("not a repo id!", "is not a Hub model id"),
    ("nobody/nothing-here", "No model 'nobody/nothing-here' was found"),
    ("pickle-org/only-bin", "only pickled PyTorch weights"),
])
def test_clear_refusals(endpoint, user, repo_id, words):
    response = pull(api_for(user), repo_id)
    assert response.status_code == 400 and words in response.json()["error"]["message"], response.content
    assert not BaseModel.objects.filter(hub_repo=repo_id).exists()


def test_not_enough_disk_is_refused_before_anything_is_downloaded(endpoint, user, settings):
    settings.HUB_DISK_RESERVE_BYTES = 10**18
    look = pull(api_for(user), "tiny-org/tiny-llama", confirm=False).json()
    assert look["disk_ok"] is False
    response = pull(api_for(user), "tiny-org/tiny-llama")
    assert response.status_code == 400 and "Not enough free disk space" in response.json()["error"]["message"]


def test_remote_code_is_an_administrators_decision(endpoint, user):
    response = pull(api_for(user), "tiny-org/tiny-llama", trust_remote_code=True)
    assert response.status_code == 403 and "administrators" in response.json()["error"]["message"]


def test_a_model_still_downloading_is_planned_for_but_not_offered_for_training(endpoint, user, tiny_base_model):
    model = BaseModel.objects.create(owner=None, name="pending/model", path="/nonexistent", status="downloading",
                                     hub_repo="pending/model", config=tiny_base_model.config,
                                     architecture=tiny_base_model.architecture, model_type="llama")
    client = Client()
    client.force_login(user)
    page = client.get("/jobs/new/").content.decode()
    assert f'value="{model.pk}"' not in page and f'value="{tiny_base_model.pk}"' in page

    from helpers import make_ready_dataset

    dataset = make_ready_dataset(user)
    api = api_for(user)
    plan = api.post("/api/v1/plans", {"dataset": dataset.pk, "base_model": model.pk, "method": "lora"},
                    content_type="application/json")
    assert plan.status_code == 200 and plan.json()["method"] == "lora", "planned from its config.json alone"
    job = api.post("/api/v1/jobs", {"dataset": dataset.pk, "base_model": model.pk, "method": "lora"},
                   content_type="application/json")
    assert job.status_code == 409 and "not ready" in job.json()["error"]["message"]


def test_the_models_page_looks_pulls_and_follows_the_download(endpoint, user, celery_worker):
    client = Client()
    client.force_login(user)
    look = client.post("/models/", {"action": "look", "repo_id": "tiny-org/tiny-llama"})
    page = look.content.decode()
    assert look.status_code == 200 and 'id="pull-confirm"' in page
    assert "apache-2.0" in page and "LlamaForCausalLM" in page and "to download" in page
    assert client.post("/models/", {"action": "look", "repo_id": "nobody/nothing-here"}).status_code == 400

    assert client.post("/models/", {"action": "pull", "repo_id": "tiny-org/tiny-llama"}).status_code == 302
    model = BaseModel.objects.get(hub_repo="tiny-org/tiny-llama")
    wait_for(lambda: 'data-status="ready"' in client.get(f"/models/{model.pk}/progress").content.decode(),
             what="the page's progress to reach ready", log_proc=celery_worker, timeout=180)
    row = client.get("/models/").content.decode()
    assert "Hub tiny-org/tiny-llama" in row and "everyone" in row

    saved = client.post("/models/", {"action": "token", "token": GATED_TOKEN})
    assert saved.status_code == 302
    page = client.get("/models/").content.decode()
    assert "Your token: set on" in page and GATED_TOKEN not in page
    refused = client.post("/models/", {"action": "site-token", "token": GATED_TOKEN})
    assert refused.status_code == 400 and "for administrators" in refused.content.decode()
    assert not HubToken.objects.filter(owner__isnull=True).exists()


def test_the_command_line_client_pulls_a_model(live_server, endpoint, user, celery_worker, tmp_path):
    import os
    import subprocess
    import sys

    script = Path(sys.executable).with_name("tunedeck")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tunedeck.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEDECK_")}
    env.update(HOME=str(tmp_path), TUNEDECK_CONFIG=str(tmp_path / "config.json"))
    subprocess.run([*command, "login", "--url", live_server.url, "-u", "alice", "--password", "alice-pw"],
                   env=env, check=True, capture_output=True, timeout=120)
    def cli(*args, timeout=120):
        return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    looked = cli("pull-model", "tiny-org/tiny-llama", "--look")
    assert looked.returncode == 0 and "licence apache-2.0" in looked.stdout, looked.stderr
    assert not BaseModel.objects.filter(hub_repo="tiny-org/tiny-llama").exists()
    pulled = cli("pull-model", "tiny-org/tiny-llama", timeout=240)
    assert pulled.returncode == 0 and "is ready" in pulled.stdout, pulled.stdout + pulled.stderr
    refused = cli("pull-model", "nobody/nothing-here")
    assert refused.returncode != 0 and "No model 'nobody/nothing-here' was found" in refused.stderr

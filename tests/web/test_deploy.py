"""One-click deploy through the REST API with a real Celery worker (merges) and a real inference server process
(`manage.py serve_inference`): merged and unmerged deployments go live and answer like their adapter, rollback
and stop, merge failures, export, and other users' deployments stay invisible.

The fixtures here (trained tiny adapters, versions made without a training job run) are imported by
tests/web/test_openai_api.py and tests/browser/test_deploy_browser.py too; the inference server they share is
tests/conftest.py's. It keeps at most 2 adapters per base loaded, so the multi-LoRA test sees least-recently-used
eviction.
"""
import io
import json
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

# Each tiny adapter learns one answer to "ping", so each deployment's behaviour is known.
ANSWERS = {"pong": "lora", "bonjour": "lora", "chat": "adapter"}
PING = [{"role": "user", "content": "ping"}]


# ---------------------------------------------------------------- fixtures shared with the other deploy tests


def _train(base_dir: Path, out_dir: Path, method: str, answer: str) -> Path:
    from tinymodel import write_jsonl

    from finetune.train import TrainSpec, train

    if (out_dir / "adapter_config.json").is_file():
        return out_dir
    rows = [{"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": answer}]}] * 32
    data = write_jsonl(out_dir.with_suffix(".jsonl"), rows)
    plan = {"method": method, "rank": 8, "alpha": 16, "micro_batch": 8, "grad_accum": 1, "max_seq_len": 64,
            "learning_rate": 3e-2, "max_steps": 12, "warmup_ratio": 0.0, "max_new_tokens": 4,
            "max_eval_generations": 1, "device": "cpu", "adapter_bottleneck": 16}
    spec = TrainSpec.from_plan(plan, base_model_path=str(base_dir), train_file=str(data), eval_file=str(data),
                               output_dir=str(out_dir))
    result = train(spec)
    assert result.generations[0]["output"] == answer, result.generations
    return out_dir


class _TrainedOnFirstUse(dict):
    """answer -> adapter folder; each adapter is trained the first time a test asks for it."""

    def __init__(self, base_dir: Path, root: Path):
        super().__init__()
        self.base_dir, self.root = base_dir, root

    def __missing__(self, answer):
        self[answer] = _train(self.base_dir, self.root / answer, ANSWERS[answer], answer)
        return self[answer]


@pytest.fixture(scope="session")
def trained_adapters(tiny_model_dir, tmp_path_factory):
    """Tiny adapters trained once per session (cached on disk, so every module importing this shares them)."""
    root = tmp_path_factory.getbasetemp() / "deploy-adapters"
    root.mkdir(exist_ok=True)
    return _TrainedOnFirstUse(tiny_model_dir, root)


def make_version(user, base_model, adapter_dir, line_name, method=None, *, break_it=False):
    """Records a copy of a trained adapter as the next version of `line_name`, as a finished job would."""
    from jobs.models import Dataset, FineTuneJob
    from jobs.services.version_recording import record_adapter_version

    method = method or json.loads((Path(adapter_dir) / "tunedeck.json").read_text())["method"]
    dataset = Dataset.objects.create(owner=user, name="ping", content_hash=uuid.uuid4().hex, file_path="/dev/null",
                                     status=Dataset.Status.READY)
    plan = {"method": method, "rank": 8}
    job = FineTuneJob.objects.create(owner=user, base_model=base_model, dataset=dataset, method=method,
                                     plan=plan, adapter_name=line_name, status="succeeded")
    from django.conf import settings

    copy = Path(settings.DATA_DIR) / "test-adapter-copies" / uuid.uuid4().hex
    shutil.copytree(adapter_dir, copy)
    if break_it:
        (copy / "adapter_model.safetensors").unlink()
    return record_adapter_version(job, copy, {"train_loss": 0.1}, [], plan)


@pytest.fixture
def serving(settings, inference_server, celery_worker):
    """The web side (live_server runs in this process) pointed at the test inference server."""
    settings.TUNEDECK_INFERENCE_URL = inference_server
    return inference_server


def served_models(url: str) -> list[dict]:
    """What the inference server holds now (its internal, token-guarded GET /models)."""
    from jobs.deploy import internal_token

    response = requests.get(f"{url}/models", headers={"X-Tunedeck-Internal": internal_token()}, timeout=10)
    response.raise_for_status()
    return response.json()["models"]


def api_session(live_server, token):
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    session.base = f"{live_server.url}/api/v1"
    return session


def wait_status(api, deployment_id, wanted=("live", "failed", "stopped"), timeout=120, worker=None):
    return wait_for(
        lambda: (d := api.get(f"{api.base}/deployments/{deployment_id}").json())["status"] in wanted and d,
        timeout=timeout, interval=0.3, what=f"deployment {deployment_id} to be {'/'.join(wanted)}",
        log_proc=worker,
    )


def deploy(api, version_id, worker=None, **body):
    response = api.post(f"{api.base}/adapter-versions/{version_id}/deploy", json=body)
    assert response.status_code == 202, response.text
    created = response.json()["deployment"]
    assert {"id", "name", "status", "endpoint"} <= set(created)
    return created, wait_status(api, created["id"], worker=worker)


def chat(live_server, token, model, messages=PING, **extra):
    response = requests.post(
        f"{live_server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
        json={"model": model, "messages": messages, "max_tokens": 8, "temperature": 0, **extra}, timeout=120,
    )
    return response


def answer(live_server, token, model):
    response = chat(live_server, token, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture
def alice(live_server, user, token_for):
    token = token_for(user)
    session = api_session(live_server, token)
    session.token = token
    return session


# ---------------------------------------------------------------- tests


def test_merged_lora_deploys_goes_live_answers_and_exports(
    alice, live_server, user, tiny_base_model, trained_adapters, serving, celery_worker
):
    version = make_version(user, tiny_base_model, trained_adapters["pong"], "ping-pong")
    created, deployment = deploy(alice, version.pk, celery_worker, merge=True)
    assert created["status"] == "merging" and created["name"] == "ping-pong"
    assert deployment["status"] == "live", deployment
    assert deployment["endpoint"] == f"{live_server.url}/v1"
    assert deployment["details"]["merged"] is True
    merge = deployment["details"]["merge"]
    assert merge["max_abs_diff"] <= merge["tolerance"]
    assert answer(live_server, alice.token, "ping-pong") == "pong"

    listing = alice.get(f"{alice.base}/deployments").json()
    assert [d["name"] for d in listing["results"]] == ["ping-pong"]

    export = alice.get(f"{alice.base}/deployments/{deployment['id']}/export")
    assert export.status_code == 200 and export.headers["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(export.content))
    names = set(archive.namelist())
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "tunedeck-merge.json"} <= names
    assert "chat_template" in archive.read("tokenizer_config.json").decode() or "chat_template.jinja" in names

    # The pages: the list, the deployment with its export commands.
    from django.test import Client

    client = Client()
    client.force_login(user)
    page = client.get("/deployments/").content.decode()
    assert "ping-pong" in page and "live" in page
    detail = client.get(f"/deployments/{deployment['id']}/").content.decode()
    assert "vllm serve ./ping-pong" in detail and "--enable-lora" in detail
    assert "text-generation-inference" in detail and "LORA_ADAPTERS=ping-pong=" in detail
    download = client.get(f"/deployments/{deployment['id']}/export")
    assert download.status_code == 200 and zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content)))


def test_adapter_layers_cannot_merge_so_they_deploy_unmerged(
    alice, live_server, user, tiny_base_model, trained_adapters, serving, celery_worker
):
    version = make_version(user, tiny_base_model, trained_adapters["chat"], "layers")
    assert version.method == "adapter"
    created, deployment = deploy(alice, version.pk, celery_worker, merge=True)
    assert created["status"] == "loading", "an unmergeable method skips the merge"
    assert deployment["status"] == "live", deployment
    details = deployment["details"]
    assert details["merged"] is False and "adapter layers" in details["unmerged_reason"]
    assert "unmerged" in details["serving"]
    assert answer(live_server, alice.token, "layers") == "chat"
    export = alice.get(f"{alice.base}/deployments/{deployment['id']}/export")
    assert export.status_code == 409 and export.json()["error"]["code"] == "not_merged"


def test_rollback_repoints_the_name_and_stop_undeploys(
    alice, live_server, user, tiny_base_model, trained_adapters, serving, celery_worker
):
    v1 = make_version(user, tiny_base_model, trained_adapters["pong"], "greeter")
    v2 = make_version(user, tiny_base_model, trained_adapters["bonjour"], "greeter")
    _, first = deploy(alice, v1.pk, celery_worker, merge=False)
    assert first["status"] == "live" and answer(live_server, alice.token, "greeter") == "pong"

    # Deploying v2 of the same adapter repoints the same model name.
    created, deployment = deploy(alice, v2.pk, celery_worker, merge=True)
    assert created["id"] == first["id"] and deployment["version"] == v2.pk
    assert deployment["status"] == "live", deployment
    assert answer(live_server, alice.token, "greeter") == "bonjour"

    response = alice.post(f"{alice.base}/deployments/{deployment['id']}/rollback")
    assert response.status_code == 202, response.text
    assert response.json()["version"] == v1.pk
    rolled = wait_status(alice, deployment["id"], worker=celery_worker)
    assert rolled["status"] == "live" and rolled["version"] == v1.pk, rolled
    assert rolled["details"]["rolled_back_from"] == "greeter v2"
    assert rolled["details"]["merged"] is True, "the rollback keeps the merge choice"
    assert answer(live_server, alice.token, "greeter") == "pong"

    again = alice.post(f"{alice.base}/deployments/{deployment['id']}/rollback")
    assert again.status_code == 409 and again.json()["error"]["code"] == "no_previous_version"

    stopped = alice.post(f"{alice.base}/deployments/{deployment['id']}/stop")
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    models = requests.get(f"{live_server.url}/v1/models", headers={"Authorization": f"Bearer {alice.token}"})
    assert models.json()["data"] == []
    gone = chat(live_server, alice.token, "greeter")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    # The inference server lets go of it within a poll.
    wait_for(lambda: not served_models(serving), timeout=10,
             what="the inference server to unload the stopped deployment")


def test_merge_failure_fails_the_deployment_with_the_reason(
    alice, user, tiny_base_model, trained_adapters, serving, celery_worker
):
    version = make_version(user, tiny_base_model, trained_adapters["pong"], "broken", break_it=True)
    _, deployment = deploy(alice, version.pk, celery_worker, merge=True)
    assert deployment["status"] == "failed"
    assert "adapter_model.safetensors" in deployment["error"], deployment["error"]


def test_pages_deploy_stop_and_rollback(client, user, tiny_base_model, trained_adapters, serving, celery_worker):
    from jobs.models import Deployment

    v1 = make_version(user, tiny_base_model, trained_adapters["pong"], "clicks")
    v2 = make_version(user, tiny_base_model, trained_adapters["bonjour"], "clicks")
    client.force_login(user)
    assert 'id="deploy-button"' in client.get(f"/versions/{v2.pk}/").content.decode()
    response = client.post(f"/versions/{v2.pk}/deploy", {})  # merge box unticked
    deployment = Deployment.objects.get(owner=user)
    assert response.status_code == 302 and response["Location"] == f"/deployments/{deployment.pk}/"
    assert deployment.merge is False and deployment.version == v2
    fragment = client.get("/deployments/", HTTP_HX_REQUEST="true").content.decode()
    assert 'id="deployment-rows"' in fragment and 'hx-trigger="every 2s"' in fragment and "clicks" in fragment
    wait_for(lambda: Deployment.objects.get(pk=deployment.pk).status == "live", timeout=60, what="live")
    client.post(f"/deployments/{deployment.pk}/rollback", {"next": "/deployments/"})
    deployment.refresh_from_db()
    assert deployment.version == v1
    client.post(f"/deployments/{deployment.pk}/stop")
    deployment.refresh_from_db()
    assert deployment.status == "stopped"


def test_other_users_see_nothing(
    alice, live_server, user, other_user, tiny_base_model, trained_adapters, serving, token_for, client
):
    version = make_version(user, tiny_base_model, trained_adapters["pong"], "private")
    created = alice.post(f"{alice.base}/adapter-versions/{version.pk}/deploy", json={"merge": False}).json()
    deployment_id = created["deployment"]["id"]
    bob = api_session(live_server, token_for(other_user))
    assert bob.get(f"{bob.base}/deployments/{deployment_id}").status_code == 404
    assert bob.get(f"{bob.base}/deployments").json()["results"] == []
    for action in ("stop", "rollback"):
        response = bob.post(f"{bob.base}/deployments/{deployment_id}/{action}")
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert bob.get(f"{bob.base}/deployments/{deployment_id}/export").status_code == 404
    assert bob.post(f"{bob.base}/adapter-versions/{version.pk}/deploy", json={}).status_code == 404
    # A name taken by someone else cannot be claimed.
    own = make_version(other_user, tiny_base_model, trained_adapters["pong"], "mine")
    taken = bob.post(f"{bob.base}/adapter-versions/{own.pk}/deploy", json={"name": "private"})
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "name_taken"
    client.force_login(other_user)
    for url in (f"/deployments/{deployment_id}/", f"/deployments/{deployment_id}/chat/",
                f"/deployments/{deployment_id}/export"):
        assert client.get(url).status_code == 404
    assert client.post(f"/deployments/{deployment_id}/stop").status_code == 404
    assert alice.get(f"{alice.base}/deployments/{deployment_id}").json()["status"] != "stopped"


def test_web_modules_never_import_torch():
    code = (
        "import sys, django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tunedeck.settings'); "
        "django.setup(); import tunedeck.urls, jobs.deploy, jobs.deploy_views, jobs.openai_views, "
        "jobs.api.deploy_views, jobs.tasks; "
        "from django.urls import reverse; reverse('openai-chat'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_inference_server_refuses_requests_without_the_internal_token(serving):
    body = {"model": "anything", "messages": PING}
    assert requests.post(f"{serving}/v1/chat/completions", json=body).status_code == 401
    assert requests.get(f"{serving}/models").status_code == 401
    # The token is random (jobs.deploy.internal_token), not the HMAC of SECRET_KEY it once was.
    import hashlib
    import hmac

    from django.conf import settings

    from jobs.deploy import internal_token

    derived = hmac.new(settings.SECRET_KEY.encode(), b"tunedeck-inference", hashlib.sha256).hexdigest()
    assert requests.get(f"{serving}/models", headers={"X-Tunedeck-Internal": derived}).status_code == 401
    assert requests.get(f"{serving}/models", headers={"X-Tunedeck-Internal": internal_token()}).status_code == 200
    health = requests.get(f"{serving}/health").json()
    assert health["ok"] is True and isinstance(health["models"], int), "liveness only: no names without the token"


def test_a_deployment_stuck_loading_points_at_the_inference_server(client, user, tiny_base_model, trained_adapters):
    from datetime import timedelta

    from django.utils import timezone

    from jobs.models import Deployment

    version = make_version(user, tiny_base_model, trained_adapters["pong"], "stuck")
    deployment = Deployment.objects.create(owner=user, version=version, name="stuck", status="loading",
                                           updated_at=timezone.now() - timedelta(minutes=5), revision=1)
    client.force_login(user)
    page = client.get(f"/deployments/{deployment.pk}/").content.decode()
    assert 'id="deployment-stalled"' in page and "manage.py serve_inference" in page
    Deployment.objects.filter(pk=deployment.pk).update(updated_at=timezone.now())
    assert 'id="deployment-stalled"' not in client.get(f"/deployments/{deployment.pk}/").content.decode()

"""Deleting an adapter version keeps the records of its stopped and failed deployments (issue 31): their name,
history and details stay listed and readable, they say the version was deleted, and "Deploy again" is disabled
with that reason; the version's files (adapter, merged model, GGUF) go. A live deployment still blocks the delete.
Both in the browser and through DELETE /api/v1/adapter-versions/<id>."""
from pathlib import Path

import pytest
from django.conf import settings

from jobs import deploy, deploy_worker
from jobs.models import AdapterVersion, Deployment
from jobs.versions import delete_version
from tests.web.test_versions import dataset, train_version  # noqa: F401 - the dataset fixture is used

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_versions(user, tiny_base_model, dataset, tmp_path):  # noqa: F811 - dataset is the imported fixture
    return (train_version(user, tiny_base_model, dataset, tmp_path, seed=1),
            train_version(user, tiny_base_model, dataset, tmp_path, seed=2))


def stopped_deployment(user, version, name="support", status=Deployment.Status.STOPPED):
    """A deployment of `version` as the product leaves it after a merged deploy and a stop: a merged folder with
    GGUF files beside it, and a history from an earlier version."""
    merged = deploy.merged_dir_for(version)
    gguf = Path(f"{merged}-gguf")
    for folder in (merged, gguf):
        folder.mkdir(parents=True, exist_ok=True)
    (merged / "model.safetensors").write_bytes(b"weights")
    (gguf / f"{name}-q8_0.gguf").write_bytes(b"gguf")
    history = [{"version": version.pk - 1, "label": "support v0", "status": "live", "until": "2026-11-01T10:00:00"}]
    details = {"version_label": version.label, "adapter_name": "support", "version_number": version.version,
               "method": "lora", "history": history, "gguf": {"q8_0": f"{name}-q8_0.gguf"}, "merged": True}
    return Deployment.objects.create(owner=user, version=version, name=name, status=status, path=str(merged),
                                     details=details, revision=3)


def test_deleting_a_version_in_the_browser_keeps_its_stopped_deployment(client, user, two_versions,
                                                                       django_capture_on_commit_callbacks):
    v1, v2 = two_versions
    deployment = stopped_deployment(user, v2)
    client.force_login(user)

    confirm = client.get(f"/versions/{v2.pk}/delete").content.decode()
    assert 'id="delete-keeps-deployments"' in confirm and ">support</a> (stopped)" in confirm

    with django_capture_on_commit_callbacks(execute=True):  # the files go once the delete is committed
        response = client.post(f"/versions/{v2.pk}/delete", {"confirm": "support v2"}, follow=True)
    assert "Deleted support v2; the deployment support (stopped) keeps its record." in response.content.decode()
    assert not AdapterVersion.objects.filter(pk=v2.pk).exists()
    assert not Path(v2.path).exists() and not Path(deployment.path).exists()
    assert not Path(f"{deployment.path}-gguf").exists()
    assert Path(v1.path).is_dir(), "only the deleted version's files go"

    deployment.refresh_from_db()
    assert deployment.version is None and deployment.path == "" and deployment.revision == 3
    assert deployment.details["deleted_version"]["label"] == "support v2"
    assert deployment.details["history"][0]["label"] == "support v0"

    listed = client.get("/deployments/").content.decode()
    assert ">support</a>" in listed and "support v2 <span" in listed and "(deleted)" in listed
    page = client.get(f"/deployments/{deployment.pk}/").content.decode()
    assert 'id="deployment-version-deleted"' in page and "support v0" in page
    assert 'id="redeploy-button" disabled' in page and "support v2 was deleted" in page
    assert 'id="rollback-button"' not in page
    assert client.get(f"/deployments/{deployment.pk}/export").status_code == 404
    assert client.get(f"/deployments/{deployment.pk}/gguf/q8_0").status_code == 404
    assert client.get(f"/deployments/{deployment.pk}/chat/").status_code == 200
    assert "support v2 (deleted)" in client.get("/").content.decode()
    rolled = client.post(f"/deployments/{deployment.pk}/rollback", follow=True).content.decode()
    assert "support v2 was deleted" in rolled


def test_deleting_through_the_api_keeps_stopped_and_failed_deployments(client, user, token_for, two_versions):
    v1, v2 = two_versions
    stopped = stopped_deployment(user, v2)
    failed = Deployment.objects.create(owner=user, version=v2, name="support-b", status=Deployment.Status.FAILED,
                                       error="merge check failed", details={"version_label": "support v2"})
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token_for(user)}"}

    assert client.delete(f"/api/v1/adapter-versions/{v2.pk}", **auth).status_code == 204
    shown = client.get(f"/api/v1/deployments/{stopped.pk}", **auth).json()
    assert shown["version"] is None and shown["name"] == "support" and shown["status"] == "stopped"
    assert shown["version_label"] == "support v2" and shown["version_deleted"]["id"] == v2.pk
    assert shown["details"]["history"][0]["label"] == "support v0"
    listed = {d["name"]: d for d in client.get("/api/v1/deployments", **auth).json()["results"]}
    assert listed["support-b"]["version_deleted"]["label"] == "support v2"
    assert listed["support-b"]["error"] == "merge check failed"

    export = client.get(f"/api/v1/deployments/{stopped.pk}/export", **auth)
    assert export.status_code == 410 and "support v2 was deleted" in export.json()["error"]["message"]
    assert client.get(f"/api/v1/deployments/{stopped.pk}/gguf/q8_0", **auth).status_code == 410
    rollback = client.post(f"/api/v1/deployments/{failed.pk}/rollback", **auth)
    assert rollback.status_code == 409 and rollback.json()["error"]["code"] == "version_deleted"

    # Deploying another version of the line, with no name, repoints the kept deployment: same name and id.
    redeployed = client.post(f"/api/v1/adapter-versions/{v1.pk}/deploy", {}, content_type="application/json",
                             **auth).json()["deployment"]
    assert redeployed["id"] == failed.pk and redeployed["version"] == v1.pk  # the line's latest deployment
    assert redeployed["version_deleted"] is None
    trail = redeployed["details"]["history"][-1]
    assert trail == {**trail, "version": v2.pk, "label": "support v2", "deleted": True}


def test_a_live_deployment_still_blocks_the_delete(client, user, token_for, two_versions):
    _, v2 = two_versions
    live = Deployment.objects.create(owner=user, version=v2, name="support", status=Deployment.Status.LIVE)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token_for(user)}"}
    refused = client.delete(f"/api/v1/adapter-versions/{v2.pk}", **auth)
    assert refused.status_code == 409 and refused.json()["error"]["details"]["deployments"][0]["name"] == "support"
    client.force_login(user)
    page = client.post(f"/versions/{v2.pk}/delete", {"confirm": "support v2"})
    assert page.status_code == 409 and 'id="delete-refused"' in page.content.decode()
    live.refresh_from_db()
    assert live.version_id == v2.pk and Path(v2.path).is_dir()


def test_workers_and_the_inference_server_skip_a_deployment_without_a_version(user, two_versions):
    """No deployment without a version should be merging or loading (the delete refuses it); if one ever is, the
    inference server does not try to load it and the merge task fails it with the reason."""
    _, v2 = two_versions
    deployment = stopped_deployment(user, v2)
    assert [d.pk for d in delete_version(v2)] == [deployment.pk]
    Deployment.objects.filter(pk=deployment.pk).update(status=Deployment.Status.LOADING)
    assert deployment.pk not in [spec["id"] for spec in deploy.serving_specs()]
    assert deploy_worker.run_deploy(deployment.pk, deployment.revision) == Deployment.Status.FAILED
    deployment.refresh_from_db()
    assert deployment.status == "failed" and "support v2 was deleted" in deployment.error
    assert str(settings.DEPLOYMENT_DIR) not in deployment.error

"""Generated from the URL configuration: every route that takes an object id (<int:pk>), page or API, is tried
by user B with each of user A's objects, with every HTTP method; B always gets 404 and A's objects are unchanged.
A new route with an id fails this test until it says which model its id names (ROUTE_MODELS)."""
import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from jobs.models import (
    AdapterLine,
    AdapterVersion,
    ApiToken,
    BaseModel,
    Dataset,
    Deployment,
    FineTuneJob,
    JobEvent,
    MetricPoint,
)

pytestmark = pytest.mark.django_db

# Route prefix (after /api/v1/ for the API) -> the model its <int:pk> names.
ROUTE_MODELS = {
    "datasets": "dataset",
    "jobs": "job",
    "versions": "version",
    "adapter-versions": "version",
    "deployments": "deployment",
    "tokens": "token",
    "base-models": "base_model",
    "models": "base_model",  # the Models page's pull progress and cancel (issue 34)
}
METHODS = ("get", "post", "put", "patch", "delete")


def id_routes():
    """(route template with {pk}, prefix) for every URL pattern with an <int:pk>, however deeply included."""
    found = []

    def walk(patterns, prefix):
        for p in patterns:
            route = prefix + str(p.pattern)
            if isinstance(p, URLResolver):
                walk(p.url_patterns, route)
            elif isinstance(p, URLPattern) and "<int:pk>" in route:
                found.append(route)

    walk(get_resolver().url_patterns, "")
    return sorted(set(found))


def model_for(route):
    parts = [p for p in route.split("/") if p and p not in ("api", "v1")]
    return ROUTE_MODELS.get(parts[0])


@pytest.fixture
def objects_of_a(user, tiny_base_model, tmp_path):
    """One of each kind of object, owned by A (alice)."""
    own_model = BaseModel.objects.create(owner=user, name="alice-model", path=str(tmp_path), config={})
    dataset = Dataset.objects.create(owner=user, name="a.jsonl", content_hash="a", file_path=str(tmp_path / "src"),
                                     status=Dataset.Status.READY, rows=10)
    job = FineTuneJob.objects.create(owner=user, base_model=tiny_base_model, dataset=dataset, method="lora",
                                     plan={"method": "lora"}, adapter_name="a", status="failed")
    JobEvent.objects.create(job=job, kind="queued", message="q")
    MetricPoint.objects.create(job=job, step=1, train_loss=1.0)
    line = AdapterLine.objects.create(owner=user, name="a")
    (tmp_path / "adapter").mkdir()
    version = AdapterVersion.objects.create(owner=user, line=line, version=1, job=job, base_model=tiny_base_model,
                                            dataset=dataset, method="lora", path=str(tmp_path / "adapter"))
    deployment = Deployment.objects.create(owner=user, version=version, name="a-deploy", status="live")
    token, _ = ApiToken.issue(user, name="a-token")
    return {"base_model": own_model, "dataset": dataset, "job": job, "version": version,
            "deployment": deployment, "token": token}


def snapshot(objects):
    return {kind: (type(obj).objects.filter(pk=obj.pk).values().first()) for kind, obj in objects.items()}


def test_every_id_route_is_known():
    routes = id_routes()
    assert len(routes) >= 30, routes  # the walk really reached the pages and the API
    unknown = [r for r in routes if model_for(r) is None]
    assert not unknown, f"say which model these routes' ids name in ROUTE_MODELS: {unknown}"


def test_user_b_gets_404_for_each_of_user_as_objects_everywhere(objects_of_a, other_user, token_for, client):
    before = snapshot(objects_of_a)
    client.force_login(other_user)  # pages (and the API through the session)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(other_user)}")
    tried = 0
    for route in id_routes():
        obj = objects_of_a[model_for(route)]
        path = "/" + route.replace("<int:pk>", str(obj.pk))
        for method in METHODS:
            for who, caller in (("page", client), ("token", api)):
                if who == "token" and not path.startswith("/api/"):
                    continue
                response = getattr(caller, method)(path)
                if response.status_code == 405:
                    continue  # the route does not take this method at all, for anyone
                assert response.status_code == 404, (who, method.upper(), path, response.status_code,
                                                     response.content[:300])
                tried += 1
    assert tried >= 40
    assert snapshot(objects_of_a) == before  # nothing of A's changed, nothing deleted


def test_ids_in_query_strings_and_bodies_are_404_too(objects_of_a, other_user, token_for, client):
    a = objects_of_a
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(other_user)}")
    assert api.get(f"/api/v1/adapter-versions/compare?ids={a['version'].pk}").status_code == 404
    assert api.post("/api/v1/plans", {"dataset": a["dataset"].pk}, format="json").status_code == 404
    assert api.post("/api/v1/plans", {"base_model": a["base_model"].pk}, format="json").status_code == 404
    assert api.post("/api/v1/jobs", {"dataset": a["dataset"].pk}, format="json").status_code == 404
    client.force_login(other_user)
    assert client.get(f"/versions/compare/?ids={a['version'].pk}&ids={a['version'].pk}").status_code in (400, 404)
    assert client.get(f"/jobs/new/?clone={a['job'].pk}").status_code == 404
    # Lists show none of A's objects.
    for path in ("/api/v1/datasets", "/api/v1/jobs", "/api/v1/adapter-versions", "/api/v1/deployments"):
        assert api.get(path).json()["results"] == [], path
    assert a["token"].pk not in [t["id"] for t in api.get("/api/v1/tokens").json()["results"]]
    assert [m["name"] for m in api.get("/api/v1/base-models").json()["results"]] == ["tiny-llama"]
    for page in ("/datasets/", "/jobs/", "/versions/", "/deployments/", "/tokens/"):
        body = client.get(page).content.decode()
        assert "a.jsonl" not in body and "a-deploy" not in body and "a-token" not in body, page

"""Registering a server folder as a base model (issue 31, isolation first): an admin action, from the configured
model roots only, never from the data directory; an ordinary user is refused the same way whatever the path, so the
answer says nothing about the server's disk. Driven through the API, the Models page, the command line client and
manage.py, as each kind of user would."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.management import CommandError, call_command
from django.test import Client
from drf_spectacular.generators import SchemaGenerator

from jobs.models import ApiToken, BaseModel

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def model_root(tmp_path, settings):
    root = tmp_path / "model-root"
    root.mkdir()
    settings.MODEL_ROOTS = [str(root)]
    return root


@pytest.fixture
def admin(django_user_model):
    return django_user_model.objects.create_user("root-admin", password="admin-pw", is_staff=True)


@pytest.fixture
def others_merged_model(tiny_model_dir, other_user):
    """Another user's merged fine-tune, where deploy puts it: inside the data directory."""
    folder = Path(django_settings.DEPLOYMENT_DIR) / f"user-{other_user.pk}" / "version-1-merged"
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    yield folder
    shutil.rmtree(folder.parent, ignore_errors=True)


def api_for(user) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {ApiToken.issue(user)[1]}")


def register(client, **body):
    return client.post("/api/v1/base-models", body, content_type="application/json")


def test_an_ordinary_user_is_refused_the_same_way_whatever_the_path(user, model_root, tiny_model_dir,
                                                                    others_merged_model, tiny_base_model):
    usable = model_root / "tiny"
    shutil.copytree(tiny_model_dir, usable)
    api = api_for(user)
    answers = []
    for path in [str(others_merged_model), "/root", "/etc/shadow", "/no/such/folder", str(usable), "", "relative"]:
        response = register(api, name="not-mine", path=path)
        assert response.status_code == 403, (path, response.content)
        answers.append(response.json())
    assert all(a == answers[0] for a in answers), answers  # nothing in the answer depends on the path
    assert answers[0]["error"]["code"] == "forbidden" and "administrator" in answers[0]["error"]["message"]
    assert register(api, name="x").status_code == 403  # even a malformed body
    assert not BaseModel.objects.exclude(pk=tiny_base_model.pk).exists()
    assert [m["name"] for m in api.get("/api/v1/base-models").json()["results"]] == ["tiny-llama"]


def test_an_ordinary_user_gets_no_form_and_a_plain_refusal_on_the_page(user, model_root, others_merged_model,
                                                                     tiny_base_model):
    page = Client()
    page.force_login(user)
    listing = page.get("/models/")
    assert listing.status_code == 200 and b"tiny-llama" in listing.content
    assert b"register-form" not in listing.content and str(model_root).encode() not in listing.content
    bodies = set()
    for path in [str(others_merged_model), "/etc/shadow", "/root"]:
        response = page.post("/models/", {"name": "not-mine", "path": path})
        assert response.status_code == 403
        assert path.encode() not in response.content and b"for administrators" in response.content
        bodies.add(re.search(rb'<p id="forbidden-reason">(.*?)</p>', response.content).group(1))
    assert len(bodies) == 1
    assert BaseModel.objects.count() == 1


def test_an_admin_registers_from_a_model_root_only(admin, model_root, tiny_model_dir, others_merged_model,
                                                   tmp_path, settings):
    api = api_for(admin)
    inside_data = register(api, name="stolen", path=str(others_merged_model))
    assert inside_data.status_code == 400 and "data directory" in inside_data.json()["error"]["message"]

    link = model_root / "looks-fine"
    link.symlink_to(others_merged_model, target_is_directory=True)  # a root may hold a link into the data dir
    assert "data directory" in register(api, name="linked", path=str(link)).json()["error"]["message"]

    outside = tmp_path / "elsewhere"
    shutil.copytree(tiny_model_dir, outside)
    response = register(api, name="outside", path=str(outside))
    assert response.status_code == 400 and "not inside a model root" in response.json()["error"]["message"]
    assert "absolute path" in register(api, name="rel", path="model-root/tiny").json()["error"]["message"]
    assert "data directory" in register(api, name="all", path="/").json()["error"]["message"]  # it holds the data dir

    remote = register(api, name="remote", path=str(outside), trust_remote_code=True)
    assert remote.status_code == 400 and "trust_remote_code" in remote.json()["error"]["message"]
    assert register(api, name="x", path=str(outside), owner=2).status_code == 400
    assert not BaseModel.objects.exists()

    shutil.copytree(tiny_model_dir, model_root / "tiny")
    created = register(api, name="tiny-shared", path=str(model_root / "tiny"))
    assert created.status_code == 201, created.content
    assert created.json()["shared"] is True and created.json()["architecture"] == "LlamaForCausalLM"
    private = register(api, name="tiny-mine", path=str(model_root / "tiny"), shared=False)
    assert private.status_code == 201 and private.json()["shared"] is False
    assert BaseModel.objects.get(name="tiny-mine").owner == admin

    settings.MODEL_ROOTS = []
    unset = register(api, name="again", path=str(model_root / "tiny"))
    assert unset.status_code == 400 and "TUNEDECK_MODEL_ROOTS" in unset.json()["error"]["message"]


def test_a_registered_shared_model_is_usable_by_everyone_and_a_private_one_only_by_its_admin(
        admin, user, model_root, tiny_model_dir):
    shutil.copytree(tiny_model_dir, model_root / "tiny")
    register(api_for(admin), name="team-model", path=str(model_root / "tiny"))
    register(api_for(admin), name="admins-own", path=str(model_root / "tiny"), shared=False)
    names = [m["name"] for m in api_for(user).get("/api/v1/base-models").json()["results"]]
    assert names == ["team-model"]


def test_an_admin_registers_on_the_page_and_sees_what_is_wrong(admin, model_root, tiny_model_dir,
                                                              others_merged_model):
    page = Client()
    page.force_login(admin)
    listing = page.get("/models/")
    assert b"register-form" in listing.content and str(model_root.resolve()).encode() in listing.content

    refused = page.post("/models/", {"name": "stolen", "path": str(others_merged_model), "shared": "on"})
    assert refused.status_code == 400 and b"data directory" in refused.content
    assert not BaseModel.objects.exists()

    shutil.copytree(tiny_model_dir, model_root / "tiny")
    done = page.post("/models/", {"name": "tiny-from-page", "path": str(model_root / "tiny"), "shared": "on"})
    assert done.status_code == 302
    model = BaseModel.objects.get(name="tiny-from-page")
    assert model.owner is None and model.path == str((model_root / "tiny").resolve())
    assert b"tiny-from-page" in page.get("/models/").content


def test_manage_py_register_model_keeps_to_the_model_roots(model_root, tiny_model_dir, others_merged_model, user):
    with pytest.raises(CommandError, match="data directory"):
        call_command("register_model", "stolen", str(others_merged_model))
    shutil.copytree(tiny_model_dir, model_root / "tiny")
    call_command("register_model", "for-alice", str(model_root / "tiny"), "--owner", user.username)
    assert BaseModel.objects.get(name="for-alice").owner == user  # an ordinary owner is fine: the shell is the admin


@pytest.mark.django_db(transaction=True)
def test_the_command_line_client_registers_as_admin_and_is_refused_as_a_user(live_server, admin, user, model_root,
                                                                             tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, model_root / "tiny")
    script = Path(sys.executable).with_name("tunedeck")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tunedeck.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEDECK_")}

    def cli(who, password, *args):
        home = tmp_path / who
        home.mkdir(exist_ok=True)
        run_env = {**env, "HOME": str(home), "TUNEDECK_CONFIG": str(home / "config.json")}
        subprocess.run([*command, "login", "--url", live_server.url, "-u", who, "--password", password],
                       env=run_env, check=True, capture_output=True, timeout=120)
        return subprocess.run([*command, *args], env=run_env, capture_output=True, text=True, timeout=120)

    refused = cli("alice", "alice-pw", "register-model", "mine", str(model_root / "tiny"))
    assert refused.returncode != 0 and "administrator" in refused.stderr
    done = cli("root-admin", "admin-pw", "register-model", "team", str(model_root / "tiny"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["shared"] is True


def test_no_other_api_route_takes_a_server_path():
    """Every request body in the API schema: the one field that names a place on the server's disk is the admin-only
    base-model registration's. A new field like it must be added here knowingly, with its own isolation test."""
    schema = SchemaGenerator().get_schema(request=None, public=True)
    components = schema["components"]["schemas"]
    pathlike = []
    for route, operations in schema["paths"].items():
        for method, operation in operations.items():
            for media in (operation.get("requestBody") or {}).get("content", {}).values():
                ref = media["schema"].get("$ref", "")
                properties = components.get(ref.rsplit("/", 1)[-1], {}).get("properties", {})
                pathlike += [f"{method.upper()} {route}: {name}" for name in properties
                             if any(word in name.lower() for word in ("path", "dir", "folder", "location"))]
    assert pathlike == ["POST /api/v1/base-models: path"], pathlike


def test_a_base_model_registered_inside_the_data_directory_before_the_fix_cannot_be_trained_on(
        user, other_user, others_merged_model, tiny_base_model):
    """Rows an ordinary user registered before registering became an admin action stay, but plan nothing."""
    import json as _json

    stolen = BaseModel.objects.create(owner=user, name="not-mine", path=str(others_merged_model),
                                      config=_json.loads((others_merged_model / "config.json").read_text()))
    api = api_for(user)
    response = api.post("/api/v1/plans", {"base_model": stolen.pk}, content_type="application/json")
    assert response.status_code == 400 and "data directory" in response.json()["error"]["message"], response.content
    assert api.post("/api/v1/plans", {"base_model": tiny_base_model.pk},
                    content_type="application/json").status_code == 200

"""Security settings and hostile input, in-process: production settings, CSRF on forms, login and inference rate
limits, uploads (streaming size limit, gzip bombs, filenames never paths, content sniffed), and model loading
(safetensors only, trust_remote_code only from the model row)."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from jobs import services
from jobs.models import Dataset
from jobs.services.dataset_processing import process_dataset
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_counters():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def mid_window_clock(monkeypatch):
    """The rate limits count in fixed windows of the clock (jobs/ratelimit.py): a test whose requests straddled a
    window's end would see two half-empty counters and no 429. Their clock is held 20 s into a minute."""
    from jobs import ratelimit

    held = 1_800_000_020.0

    class Clock:
        @staticmethod
        def time():
            return held

    monkeypatch.setattr(ratelimit, "time", Clock)


def settings_in(env):
    code = ("import json, django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tunedeck.settings');"
            "from django.conf import settings as s; django.setup();"
            "print(json.dumps({k: getattr(s, k, None) for k in ('DEBUG', 'SESSION_COOKIE_SECURE', "
            "'CSRF_COOKIE_SECURE', 'SECURE_SSL_REDIRECT', 'ALLOWED_HOSTS', 'SECURE_HSTS_SECONDS')}))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "TUNEDECK_DATA_DIR": "/tmp/tunedeck-settings-check", **env})


def test_production_settings():
    # Without a SECRET_KEY one is made in the data directory (tests/web/test_production_settings.py); a weak one
    # given by the operator is refused.
    weak = settings_in({"TUNEDECK_ENV": "production", "SECRET_KEY": "short"})
    assert weak.returncode != 0 and "at least 32 characters" in weak.stderr
    prod = settings_in({"TUNEDECK_ENV": "production", "SECRET_KEY": "x" * 50, "ALLOWED_HOSTS": "tunedeck.example",
                        "TUNEDECK_HTTPS": "1"})  # served over HTTPS by the operator's proxy
    assert prod.returncode == 0, prod.stderr
    values = json.loads(prod.stdout)
    assert values["DEBUG"] is False and values["SESSION_COOKIE_SECURE"] and values["CSRF_COOKIE_SECURE"]
    assert values["SECURE_SSL_REDIRECT"] and values["SECURE_HSTS_SECONDS"] > 0
    assert values["ALLOWED_HOSTS"] == ["tunedeck.example"]


def test_forms_need_the_csrf_token(user, tiny_base_model):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    assert browser.post("/tokens/", {"name": "x"}).status_code == 403
    assert browser.post("/jobs/new/", {"dataset": "1"}).status_code == 403
    page = browser.get("/tokens/")
    token = page.content.decode().split('name="csrfmiddlewaretoken" value="')[1].split('"')[0]
    assert browser.post("/tokens/", {"name": "x", "csrfmiddlewaretoken": token}).status_code == 200
    # The API through a browser session needs it too; with a Bearer token there is no cookie to ride on.
    assert browser.post("/api/v1/tokens", {"name": "y"}, content_type="application/json").status_code == 403


def test_login_rate_limit(user, settings, mid_window_clock):
    settings.TUNEDECK_LOGIN_RATE = "5/min"
    browser = Client()
    codes = [browser.post("/login/", {"username": "alice", "password": "wrong"}).status_code for _ in range(7)]
    assert codes[:5] == [200] * 5 and codes[5:] == [429, 429]
    refused = browser.post("/login/", {"username": "alice", "password": "alice-pw"})
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0  # even the right password waits


def test_inference_rate_limit(user, token_for, settings, mid_window_clock):
    settings.TUNEDECK_INFERENCE_RATE = "3/min"
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token_for(user)}"}
    codes = [Client().post("/v1/chat/completions", "{}", content_type="application/json", **headers).status_code
             for _ in range(5)]
    assert all(c != 429 for c in codes[:3]) and codes[3:] == [429, 429], codes


def test_bad_inference_bodies_get_openai_style_errors(user, token_for, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2**20
    api = Client(HTTP_AUTHORIZATION=f"Bearer {token_for(user)}")
    for path in ("/v1/chat/completions", "/v1/completions"):
        for body, status, code in [("{not json", 400, "invalid_json"), ("[1, 2]", 400, "invalid_json"),
                                   ('{"prompt": "' + "x" * (2**20 + 10) + '"}', 413, "request_too_large")]:
            response = api.post(path, body, content_type="application/json")
            assert response.status_code == status, (path, body[:20], response.content[:200])
            error = response.json()["error"]
            assert error["code"] == code and error["message"], error
    assert "1 MiB" in error["message"]


def test_upload_size_limit_while_streaming(user, token_for, settings):
    settings.MAX_UPLOAD_BYTES = 100_000
    api = Client(HTTP_AUTHORIZATION=f"Bearer {token_for(user)}")
    big = SimpleUploadedFile("big.jsonl", b'{"text": "x"}\n' * 20_000)
    response = api.post("/api/v1/datasets", {"file": big})
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
    assert not Dataset.objects.exists()
    assert not any(Path(settings.FILE_UPLOAD_TEMP_DIR).iterdir())  # the partial upload is not kept


def upload(user, name, content):
    dataset, _ = services.create_dataset(user, SimpleUploadedFile(name, content))
    process_dataset(dataset.pk)
    # A Celery worker left running by an earlier test may have claimed the upload's own task first (then the
    # call above returns at once): wait for whichever process has it.
    return wait_for(lambda: (d := Dataset.objects.get(pk=dataset.pk)).status != Dataset.Status.VALIDATING and d,
                    timeout=120, what="the dataset to be processed")


@pytest.mark.django_db(transaction=True)
def test_gzip_bomb_filename_and_content_sniffing(user, tiny_base_model, settings):
    line = json.dumps({"text": "a" * 200}).encode() + b"\n"
    bomb = gzip.compress(line * 400_000, compresslevel=6)  # 80 MB of rows in well under 1 MB
    assert len(bomb) < 1_000_000
    refused = upload(user, "bomb.jsonl.gz", bomb)
    assert refused.status == "invalid" and "gzip bomb" in refused.error

    rows = b"".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                            {"role": "assistant", "content": "hello"}]}).encode() + b"\n"
                    for i in range(12))
    sneaky = upload(user, "../../../../etc/cron.d/evil.csv", rows)  # JSONL content under a .csv path name
    assert sneaky.status == "ready" and sneaky.format == "jsonl", sneaky.error
    assert sneaky.original_filename == "evil.csv"
    stored = Path(sneaky.file_path).resolve()
    assert Path(settings.DATASET_DIR).resolve() in stored.parents and "evil" not in str(stored)
    assert not Path("/etc/cron.d/evil.csv").exists()

    binary = upload(user, "data.jsonl", b"\x00\x01\x02PK\x03\x04" + bytes(range(256)) * 10)
    assert binary.status == "invalid" and binary.error


def test_models_load_from_safetensors_only_and_remote_code_only_if_an_admin_allows(user, tiny_model_dir, tmp_path,
                                                                                    settings):
    import shutil

    settings.MODEL_ROOTS = [str(tmp_path)]
    user.is_staff = True  # registering a server folder is an admin action (tests/web/test_model_registration.py)
    user.save()

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded: pickle is refused")
    with pytest.raises(services.InputError, match="safetensors"):
        services.register_base_model(user, "pickled", str(pickled))

    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(services.InputError, match="(?i)remote code|trust_remote_code"):
        services.register_base_model(user, "remote", str(remote))
    api = Client(HTTP_AUTHORIZATION=f"Bearer {__import__('jobs.models', fromlist=['ApiToken']).ApiToken.issue(user)[1]}")
    response = api.post("/api/v1/base-models", {"name": "remote", "path": str(remote), "trust_remote_code": True},
                        content_type="application/json")
    assert response.status_code == 400  # an API user cannot switch it on


def test_no_pickle_loading_in_the_code():
    """torch.load only with weights_only=True (our own checkpoints), no pickle module anywhere."""
    offenders = []
    for path in [*ROOT.joinpath("finetune").rglob("*.py"), *ROOT.joinpath("jobs").rglob("*.py"),
                 *ROOT.joinpath("autotune").rglob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ("torch.load(" in line and "weights_only=True" not in line) or "import pickle" in line \
                    or "pickle.load" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders

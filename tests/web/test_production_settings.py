"""Safe by default (issue 31): docker-compose.yml and a fresh `scripts/run.sh` get production settings (DEBUG off,
a random SECRET_KEY kept 0600 in the data directory, the web port on 127.0.0.1 only), `manage.py check --deploy`
says only what the README explains, error pages never list the URL patterns, the inference server's token is
random (not derived from SECRET_KEY) and no vLLM server's API key is on its command line.

The settings are read in subprocesses started with the environment run.sh gives them: TUNEDECK_DATA_DIR, and no
TUNEDECK_ENV, SECRET_KEY or DATABASE_URL."""
import hashlib
import hmac
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving.vllm_process import EngineSettings, VllmServer

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# What check --deploy still says, and why, is explained in the README's "Production and security" section.
PLAIN_HTTP_WARNINGS = {"security.W004", "security.W008", "security.W012", "security.W016"}
HTTPS_WARNINGS = {"security.W005", "security.W021"}


def fresh_env(data_dir: Path, **extra) -> dict:
    """What scripts/run.sh gives its processes on a machine where nobody set anything."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(data_dir.parent),
            "TUNEDECK_DATA_DIR": str(data_dir), **extra}


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    prelude = "import json, os, django; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tunedeck.settings'); " \
              "django.setup(); from django.conf import settings; "
    result = subprocess.run([sys.executable, "-c", prelude + code], check=False, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def settings_of(env: dict) -> dict:
    names = ("DEBUG", "ENVIRONMENT", "SECRET_KEY", "ALLOWED_HOSTS", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE",
             "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS")
    code = f"print(json.dumps({{n: getattr(settings, n, None) for n in {names!r}}}))"
    return json.loads(run_python(code, env).stdout.strip().splitlines()[-1])


def deploy_check_ids(env: dict) -> set[str]:
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy"], check=False, cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]  # warnings only, no errors
    return set(re.findall(r"\(([\w.]+\.[EW]\d+)\)", result.stdout + result.stderr))


# ---------------------------------------------------------------- docker-compose.yml


def compose_default(value: str) -> str | None:
    """The value compose gives `${NAME:-default}` when NAME is unset; None when `${NAME:?...}` requires it."""
    match = re.fullmatch(r"\$\{(\w+)(:?[-?])(.*)\}", str(value))
    if not match:
        return str(value)
    return None if match.group(2).endswith("?") else match.group(3)


def test_compose_runs_production_settings_on_this_host_only():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["x-tunedeck-env"]
    assert compose_default(env["TUNEDECK_ENV"]) == "production"
    assert compose_default(env.get("TUNEDECK_DEBUG", "")) in ("", "0")
    assert compose_default(env["SECRET_KEY"]) is None, "SECRET_KEY must be required (${SECRET_KEY:?...})"
    assert "SECRET_KEY" in env["SECRET_KEY"] and ":?" in env["SECRET_KEY"]
    services = compose["services"]
    for name in ("web", "gpu-worker", "inference", "interactive-worker", "cpu-worker", "cpu-worker-large"):
        assert services[name]["environment"] == env, f"{name} must share the Tunedeck environment"
    published = {name: service.get("ports", []) for name, service in services.items()}
    assert published["web"] == ["127.0.0.1:8000:8000"]
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    assert "change-me" not in (ROOT / "docker-compose.yml").read_text()


# ---------------------------------------------------------------- a fresh scripts/run.sh


def test_a_fresh_run_gets_debug_off_and_a_random_secret_key_kept_0600(tmp_path):
    data_dir = tmp_path / "var"
    first = settings_of(fresh_env(data_dir))
    assert first["DEBUG"] is False and first["ENVIRONMENT"] == "production"
    key_file = data_dir / "secret-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().strip() == first["SECRET_KEY"] and len(first["SECRET_KEY"]) >= 50
    assert "tunedeck" not in first["SECRET_KEY"] and "insecure" not in first["SECRET_KEY"]
    # Plain http://127.0.0.1:8000 keeps working: no Secure-only cookies, no redirect to https.
    assert not first["SESSION_COOKIE_SECURE"] and not first["CSRF_COOKIE_SECURE"]
    assert not first["SECURE_SSL_REDIRECT"]
    assert "testserver" not in first["ALLOWED_HOSTS"]

    again = settings_of(fresh_env(data_dir))
    assert again["SECRET_KEY"] == first["SECRET_KEY"], "the key must survive a restart (sessions stay valid)"
    elsewhere = settings_of(fresh_env(tmp_path / "other"))
    assert elsewhere["SECRET_KEY"] != first["SECRET_KEY"], "each installation makes its own key"

    given = settings_of(fresh_env(tmp_path / "given", SECRET_KEY="k" * 20 + "given-by-the-operator-1234"))
    assert given["SECRET_KEY"] == "k" * 20 + "given-by-the-operator-1234"
    assert not (tmp_path / "given" / "secret-key").exists()


def test_secret_key_file_written_loosely_is_made_private(tmp_path):
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    (data_dir / "secret-key").write_text("restored-from-a-backup-" + "x" * 40 + "\n")
    (data_dir / "secret-key").chmod(0o644)
    assert settings_of(fresh_env(data_dir))["SECRET_KEY"] == "restored-from-a-backup-" + "x" * 40
    assert stat.S_IMODE((data_dir / "secret-key").stat().st_mode) == 0o600


def test_development_mode_is_explicit(tmp_path):
    development = settings_of(fresh_env(tmp_path / "dev", TUNEDECK_ENV="development"))
    assert development["DEBUG"] is True and "testserver" in development["ALLOWED_HOSTS"]
    assert settings_of(fresh_env(tmp_path / "dbg", TUNEDECK_DEBUG="1"))["DEBUG"] is True
    https = settings_of(fresh_env(tmp_path / "https", TUNEDECK_HTTPS="1"))
    assert https["SESSION_COOKIE_SECURE"] and https["CSRF_COOKIE_SECURE"] and https["SECURE_SSL_REDIRECT"]
    assert https["SECURE_HSTS_SECONDS"] > 0 and https["DEBUG"] is False
    unknown = subprocess.run([sys.executable, "-c", "import tunedeck.settings"], check=False, cwd=ROOT,
                             capture_output=True, text=True, timeout=60,
                             env=fresh_env(tmp_path / "x", TUNEDECK_ENV="prod"))
    assert unknown.returncode != 0 and "TUNEDECK_ENV" in unknown.stderr


def test_check_deploy_says_only_what_the_readme_explains(tmp_path):
    assert deploy_check_ids(fresh_env(tmp_path / "plain")) == PLAIN_HTTP_WARNINGS
    https = fresh_env(tmp_path / "https", TUNEDECK_HTTPS="1", ALLOWED_HOSTS="tunedeck.example.com",
                      CSRF_TRUSTED_ORIGINS="https://tunedeck.example.com")
    assert deploy_check_ids(https) == HTTPS_WARNINGS
    section = README.split("## Production and security", 1)[1].split("\n## ", 1)[0]
    for warning in PLAIN_HTTP_WARNINGS | HTTPS_WARNINGS:
        assert warning in section, f"the README does not explain {warning}"


def test_error_pages_of_a_fresh_run_never_list_the_url_patterns(tmp_path):
    code = ("from django.test import Client; r = Client(HTTP_HOST='127.0.0.1').get('/no-such-page/'); "
            "print(json.dumps({'status': r.status_code, 'body': r.content.decode()}))")
    production = json.loads(run_python(code, fresh_env(tmp_path / "var")).stdout.strip().splitlines()[-1])
    assert production["status"] == 404
    assert "Page not found" in production["body"] and "Tunedeck" in production["body"]
    for leak in ("URLconf", "api/v1/", "admin/", "DEBUG = True", "no-such-page"):
        assert leak not in production["body"], leak
    # The same request in development mode shows Django's debug page: the check above would catch a leak.
    development = json.loads(run_python(code, fresh_env(tmp_path / "dev", TUNEDECK_ENV="development"))
                             .stdout.strip().splitlines()[-1])
    assert development["status"] == 404 and "URLconf" in development["body"]


@pytest.mark.django_db
def test_404_page_keeps_the_site_look_for_a_logged_in_user(client, user):
    client.force_login(user)
    response = client.get("/no-such-page/")
    page = response.content.decode()
    assert response.status_code == 404 and "Page not found" in page
    assert 'href="/static/tunedeck/app.css"' in page and "Log out" in page and "alice" in page


def test_500_page_renders_without_request_context_or_database(rf):
    from django.views.defaults import server_error

    response = server_error(rf.get("/boom/"))  # no django_db mark: a database query would raise here
    page = response.content.decode()
    assert response.status_code == 500 and "Something went wrong" in page
    assert 'href="/static/tunedeck/app.css"' in page and "Traceback" not in page


# ---------------------------------------------------------------- internal secrets


def test_internal_token_is_random_private_and_not_derived_from_secret_key(tmp_path):
    data_dir = tmp_path / "var"
    code = "from jobs.deploy import internal_token; print(json.dumps([settings.SECRET_KEY, internal_token()]))"
    tokens = {}
    for secret_key in ("a-first-secret-key-of-enough-length-1234567", "another-secret-key-of-enough-length-98765"):
        output = run_python(code, fresh_env(data_dir, SECRET_KEY=secret_key)).stdout.strip().splitlines()[-1]
        key, token = json.loads(output)
        derived = hmac.new(key.encode(), b"tunedeck-inference", hashlib.sha256).hexdigest()
        assert token != derived and key not in token
        tokens[key] = token
    assert len(set(tokens.values())) == 1, "web, workers and inference server share it, whatever SECRET_KEY says"
    token_file = data_dir / "inference-token"
    assert token_file.read_text().strip() == next(iter(tokens.values())) and len(token_file.read_text()) >= 50
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    other = json.loads(run_python(code, fresh_env(tmp_path / "other")).stdout.strip().splitlines()[-1])[1]
    assert other != next(iter(tokens.values())), "each installation makes its own token"
    given = json.loads(run_python(code, fresh_env(data_dir, TUNEDECK_INTERNAL_TOKEN="from-the-operator"))
                       .stdout.strip().splitlines()[-1])[1]
    assert given == "from-the-operator"


def test_a_vllm_server_gets_its_key_in_its_environment_not_its_command_line(tmp_path, monkeypatch):
    """A stand-in for vLLM's interpreter writes down the arguments and environment it was started with."""
    monkeypatch.setenv("SECRET_KEY", "the-web-servers-own-secret-key-0123456789")
    recorder = tmp_path / "python"
    seen = tmp_path / "seen.json"
    recorder.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"json.dump({{'argv': sys.argv, 'env': dict(os.environ)}}, open({str(seen)!r}, 'w'))\n")
    recorder.chmod(0o755)
    (tmp_path / "model").mkdir()
    server = VllmServer("merged:demo", tmp_path / "model", "demo", True,
                        EngineSettings(python=str(recorder), log_dir=tmp_path / "logs"))
    assert "--api-key" not in server.command() and server.api_key not in " ".join(server.command())
    server.start()
    try:
        server.process.wait(60)
    finally:
        server.stop()
    started = json.loads(seen.read_text())
    assert server.api_key not in " ".join(started["argv"]) and "--api-key" not in started["argv"]
    assert "--served-model-name" in started["argv"] and "--enable-lora" in started["argv"]
    assert started["env"]["VLLM_API_KEY"] == server.api_key and len(server.api_key) >= 24
    assert "SECRET_KEY" not in started["env"]
    assert server.api_key not in server.log_path.read_text()


def test_processes_starting_at_once_agree_on_one_secret(tmp_path):
    """The web server, the workers and the inference server may all make the file at the same moment."""
    code = "import sys; from tunedeck.secretfile import read_or_create_secret as r; print(r(sys.argv[1]))"
    starting = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "inference-token")], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True) for _ in range(6)]
    secrets_seen = {process.communicate(timeout=60)[0].strip() for process in starting}
    assert len(secrets_seen) == 1 and len(secrets_seen.pop()) >= 50
    assert [p.name for p in tmp_path.iterdir()] == ["inference-token"], "no candidate file left behind"

"""The `tunedeck` command line as a user runs it: a subprocess against a live server and a real Celery worker
(login, upload, plan, train --watch, versions, compare, download), its error messages and exit codes, and the
deploy/chat client side against a stub server that speaks the contract."""
import io
import json
import os
import stat
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tinymodel import learnable_chat_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def cli_command():
    script = Path(sys.executable).with_name("tunedeck")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tunedeck.cli"]


@pytest.fixture
def cli_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEDECK_")}
    env.update(HOME=str(tmp_path), TUNEDECK_CONFIG=str(tmp_path / "cfg" / "config.json"), PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def cli(cli_env, tmp_path):
    def run(*args, env=None, input=None, timeout=300, expect=None):
        result = subprocess.run([*cli_command(), *map(str, args)], env={**cli_env, **(env or {})}, cwd=tmp_path,
                                input=input, capture_output=True, text=True, timeout=timeout)
        if expect is not None:
            assert result.returncode == expect, (args, result.returncode, result.stdout, result.stderr)
        return result

    return run


def error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("tunedeck: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def logged_in(cli, live_server, user, tiny_base_model, celery_worker):
    result = cli("login", "--url", live_server.url, "--username", "alice", "--password", "alice-pw", expect=0)
    assert "Logged in" in result.stdout
    return cli


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_login_upload_plan_train_compare_download(logged_in, cli_env, tmp_path, celery_worker):
    cli = logged_in
    config = Path(cli_env["TUNEDECK_CONFIG"])
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    stored = json.loads(config.read_text())
    assert stored["token"].startswith("td_") and stored["url"].startswith("http://")

    models = json.loads(cli("base-models", "--json", expect=0).stdout)
    assert [m["name"] for m in models] == ["tiny-llama"]

    data = write_jsonl(tmp_path / "chat.jsonl", learnable_chat_rows(40))
    upload = cli("upload", data, "--name", "greetings", "--validation-fraction", "0.2", "--wait", "--json",
                 expect=0)
    assert "100.0%" in upload.stderr and "Uploading chat.jsonl" in upload.stderr, upload.stderr
    dataset = json.loads(upload.stdout)
    assert dataset["status"] == "ready" and dataset["rows"] == 40 and dataset["name"] == "greetings"
    shown = cli("dataset", dataset["id"], expect=0).stdout
    assert "ready" in shown and "messages" in shown and "32 train, 8 validation" in shown
    assert str(dataset["id"]) in cli("datasets", expect=0).stdout

    plan = cli("plan", "--dataset", dataset["id"], "--method", "lora", "--set", "max_steps=4", expect=0).stdout
    assert "Memory:" in plan and "Why:" in plan and "rank / alpha" in plan and "max steps" in plan, plan
    plan_json = json.loads(cli("plan", "-d", dataset["id"], "--json", expect=0).stdout)
    assert plan_json["memory"]["breakdown"] and plan_json["reasons"]

    train = cli("train", "--dataset", dataset["id"], "--method", "lora", "--name", "cli-greeter",
                "--set", "max_steps=4", "--set", "micro_batch=4", "--set", "grad_accum=1", "--set", "rank=4",
                "--watch", "--interval", "0.3", expect=0)
    assert "succeeded: adapter cli-greeter v1" in train.stdout, train.stdout
    assert "steps" in train.stderr and "loss" in train.stderr and "100.0%" in train.stderr, train.stderr

    second = cli("train", "-d", dataset["id"], "-m", "lora", "--name", "cli-greeter", "-s", "max_steps=4",
                 "-s", "micro_batch=4", "-s", "grad_accum=1", "-s", "rank=8", "--json", expect=0)
    job = json.loads(second.stdout)
    watched = cli("watch", job["id"], "--interval", "0.3", expect=0)
    assert "succeeded: adapter cli-greeter v2" in watched.stdout

    jobs = json.loads(cli("jobs", "--json", expect=0).stdout)
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"]
    assert "cli-greeter" in cli("jobs", "--status", "succeeded", expect=0).stdout

    versions = json.loads(cli("versions", "--json", expect=0).stdout)
    assert sorted(v["version"] for v in versions) == [1, 2]
    v1, v2 = sorted(versions, key=lambda v: v["version"])
    listing = cli("versions", expect=0).stdout
    assert "cli-greeter v1" in listing and "cli-greeter v2" in listing

    compare = cli("compare", v1["id"], v2["id"], expect=0).stdout
    assert "Settings (* differs)" in compare and "* rank" in compare and "Metrics (* best)" in compare, compare
    compared = json.loads(cli("compare", v1["id"], v2["id"], "--json", expect=0).stdout)
    assert [v["id"] for v in compared["versions"]] == [v1["id"], v2["id"]]

    out = tmp_path / "downloads" / "adapter.zip"
    download = cli("download", v1["id"], "-o", out, expect=0)
    assert "Saved adapter version" in download.stdout
    names = set(zipfile.ZipFile(out).namelist())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names

    cancel = cli("cancel", job["id"], expect=0)
    assert "already succeeded" in cancel.stdout


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_errors_are_one_line_with_exit_codes(logged_in, live_server, cli, tmp_path, celery_worker):
    bad_token = cli("jobs", env={"TUNEDECK_TOKEN": "td_not-a-token"}, expect=1)
    assert "invalid or revoked" in error_line(bad_token) and "tunedeck login" in error_line(bad_token)

    wrong = cli("login", "--url", live_server.url, "-u", "alice", "--password", "nope", expect=1)
    assert "Wrong username or password" in error_line(wrong)
    assert cli("jobs", expect=0).stdout.startswith("No jobs yet"), "a failed login keeps the stored token"

    for args, message in ((("dataset", 987654), "No dataset 987654."), (("watch", 987654), "No job 987654."),
                          (("download", 987654), "No adapter version 987654."),
                          (("compare", 987654, 987655), "No adapter version 987654."),
                          (("cancel", 987654), "No job 987654."),
                          (("deploy", 987654), "987654")):
        assert message in error_line(cli(*args, expect=1)), args

    assert "No such file" in error_line(cli("upload", tmp_path / "missing.jsonl", expect=2))
    (tmp_path / "empty.jsonl").write_text("")
    assert "file is empty" in error_line(cli("upload", tmp_path / "empty.jsonl", expect=1))
    (tmp_path / "bad.jsonl").write_text("this is not json\n{oops\n")
    bad = cli("upload", tmp_path / "bad.jsonl", "--wait", expect=1)
    assert "is invalid" in error_line(bad)

    good = write_jsonl(tmp_path / "good.jsonl", learnable_chat_rows(8))
    dataset = json.loads(cli("upload", good, "--wait", "--json", "-q", expect=0).stdout)
    assert "rank" in error_line(cli("plan", "-d", dataset["id"], "--set", "rank=-3", expect=1))
    assert "Unknown override" in error_line(cli("train", "-d", dataset["id"], "--set", "nonsense=1", expect=1))
    assert "DPO needs a preference dataset" in error_line(cli("plan", "-d", dataset["id"], "-m", "dpo", expect=1))

    assert "expected key=value" in cli("plan", "-d", dataset["id"], "--set", "rank", expect=2).stderr
    assert "--dataset" in cli("train", expect=2).stderr
    assert "expected an id" in cli("watch", "abc", expect=2).stderr
    unreachable = cli("jobs", env={"TUNEDECK_URL": "http://127.0.0.1:9"}, expect=3)
    assert "Cannot connect to http://127.0.0.1:9" in error_line(unreachable)


def test_not_logged_in_and_config_overrides(cli, cli_env, tmp_path):
    assert "Not logged in" in error_line(cli("datasets", expect=2))
    Path(cli_env["TUNEDECK_CONFIG"]).parent.mkdir(parents=True)
    Path(cli_env["TUNEDECK_CONFIG"]).write_text("{broken")
    assert "run `tunedeck login` again" in error_line(cli("datasets", expect=2))
    assert "Give --password" in error_line(cli("login", "--url", "127.0.0.1:9", "-u", "x", input="", expect=2))


# ---------------------------------------------------------------- deploy and chat against a stub of the contract


class StubServer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    deploy_polls = 0
    requests: list = []

    def log_message(self, *args):
        pass

    def _json(self, status, body):
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _body(self):
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")

    def do_POST(self):
        body = self._body()
        StubServer.requests.append((self.path, self.headers.get("Authorization"), body))
        if self.headers.get("Authorization") != "Bearer td_stub":
            return self._json(401, {"error": {"code": "authentication_failed", "message": "bad token",
                                              "details": None}})
        if self.path == "/api/v1/adapter-versions/7/deploy":
            return self._json(202, {"deployment": {"id": 3, "name": "greeter-v1", "status": "merging"}})
        if self.path == "/api/v1/adapter-versions/8/deploy":
            return self._json(202, {"deployment": {"id": 4, "name": "broken", "status": "merging"}})
        if self.path == "/v1/chat/completions":
            if body["model"] != "greeter-v1":
                return self._json(404, {"error": {"message": f"No deployment named {body['model']!r}.",
                                                  "type": "invalid_request_error", "code": "model_not_found"}})
            reply = "pong" if body["messages"][-1]["content"] == "ping" else f"{len(body['messages'])} messages"
            if not body.get("stream"):
                return self._json(200, {"object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for piece in [reply[:2], reply[2:]]:
                chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            return None
        return self._json(404, {"error": {"code": "not_found", "message": "nope", "details": None}})

    def do_GET(self):
        if self.path == "/api/v1/deployments/3":
            StubServer.deploy_polls += 1
            status = "live" if StubServer.deploy_polls >= 2 else "loading"
            return self._json(200, {"id": 3, "name": "greeter-v1", "status": status,
                                    "endpoint": f"http://{self.headers['Host']}/v1"})
        if self.path == "/api/v1/deployments/4":
            return self._json(200, {"id": 4, "name": "broken", "status": "failed",
                                    "error": "Out of memory while merging."})
        return self._json(404, {"error": {"code": "not_found", "message": "nope", "details": None}})


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StubServer.requests, StubServer.deploy_polls = [], 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_deploy_and_chat_client_side(cli, stub):
    env = {"TUNEDECK_URL": stub, "TUNEDECK_TOKEN": "td_stub"}
    deployed = cli("deploy", 7, "--wait", env=env, expect=0)
    assert "Deployment greeter-v1 (id 3): merging." in deployed.stdout
    assert f"Live at {stub}/v1" in deployed.stdout and "tunedeck chat greeter-v1" in deployed.stdout
    assert StubServer.requests[-1][2] == {"merge": True}
    cli("deploy", 7, "--no-merge", "--json", env=env, expect=0)
    assert StubServer.requests[-1][2] == {"merge": False}
    failed = cli("deploy", 8, "--wait", env=env, expect=1)
    assert "Out of memory while merging." in error_line(failed)

    one = cli("chat", "greeter-v1", "-m", "ping", env=env, expect=0)
    assert one.stdout == "pong\n"
    path, auth, body = StubServer.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer td_stub" and body["stream"] is True
    assert cli("chat", "greeter-v1", "-m", "ping", "--no-stream", env=env, expect=0).stdout == "pong\n"

    session = cli("chat", "greeter-v1", "--system", "be brief", env=env, input="hello\n\nagain\n/exit\n", expect=0)
    assert session.stdout.splitlines() == ["2 messages", "4 messages"]  # system+user, then +assistant+user

    unknown = cli("chat", "nobody", "-m", "hi", env=env, expect=1)
    assert "No deployment named 'nobody'." in error_line(unknown)
    bad = cli("chat", "greeter-v1", "-m", "hi", env={**env, "TUNEDECK_TOKEN": "td_wrong"}, expect=1)
    assert "bad token" in error_line(bad)


def test_multipart_stream_is_a_valid_form_with_a_length(tmp_path):
    from django.http.multipartparser import MultiPartParser
    from django.test import RequestFactory

    from tunedeck.cli import MultipartStream

    data = tmp_path / 'we"ird.jsonl'
    data.write_bytes(os.urandom(700_000))
    seen = []
    body = MultipartStream({"name": "x", "skip": None}, {"file": data}, on_progress=lambda sent, total: seen.append(sent))
    raw = b""
    while block := body.read(65536):
        raw += block
    assert len(raw) == len(body) and seen[-1] == len(body) and len(seen) > 5
    request = RequestFactory().post("/", data=raw, content_type=body.content_type)
    post, files = MultiPartParser(request.META, io.BytesIO(raw), request.upload_handlers).parse()
    assert post["name"] == "x" and "skip" not in post
    assert files["file"].read() == data.read_bytes()


def test_settings_parse_as_json_where_they_can():
    from tunedeck.cli import parse_setting

    assert parse_setting("max_steps=4") == ("max_steps", 4)
    assert parse_setting("learning_rate=3e-4") == ("learning_rate", 3e-4)
    assert parse_setting("packing=true") == ("packing", True)
    assert parse_setting("device=cpu") == ("device", "cpu")
    assert parse_setting('target_modules=["q_proj","v_proj"]') == ("target_modules", ["q_proj", "v_proj"])
    assert parse_setting("target_modules=q_proj,v_proj") == ("target_modules", "q_proj,v_proj")

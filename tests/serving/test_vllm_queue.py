"""vLLM servers start one at a time, most recently used first, as many at once as the host has CPUs for, each bound
to CPUs of its own; meanwhile the built-in engine answers, and the deployment switches over when its server answers
(issue 38).

vLLM itself takes minutes to start on 2 cores (tests/web/test_vllm_serving.py runs the real one), so these tests
give the supervisor a stand-in interpreter: a small OpenAI-shaped HTTP server that answers /health after a delay
and says which deployment answered, recording how it was started (its CPU binding). Everything of Tunedeck's is
real: the supervisor, both engines, the inference server, its database rows and its HTTP API.
"""
import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from serving import vllm_process
from serving.builtin import BuiltinEngine
from serving.engine import EngineContext
from serving.vllm import VllmEngine
from serving.vllm_process import EngineSettings, VllmSupervisor
from tests.conftest import wait_for

QUESTION = [{"role": "user", "content": "What is 2+2?"}]
STAND_IN_VLLM = r'''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = dict(zip(sys.argv[3::2], sys.argv[4::2]))  # after "-m vllm.entrypoints.openai.api_server"
name, began = args["--served-model-name"], time.monotonic()
with open(os.environ["STAND_IN_VLLM_RECORD"], "a") as record:
    record.write(json.dumps({"name": name, "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
                             "at": time.time()}) + "\n")

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        ready = time.monotonic() - began > float(os.environ.get("STAND_IN_VLLM_DELAY", "1"))
        self.reply(200 if ready else 503, {})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.reply(200, {"model": name, "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
                   "message": {"role": "assistant", "content": "from vllm"}}], "usage": {"prompt_tokens": 1,
                   "completion_tokens": 2, "total_tokens": 3}})

ThreadingHTTPServer(("127.0.0.1", int(args["--port"])), Handler).serve_forever()
'''


@pytest.fixture
def stand_in_vllm(tmp_path, monkeypatch):
    script = tmp_path / "vllm-python"
    script.write_text(f"#!{sys.executable}\n{STAND_IN_VLLM}")
    script.chmod(0o755)
    record = tmp_path / "started.jsonl"
    monkeypatch.setenv("STAND_IN_VLLM_RECORD", str(record))
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)

    def started():
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []

    return SimpleNamespace(python=str(script), started=started)


def merged_folder(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 256,
                                                    "num_attention_heads": 4, "max_position_embeddings": 512}))
    return folder


def test_servers_start_one_at_a_time_most_recent_first_on_cpus_of_their_own(stand_in_vllm, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_VLLM_DELAY", "1")
    monkeypatch.setattr(vllm_process, "host_cpus", lambda: list(range(8)))  # an 8-CPU host: two servers
    ready = []
    supervisor = VllmSupervisor(EngineSettings(python=stand_in_vllm.python, log_dir=tmp_path / "logs"),
                                on_ready=ready.append, poll_seconds=0.2)
    assert supervisor.max_servers() == 2
    # The first starts at once; of those that wait, the most recently used starts next, whatever the order added.
    for name, last_used in (("newest", 3.0), ("old", 1.0), ("newer", 2.0)):
        supervisor.add_merged(name, merged_folder(tmp_path, name), priority=last_used)
    supervisor.start()
    try:
        wait_for(lambda: len(ready) == 2, timeout=60, what="two servers answering")
        assert ready == ["newest", "newer"] and [s["name"] for s in stand_in_vllm.started()] == ready
        binds = {s["name"]: s["bind"] for s in stand_in_vllm.started()}
        assert binds == {"newest": "0,1,2,3", "newer": "4,5,6,7"}
        waiting = supervisor.progress("old")
        assert waiting["state"] == "waiting" and waiting["position"] == 1
        assert "at most 2 vLLM server(s) at once (8 CPUs" in waiting["why"]
        time.sleep(1)
        assert "old" not in ready  # it waits for a free slot, however long
        supervisor.remove("newest")
        wait_for(lambda: "old" in ready, timeout=60, what="the waiting server to start in the freed slot")
        assert stand_in_vllm.started()[-1] == {**stand_in_vllm.started()[-1], "name": "old", "bind": "0,1,2,3"}
    finally:
        supervisor.stop()


def test_a_two_cpu_host_runs_one_server_on_every_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(vllm_process, "host_cpus", lambda: [0, 1])
    supervisor = VllmSupervisor(EngineSettings(python="python", log_dir=tmp_path))
    assert supervisor.max_servers() == 1
    assert VllmSupervisor(EngineSettings(python="python", log_dir=tmp_path, max_servers=3)).max_servers() == 3
    assert VllmSupervisor(EngineSettings(python="python", log_dir=tmp_path, device="cuda")).max_servers() > 8


@pytest.fixture
def merged_deployment(no_shared_inference_server, db, user, tiny_base_model, tiny_model_dir, tmp_path):
    from jobs.models import Deployment
    from tests.finetune.adapter_factory import make_adapter
    from tests.web.test_deploy import make_version

    version = make_version(user, tiny_base_model, make_adapter(tiny_model_dir, tmp_path / "lora", "lora"), "line",
                           method="lora")
    return Deployment.objects.create(owner=user, version=version, name="quick", merge=True, revision=1,
                                     status=Deployment.Status.LOADING, path=str(tiny_model_dir), details={})


@pytest.mark.django_db(transaction=True)
def test_the_builtin_engine_answers_until_vllm_is_ready_then_vllm_takes_over(stand_in_vllm, merged_deployment,
                                                                            tmp_path, monkeypatch):
    from jobs import inference_server
    from jobs.deploy import internal_token

    monkeypatch.setenv("STAND_IN_VLLM_DELAY", "6")
    monkeypatch.setattr(inference_server, "SWITCH_GRACE_SECONDS", 0.5)
    context = EngineContext(device="cpu", log_dir=tmp_path / "logs")
    # A GPU host as far as vLLM can tell (the tiny model's head size has no vLLM CPU kernel); the stand-in
    # interpreter never touches it.
    vllm = VllmEngine(context, python=stand_in_vllm.python, poll_seconds=0.2,
                      gpus=[{"index": 0, "total_bytes": 16 * 2**30, "free_bytes": 16 * 2**30}])
    builtin = BuiltinEngine(context)
    service = inference_server.InferenceService(engines=[vllm, builtin])
    service.sync()
    httpd = inference_server.make_server(service, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions"

    def ask():
        response = requests.post(url, headers={"X-Tunedeck-Internal": internal_token()}, timeout=60,
                                 json={"model": "quick", "messages": QUESTION, "max_tokens": 3, "temperature": 0})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    try:
        vllm.start()
        merged_deployment.refresh_from_db()
        details = merged_deployment.details
        assert merged_deployment.status == "live" and details["engine"] == "builtin", details
        assert details["engine_reason"] == "its vLLM server is starting"
        assert "until vLLM is ready, then vLLM takes over" in details["engine_warning"]
        assert ask() != "from vllm"  # the tiny model's own words, from the built-in engine
        service.sync()
        merged_deployment.refresh_from_db()
        assert merged_deployment.details["engine_progress"]["state"] in ("starting", "ready")

        def switched():
            merged_deployment.refresh_from_db()
            return merged_deployment.details["engine"] == "vllm"

        wait_for(switched, timeout=60, what="vLLM taking over")
        assert merged_deployment.details["engine_reason"] == "a merged model gets a vLLM server of its own"
        assert "engine_warning" not in merged_deployment.details and "engine_progress" not in merged_deployment.details
        assert ask() == "from vllm"
        wait_for(lambda: builtin.models() == [], timeout=10, what="the built-in engine letting go of it")
    finally:
        httpd.shutdown()
        service.stop()

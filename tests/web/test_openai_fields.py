"""Every field of OpenAI's chat completions and completions requests, and vLLM's extras, sent one by one with the
official `openai` client through /v1 to both engines: each is honoured (200) or refused with a 400 naming it,
never dropped without a word; and the honoured ones really change the answer where that can be seen exactly.

The tables under test: jobs.openai_fields (what /v1 knows), serving.vllm_fields and serving.builtin_fields.
The vLLM half needs .venv-vllm (scripts/setup-vllm.sh) and starts one vLLM server, which takes minutes.
"""
import json
import re
import subprocess
from pathlib import Path

import openai
import pytest

from jobs.openai_fields import CHAT, COMPLETIONS, METADATA, VLLM_FIELDS
from serving.vllm_fields import for_vllm, vllm_refusal
from tests.conftest import make_base_model, wait_for
from tests.web.test_deploy import (  # noqa: F401 - fixtures shared with test_deploy.py
    PING,
    alice,
    deploy,
    make_version,
    serving,
    trained_adapters,
    wait_status,
)
from tests.web.test_openai_api import PING_PROMPT, client_for
from tests.web.test_vllm_serving import SMOLLM, STARTUP_SECONDS, smollm_loras, vllm_available  # noqa: F401

OK, REFUSED, VLLM_REFUSES = "200", "refused by Tunedeck", "refused by vLLM itself"
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}

# field: (a value that asks for something, other fields it needs, the built-in engine's answer, vLLM's answer).
SAMPLES = {
    # OpenAI's fields
    "max_tokens": (3, {}, OK, OK),
    "max_completion_tokens": (3, {}, OK, OK),
    "temperature": (0.5, {"seed": 1}, OK, OK),
    "top_p": (0.5, {"seed": 1}, OK, OK),
    "stop": (["\n"], {}, OK, OK),
    "seed": (7, {}, OK, OK),
    "n": (2, {"temperature": 1.0, "seed": 1}, REFUSED, OK),  # vLLM: greedy has one answer
    "logprobs": (True, {}, REFUSED, OK),  # chat; completions: see COMPLETION_SAMPLES
    "top_logprobs": (2, {"logprobs": True}, REFUSED, OK),
    "presence_penalty": (0.5, {}, OK, OK),
    "frequency_penalty": (0.5, {}, OK, OK),
    "logit_bias": ({"5": 1}, {}, OK, OK),
    "response_format": ({"type": "json_object"}, {}, REFUSED, OK),
    "tools": ([TOOL], {}, REFUSED, VLLM_REFUSES),  # tool_choice "auto": SmolLM2 has no tool-call parser
    "tool_choice": ("none", {}, OK, OK),
    "parallel_tool_calls": (False, {}, OK, OK),
    "reasoning_effort": ("low", {}, REFUSED, OK),
    "echo": (True, {}, REFUSED, OK),
    "suffix": (" world", {}, REFUSED, VLLM_REFUSES),  # SmolLM2 has no fill-in-the-middle
    "best_of": (2, {}, REFUSED, REFUSED),
    "audio": ({"voice": "alloy", "format": "wav"}, {}, REFUSED, REFUSED),
    "modalities": (["text", "audio"], {}, REFUSED, REFUSED),
    "moderation": ({"model": "omni-moderation-latest"}, {}, REFUSED, REFUSED),
    "prediction": ({"type": "content", "content": "pong"}, {}, REFUSED, REFUSED),
    "web_search_options": ({}, {}, REFUSED, REFUSED),
    "verbosity": ("low", {}, REFUSED, REFUSED),
    "functions": ([TOOL["function"]], {}, REFUSED, REFUSED),
    "function_call": ("auto", {}, REFUSED, REFUSED),
    # OpenAI's bookkeeping: accepted, changes nothing
    "user": ("someone", {}, OK, OK),
    "metadata": ({"team": "a"}, {}, OK, OK),
    "store": (True, {}, OK, OK),
    "safety_identifier": ("h4sh", {}, OK, OK),
    "prompt_cache_key": ("k", {}, OK, OK),
    "prompt_cache_options": ({"ttl": "30m"}, {}, OK, OK),
    "prompt_cache_retention": ("24h", {}, OK, OK),
    "service_tier": ("flex", {}, OK, OK),
    # vLLM's extras
    "top_k": (1, {"temperature": 1.0, "seed": 1}, OK, OK),
    "min_p": (0.5, {"temperature": 1.0, "seed": 1}, OK, OK),
    "repetition_penalty": (1.3, {}, OK, OK),
    "use_beam_search": (True, {}, REFUSED, OK),
    "length_penalty": (0.8, {}, REFUSED, OK),
    "stop_token_ids": ([5], {}, REFUSED, OK),
    "include_stop_str_in_output": (True, {"stop": ["o"]}, REFUSED, OK),
    "ignore_eos": (True, {}, REFUSED, OK),
    "min_tokens": (2, {}, REFUSED, OK),
    "skip_special_tokens": (False, {}, REFUSED, OK),
    "spaces_between_special_tokens": (False, {}, REFUSED, OK),
    "truncate_prompt_tokens": (30, {}, REFUSED, OK),
    "truncation_side": ("left", {}, REFUSED, OK),
    "prompt_logprobs": (1, {}, REFUSED, OK),
    "logprob_token_ids": ([5], {"logprobs": True}, REFUSED, OK),
    "allowed_token_ids": ([5, 6], {}, REFUSED, OK),
    "bad_words": (["Paris"], {}, REFUSED, OK),
    "add_special_tokens": (True, {}, REFUSED, OK),
    "structured_outputs": ({"choice": ["yes", "no"]}, {}, REFUSED, OK),
    "cache_salt": ("a-salt-of-this-request", {}, REFUSED, OK),
    "return_tokens_as_token_ids": (True, {"logprobs": True}, REFUSED, OK),
    "return_token_ids": (True, {}, REFUSED, OK),
    "thinking_token_budget": (10, {}, REFUSED, VLLM_REFUSES),  # no reasoning parser configured
    "repetition_detection": ({"max_pattern_size": 4, "min_count": 3}, {}, REFUSED, OK),
    "stream_interval": (2, {}, REFUSED, OK),
    "include_reasoning": (False, {}, REFUSED, OK),
    "add_generation_prompt": (False, {}, REFUSED, OK),
    "continue_final_message": (True, {"add_generation_prompt": False}, REFUSED, OK),
    "documents": ([{"title": "t", "text": "Paris is in France."}], {}, REFUSED, OK),
    "chat_template_kwargs": ({"anything": 1}, {}, REFUSED, OK),
    "return_prompt_text": (True, {}, REFUSED, OK),
    "guided_json": ({"type": "object"}, {}, REFUSED, OK),
    "guided_regex": ("[0-9]+", {}, REFUSED, OK),
    "guided_choice": (["yes", "no"], {}, REFUSED, OK),
    "guided_grammar": ('root ::= "yes" | "no"', {}, REFUSED, OK),
    "guided_whitespace_pattern": (" ", {"guided_json": {"type": "object"}}, REFUSED, OK),
    "guided_decoding_backend": ("xgrammar", {}, REFUSED, REFUSED),
    "chat_template": ("{{ 'x' }}", {}, REFUSED, REFUSED),
    "media_io_kwargs": ({}, {}, REFUSED, REFUSED),
    "mm_processor_kwargs": ({}, {}, REFUSED, REFUSED),
    "mm_payload": ("none", {}, REFUSED, REFUSED),
    "return_mm_kwargs": (True, {}, REFUSED, REFUSED),
    "prompt_embeds": ("AAAA", {}, REFUSED, REFUSED),
    "priority": (1, {}, REFUSED, REFUSED),
    "request_id": ("mine", {}, REFUSED, REFUSED),
    "session_id": ("mine", {}, REFUSED, REFUSED),
    "kv_transfer_params": ({}, {}, REFUSED, REFUSED),
    "ec_transfer_params": ({}, {}, REFUSED, REFUSED),
    "vllm_xargs": ({"a": 1}, {}, REFUSED, REFUSED),
    "routed_experts_prompt_start": (1, {}, REFUSED, REFUSED),
    "return_token_offsets": (True, {}, REFUSED, REFUSED),
    "watermarking": (True, {}, REFUSED, REFUSED),
}
# Where a completions request takes another value than a chat one.
COMPLETION_SAMPLES = {"logprobs": (2, {}, REFUSED, OK), "logprob_token_ids": ([5], {"logprobs": 1}, REFUSED, OK),
                      "return_tokens_as_token_ids": (True, {"logprobs": 1}, REFUSED, OK)}
# How vLLM's own refusal names a field, where it does not spell it.
VLLM_SAYS = {"tools": '"auto" tool choice requires'}
BASE_FIELDS = {"model", "messages", "prompt", "stream", "stream_options"}  # checked by every request

# Values that ask for nothing: accepted by both engines.
NEUTRAL = {"n": 1, "logprobs": False, "top_logprobs": 0, "echo": False, "response_format": {"type": "text"},
           "modalities": ["text"], "tool_choice": "none", "parallel_tool_calls": True, "ignore_eos": False,
           "min_tokens": 0, "use_beam_search": False, "skip_special_tokens": True,
           "include_stop_str_in_output": False, "add_generation_prompt": True, "continue_final_message": False}


def _openai_client_fields(endpoint):
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params

    params = (chat_create_params if endpoint == CHAT else completion_create_params).CompletionCreateParamsStreaming
    return params.__required_keys__ | params.__optional_keys__


def _samples(endpoint):
    for key, field in VLLM_FIELDS.items():
        if endpoint in field.endpoints and key not in BASE_FIELDS:
            yield key, *((COMPLETION_SAMPLES.get(key) if endpoint == COMPLETIONS else None) or SAMPLES[key])
    for key in METADATA:
        if key in _openai_client_fields(endpoint):
            yield key, *SAMPLES[key]


def _ask(client, endpoint, model, **fields):
    """One request with the fields in the JSON body as given (extra_body: the client adds nothing)."""
    fields = {"max_tokens": 4, "temperature": 0, **fields}
    if endpoint == CHAT:
        return client.chat.completions.create(model=model, messages=PING, extra_body=fields)
    return client.completions.create(model=model, prompt=PING_PROMPT, extra_body=fields)


def _check_every_field(client, model, endpoint, engine):
    """Sends each field alone (with what it needs) and checks the answer the table in SAMPLES expects."""
    for key, value, needs, *expected in _samples(endpoint):
        wanted = expected[0] if engine == "builtin" else expected[1]
        fields = {key: value, **needs}
        if wanted == OK:
            answer = _ask(client, endpoint, model, **fields)
            assert answer.choices, (endpoint, key)
            continue
        with pytest.raises(openai.BadRequestError) as refused:
            _ask(client, endpoint, model, **fields)
        error = refused.value
        if wanted == VLLM_REFUSES:
            assert error.param == key or VLLM_SAYS.get(key, key) in error.message, (endpoint, key, error.message)
            continue
        assert error.param == key and error.code == "unsupported_parameter", (endpoint, key, error.message)
        if engine == "builtin":
            assert f"'{key}' is not supported by the built-in server" in error.message, error.message
            hint = "vLLM serves it, but cannot serve this deployment" if VLLM_FIELDS[key].passed else (
                f"vLLM does not take it either: {VLLM_FIELDS[key].refused}")
            assert hint in error.message, (key, error.message)
        else:
            assert f"'{key}' is not supported by vLLM" in error.message, error.message


def _check_unknown_fields(client, model):
    for endpoint, key in ((CHAT, "frobnicate"), (CHAT, "suffix"), (CHAT, "prompt"), (COMPLETIONS, "tools"),
                          (COMPLETIONS, "messages"), (COMPLETIONS, "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as unknown:
            _ask(client, endpoint, model, **{key: 1})
        assert unknown.value.param == key and unknown.value.code == "unknown_parameter", unknown.value.message
        assert f"'{key}' is not a field of" in unknown.value.message


# ---------------------------------------------------------------- the tables themselves


def test_every_openai_field_has_a_fate_and_every_sample_is_listed():
    from serving.builtin_fields import BUILTIN_FIELDS

    for endpoint in (CHAT, COMPLETIONS):
        known = {k for k, f in VLLM_FIELDS.items() if endpoint in f.endpoints} | METADATA
        assert _openai_client_fields(endpoint) <= known, endpoint
    assert set(BUILTIN_FIELDS) <= set(VLLM_FIELDS), "the built-in engine knows no field /v1 would refuse"
    assert set(VLLM_FIELDS) | METADATA == set(SAMPLES) | BASE_FIELDS
    assert not METADATA & set(VLLM_FIELDS)


def test_vllm_field_table_matches_the_installed_vllm(settings):
    """Every request field of the installed vLLM is decided here, and every field passed on is one vLLM reads."""
    if not Path(settings.TUNEDECK_VLLM_PYTHON).is_file():
        pytest.skip(f"no vLLM environment at {settings.TUNEDECK_VLLM_PYTHON}: run scripts/setup-vllm.sh")
    code = (
        "import json, dataclasses\n"
        "from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as C\n"
        "from vllm.entrypoints.openai.completion.protocol import CompletionRequest as P\n"
        "from vllm.sampling_params import StructuredOutputsParams as S\n"
        "print(json.dumps([sorted(C.model_fields), sorted(P.model_fields), [f.name for f in dataclasses.fields(S)]]))"
    )
    result = subprocess.run([settings.TUNEDECK_VLLM_PYTHON, "-c", code], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    chat, completion, structured = json.loads(result.stdout.strip().splitlines()[-1])
    for endpoint, vllm_fields in ((CHAT, set(chat)), (COMPLETIONS, set(completion))):
        ours = {k for k, f in VLLM_FIELDS.items() if endpoint in f.endpoints}
        assert vllm_fields - METADATA <= ours, f"vLLM fields with no decision ({endpoint})"
        passed = {k for k in ours if VLLM_FIELDS[k].passed and not VLLM_FIELDS[k].rename}
        assert passed - {"max_completion_tokens"} <= vllm_fields, f"passed, but vLLM ignores them ({endpoint})"
    renamed = {f.rename.removeprefix("structured_outputs.") for f in VLLM_FIELDS.values() if f.rename}
    assert renamed <= set(structured)


def test_for_vllm_moves_the_removed_guided_fields_and_leaves_out_what_asks_for_nothing():
    body = {"model": "m", "guided_regex": "[0-9]+", "guided_whitespace_pattern": " ", "priority": 0, "top_k": 3}
    assert vllm_refusal(body) is None
    assert for_vllm(body) == {"model": "m", "top_k": 3,
                                            "structured_outputs": {"regex": "[0-9]+", "whitespace_pattern": " "}}
    assert vllm_refusal({"priority": 2}) == ("priority", VLLM_FIELDS["priority"].refused)
    assert vllm_refusal({"logprobs": 0, "best_of": 1}) is None  # 1 candidate: nothing asked


def test_the_builtin_refusal_says_how_to_get_vllm_when_it_is_not_installed(tmp_path):
    """The reason comes from the real engine choice for a model vLLM can run, with no vLLM environment."""
    from serving.builtin import BuiltinEngine
    from serving.engine import MERGED, RequestError, ServedModel, choose
    from serving.vllm import VllmEngine

    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_attention_heads": 9}))
    engines = [VllmEngine(python=str(tmp_path / "no-venv" / "python"), gpus=[]), BuiltinEngine()]
    builtin, choice = choose(engines, ServedModel("m", MERGED, model_dir=folder))
    assert choice.engine == "builtin"

    def refusal(key, reason, ahead=engines[:1]):
        with pytest.raises(RequestError) as refused:
            builtin.check_fields({key: 2}, reason, ahead)
        assert refused.value.status == 400 and refused.value.param == key
        return str(refused.value)

    message = refusal("logprobs", choice.reason)
    assert "scripts/setup-vllm.sh" in message and "deploy a method" not in message, message
    assert "vLLM does not take it either" in refusal("best_of", choice.reason)
    off = VllmEngine(enabled=False, gpus=[])
    assert "--no-vllm" in refusal("n", choose([off, builtin], ServedModel("m", MERGED, model_dir=folder))[1].reason)


# ---------------------------------------------------------------- the built-in engine's own effects


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The built-in engine in this process, on the random tiny model (its greedy answers repeat tokens)."""
    from serving.model_server import ModelServer

    server = ModelServer(device="cpu")
    server.add_merged("tiny", tiny_model_dir)
    return server


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _text(engine, **fields):
    return engine.chat("tiny", QUESTION, max_tokens=24, **fields)["text"]


def test_builtin_sampling_filters_reduce_to_greedy_when_they_keep_one_token(engine):
    greedy = _text(engine, temperature=0)
    assert _text(engine, temperature=1.5, seed=3) != greedy  # sampling does sample on this model
    assert _text(engine, temperature=1.5, seed=3, top_k=1) == greedy
    assert _text(engine, temperature=1.5, seed=3, min_p=1.0) == greedy
    assert _text(engine, temperature=1.5, seed=3, top_k=0) == _text(engine, temperature=1.5, seed=3)  # 0: all


def test_builtin_penalties_and_biases_change_the_logits_as_specified(engine, tiny_model_dir):
    import torch

    from serving.sampling import SamplingParams, request_processors

    prompt = torch.tensor([[5, 6, 7]])
    answer = torch.tensor([[5, 6, 7, 9, 9, 8]])  # the prompt, then the answer so far: 9 twice, 8 once
    scores = torch.randn(1, 384, generator=torch.Generator().manual_seed(0))

    def processed(**fields):
        return request_processors(SamplingParams(temperature=0, **fields), prompt.shape[1], 384)(answer, scores)

    assert torch.equal(processed(), scores)
    penalised = processed(repetition_penalty=2.0)
    seen = [5, 6, 7, 8, 9]  # in the prompt or the answer: transformers' and vLLM's repetition penalty
    expected = torch.where(scores[0, seen] > 0, scores[0, seen] / 2, scores[0, seen] * 2)
    assert torch.allclose(penalised[0, seen], expected)
    assert torch.equal(penalised[0, 10:], scores[0, 10:])
    openai_penalties = processed(presence_penalty=0.5, frequency_penalty=0.25)
    shift = scores - openai_penalties
    assert torch.allclose(shift[0, [9, 8, 5]], torch.tensor([0.5 + 0.5, 0.5 + 0.25, 0.0]))  # answer tokens only
    biased = processed(logit_bias={"42": 100})
    assert biased[0, 42] == scores[0, 42] + 100 and int(biased.argmax()) == 42


def test_builtin_penalties_change_a_greedy_answer_and_logit_bias_forces_a_token(engine, tiny_model_dir):
    from transformers import AutoTokenizer

    greedy = _text(engine, temperature=0)
    for fields in ({"repetition_penalty": 2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        assert _text(engine, temperature=0, **fields) != greedy, fields
    token = AutoTokenizer.from_pretrained(tiny_model_dir)("Paris")["input_ids"][0]
    forced = engine.chat("tiny", QUESTION, max_tokens=3, temperature=0, logit_bias={str(token): 100})
    assert forced["completion_tokens"] == 3 and forced["text"].startswith(
        AutoTokenizer.from_pretrained(tiny_model_dir).decode([token]))


# ---------------------------------------------------------------- through /v1, the built-in engine


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_builtin_engine_honours_or_refuses_each_field_through_v1(
    alice, live_server, user, tiny_base_model, tiny_model_dir, trained_adapters, serving, celery_worker, settings
):
    settings.TUNEDECK_INFERENCE_RATE = "100000/min"  # a request per field and endpoint
    version = make_version(user, tiny_base_model, trained_adapters["pong"], "fields")
    _, deployment = deploy(alice, version.pk, celery_worker, merge=True)
    assert deployment["status"] == "live" and deployment["engine"]["name"] == "builtin", deployment
    client = client_for(live_server, alice.token)

    _check_every_field(client, "fields", CHAT, "builtin")
    _check_every_field(client, "fields", COMPLETIONS, "builtin")
    _check_unknown_fields(client, "fields")

    plain = _ask(client, CHAT, "fields", max_tokens=8).choices[0].message.content
    assert plain == "pong"
    everything_neutral = _ask(client, CHAT, "fields", max_tokens=8, **NEUTRAL)
    assert everything_neutral.choices[0].message.content == plain
    assert _ask(client, COMPLETIONS, "fields", max_tokens=8, best_of=1, logprobs=None).choices[0].text == plain
    with pytest.raises(openai.BadRequestError) as zero:  # completions' logprobs 0 asks for the chosen token's
        _ask(client, COMPLETIONS, "fields", logprobs=0)
    assert zero.value.param == "logprobs"
    # tool_choice "none": no tool is called, the tools only shown to the template (ChatML ignores them).
    none = _ask(client, CHAT, "fields", max_tokens=8, tools=[TOOL], tool_choice="none")
    assert none.choices[0].message.content == plain and not none.choices[0].message.tool_calls
    # Honoured fields do what they say.
    hot = {"max_tokens": 8, "temperature": 2.0, "seed": 11}
    assert _ask(client, CHAT, "fields", top_k=1, **hot).choices[0].message.content == plain
    assert _ask(client, CHAT, "fields", min_p=1.0, **hot).choices[0].message.content == plain
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # the deployment's base: the same tokenizer
    token = tokenizer("Paris")["input_ids"][0]
    forced = _ask(client, CHAT, "fields", max_tokens=2, logit_bias={str(token): 100})
    assert forced.choices[0].message.content == tokenizer.decode([token]) * 2
    assert _ask(client, CHAT, "fields", max_completion_tokens=2).usage.completion_tokens == 2

    # Shapes /v1 checks itself, naming the field.
    for fields, param in (({"top_k": "one"}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0},
                          "repetition_penalty"), ({"logit_bias": {"x": 1}}, "logit_bias"), ({"tools": []}, "tools"),
                          ({"ignore_eos": "yes"}, "ignore_eos"), ({"stream_options": {"include_usage": True}},
                          "stream_options"), ({"structured_outputs": "json"}, "structured_outputs")):
        with pytest.raises(openai.BadRequestError) as bad:
            _ask(client, CHAT, "fields", **fields)
        assert bad.value.param == param, (fields, bad.value.message)
    with pytest.raises(openai.BadRequestError) as obfuscation:
        client.chat.completions.create(model="fields", messages=PING, stream=True,
                                       stream_options={"include_obfuscation": True})
    assert obfuscation.value.param == "stream_options.include_obfuscation"


# ---------------------------------------------------------------- through /v1, vLLM


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(STARTUP_SECONDS + 1200)  # vLLM's start, then some 150 requests on 2 shared cores
@pytest.mark.django_db(transaction=True)
def test_vllm_honours_or_refuses_each_field_through_v1(vllm_available, alice, live_server, user, smollm_loras,
                                                       serving, celery_worker, settings):
    """One vLLM server (SmolLM2 with a LoRA adapter), every field sent to it through /v1."""
    settings.TUNEDECK_INFERENCE_RATE = "100000/min"  # a request per field and endpoint
    base = make_base_model(SMOLLM, name="SmolLM2-135M-Instruct", default=False)
    version = make_version(user, base, smollm_loras[0], "smol-fields", method="lora")
    response = alice.post(f"{alice.base}/adapter-versions/{version.pk}/deploy", json={"merge": False})
    assert response.status_code == 202, response.text
    deployment_id = response.json()["deployment"]["id"]
    wait_status(alice, deployment_id, timeout=STARTUP_SECONDS, worker=celery_worker)
    live = wait_for(lambda: ((d := alice.get(f"{alice.base}/deployments/{deployment_id}").json())["engine"] or {})
                    .get("name") == "vllm" and d, timeout=STARTUP_SECONDS, what="vLLM taking over")
    assert live["status"] == "live" and live["engine"]["name"] == "vllm", live
    client = client_for(live_server, alice.token)

    _check_every_field(client, "smol-fields", CHAT, "vllm")
    _check_every_field(client, "smol-fields", COMPLETIONS, "vllm")
    _check_unknown_fields(client, "smol-fields")
    neutral = {"priority": 0, "watermarking": False, "return_token_offsets": False, "routed_experts_prompt_start": 0}
    assert _ask(client, CHAT, "smol-fields", **NEUTRAL, **neutral).choices
    assert _ask(client, COMPLETIONS, "smol-fields", best_of=1).choices

    def say(**fields):
        return _ask(client, CHAT, "smol-fields", **{"max_tokens": 24, **fields}).choices[0]

    greedy = say().message.content
    assert say(temperature=1.5, seed=5).message.content != greedy  # sampling does sample
    assert say(temperature=1.5, seed=5, top_k=1).message.content == greedy
    assert say(temperature=1.5, seed=5, min_p=1.0).message.content == greedy
    assert say(repetition_penalty=2.0).message.content != greedy  # the answer repeats the question's words
    assert say(guided_choice=["yes", "no"]).message.content in ("yes", "no")
    assert re.fullmatch(r"[0-9]{3}", say(guided_regex="[0-9]{3}").message.content)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    answer = say(max_tokens=40, guided_json=schema)
    if answer.finish_reason == "stop":
        assert isinstance(json.loads(answer.message.content)["city"], str)
    assert say(structured_outputs={"choice": ["oui", "non"]}).message.content in ("oui", "non")
    long = say(max_tokens=12, ignore_eos=True)
    assert long.finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as two:  # vLLM's own check, on what the guided_* fields became
        say(guided_choice=["a"], guided_regex="b")
    assert two.value.status_code == 400

import json
import shutil
import threading

import pytest
import torch

from finetune.errors import TunedeckError
from finetune.merge import attach_adapter, merge_adapter
from finetune.modelstore import load_model_and_tokenizer, stop_token_ids
from serving import model_server
from serving.model_server import ModelServer, UnknownModel
from serving.sampling import GenerationRequestError
from tests.finetune.adapter_factory import default_model_folder, make_adapter

QUESTION = [{"role": "user", "content": "What is 2+2?"}]
PROMPTS = ["What is 2+2?", "hello", "Is the sky blue?"]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-adapters")
    # Strong perturbations, so that each adapter pulls the random tiny model to its own distinct output.
    return {
        "one": make_adapter(tiny_model_dir, root / "one", "lora", seed=1, scale=0.1),
        "two": make_adapter(tiny_model_dir, root / "two", "lora", seed=2, scale=0.1),
        "three": make_adapter(tiny_model_dir, root / "three", "dora", seed=3, scale=0.1),
        "prefix": make_adapter(tiny_model_dir, root / "prefix", "prefix", seed=4, scale=1.0),
        "qlora": make_adapter(tiny_model_dir, root / "qlora", "qlora", seed=5, scale=0.1),
    }


@pytest.fixture(scope="module")
def merged_one(adapters, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serving-merged") / "one"
    merge_adapter(tiny_model_dir, adapters["one"], out, device="cpu")
    return out


@pytest.fixture
def server(adapters, tiny_model_dir):
    server = ModelServer(max_adapters=8, device="cpu")
    for name in ("one", "two", "three"):
        server.add_adapter(name, adapters[name], base_path=tiny_model_dir)
    return server


def _reference_text(base_dir, adapter_dir, messages, max_tokens=12, quantize_4bit=False, by_forward=False):
    """Greedy generation with the adapter loaded alone on a fresh base: what the server must reproduce.
    by_forward: argmax of the full forward pass token by token, not `generate` (which ignores a prefix)."""
    base, tokenizer = load_model_and_tokenizer(base_dir, device="cpu", quantize_4bit=quantize_4bit)
    model = attach_adapter(base, adapter_dir) if adapter_dir else base
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    stops = stop_token_ids(tokenizer, base.generation_config)
    with torch.no_grad():
        if by_forward:
            out = ids["input_ids"]
            for _ in range(max_tokens):
                out = torch.cat([out, model(input_ids=out).logits[:, -1:].argmax(-1)], dim=1)
                if int(out[0, -1]) in stops:
                    break
        else:
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops)
    new = [t for t in out[0, ids["input_ids"].shape[1] :].tolist() if t not in stops]
    return tokenizer.decode(new, skip_special_tokens=True)


def _ask(server, name, prompt="What is 2+2?", **kwargs):
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("temperature", 0)
    return server.chat(name, [{"role": "user", "content": prompt}], **kwargs)


# --- multi-LoRA routing ------------------------------------------------------------------------------------


def test_each_adapter_answers_like_itself_alone(server, adapters, tiny_model_dir):
    expected = {
        name: _reference_text(tiny_model_dir, adapters[name], QUESTION) for name in ("one", "two", "three")
    }
    assert len(set(expected.values())) == 3, "the test adapters should behave differently"
    for name in ["one", "two", "three", "two", "one", "three"]:  # interleaved: switching must not leak
        assert _ask(server, name)["text"] == expected[name]


def test_adapters_share_one_loaded_base(server, monkeypatch):
    loads = []
    real_load = model_server.load_model_and_tokenizer
    monkeypatch.setattr(
        model_server, "load_model_and_tokenizer", lambda *a, **k: loads.append(a) or real_load(*a, **k)
    )
    for name in ("one", "two", "three"):
        _ask(server, name, max_tokens=2)
    assert len(loads) == 1


def test_routed_logits_equal_adapter_alone(server, adapters, tiny_model_dir):
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    for name in ("one", "two"):
        server.load(name)
        deployment, group = server._lookup(name)
        with group.lock:
            routed = server._activate(group, deployment)(input_ids=ids).logits
        base, _ = load_model_and_tokenizer(tiny_model_dir, device="cpu")
        alone = attach_adapter(base, adapters[name])(input_ids=ids).logits
        assert torch.allclose(routed, alone, atol=1e-6)


def test_lru_eviction(adapters, tiny_model_dir):
    server = ModelServer(max_adapters=2, device="cpu")
    for name in ("one", "two", "three"):
        server.add_adapter(name, adapters[name], base_path=tiny_model_dir)
    first = {name: _ask(server, name)["text"] for name in ("one", "two", "three")}
    assert _loaded(server) == {"two", "three"}
    _ask(server, "two")
    assert _ask(server, "one")["text"] == first["one"]  # reloaded after eviction, same answer
    assert _loaded(server) == {"two", "one"}


def _loaded(server):
    return {m["name"] for m in server.list_models() if m["loaded"]}


def test_adapter_base_defaults_to_recorded_path(adapters, tiny_model_dir):
    server = ModelServer(device="cpu")
    server.add_adapter("one", adapters["one"])
    assert server.list_models()[0]["base"] == str(tiny_model_dir.resolve())


def test_prefix_adapter_is_served_unmerged(adapters, tiny_model_dir):
    server = ModelServer(device="cpu")
    server.add_adapter("prefix", adapters["prefix"], base_path=tiny_model_dir)
    server.add_adapter("one", adapters["one"], base_path=tiny_model_dir)
    server.add_merged("base", tiny_model_dir)
    prefixed = _ask(server, "prefix")["text"]
    assert prefixed == _reference_text(tiny_model_dir, adapters["prefix"], QUESTION, by_forward=True)
    # transformers' generate skips peft's prefix injection: served through it, a prefix deployment was the base.
    assert prefixed != _ask(server, "base")["text"]
    assert prefixed != _reference_text(tiny_model_dir, None, QUESTION, by_forward=True)
    assert _ask(server, "one")["text"] == _reference_text(tiny_model_dir, adapters["one"], QUESTION)


def test_qlora_adapter_is_served_on_a_4bit_base(adapters, tiny_model_dir):
    server = ModelServer(device="cpu")
    server.add_adapter("qlora", adapters["qlora"], base_path=tiny_model_dir)
    server.add_adapter("qlora-fp", adapters["qlora"], base_path=tiny_model_dir, quantize_4bit=False)
    server.add_adapter("one", adapters["one"], base_path=tiny_model_dir)
    assert _ask(server, "qlora")["text"] == _reference_text(
        tiny_model_dir, adapters["qlora"], QUESTION, quantize_4bit=True
    )
    assert _ask(server, "qlora-fp")["text"] == _reference_text(tiny_model_dir, adapters["qlora"], QUESTION)
    quantized = {m["name"]: m["quantized_4bit"] for m in server.list_models()}
    assert quantized == {"qlora": True, "qlora-fp": False, "one": False}


def test_concurrent_requests_keep_their_adapters(server):
    expected = {name: _ask(server, name)["text"] for name in ("one", "two", "three")}
    results, errors = [], []

    def ask(name):
        try:
            results.append((name, _ask(server, name)["text"]))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(name,)) for name in ["one", "two", "three"] * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert len(results) == 9 and all(text == expected[name] for name, text in results)


# --- merged deployments ------------------------------------------------------------------------------------


def test_merged_generations_equal_adapter_on_base(server, merged_one):
    server.add_merged("one-merged", merged_one)
    for prompt in PROMPTS:
        assert _ask(server, "one-merged", prompt)["text"] == _ask(server, "one", prompt)["text"]
    assert {m["name"]: m["kind"] for m in server.list_models()}["one-merged"] == "merged"


def test_plain_completion(server, merged_one):
    server.add_merged("m", merged_one)
    result = server.complete("m", "The capital of France is", max_tokens=5, temperature=0)
    assert result["finish_reason"] == "length" and result["completion_tokens"] == 5
    assert result["prompt_tokens"] > 0


# --- generation controls -----------------------------------------------------------------------------------


def test_streaming_matches_non_streaming(server, merged_one):
    server.add_merged("m", merged_one)
    for name in ("one", "m"):
        expected = _ask(server, name, max_tokens=16)
        *deltas, final = server.stream_chat(name, QUESTION, max_tokens=16, temperature=0)
        assert all(isinstance(d, str) for d in deltas)
        assert "".join(deltas) == expected["text"] and final == expected
    expected = server.complete("m", "hello", max_tokens=16, temperature=0)
    *deltas, final = server.stream_complete("m", "hello", max_tokens=16, temperature=0)
    assert "".join(deltas) == expected["text"] and final == expected


def test_stop_strings(server):
    full = _ask(server, "one", max_tokens=16)["text"]
    stop = full[5:7]
    result = _ask(server, "one", max_tokens=16, stop=[stop, "never-there"])
    assert result["finish_reason"] == "stop"
    assert result["text"] == full[: full.index(stop)]
    *deltas, final = server.stream_chat("one", QUESTION, max_tokens=16, temperature=0, stop=stop)
    assert "".join(deltas) == result["text"] and final == result


def test_stops_on_generation_config_stop_tokens(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    server = ModelServer(device="cpu")
    server.add_merged("m", model_dir)
    _, tokenizer = load_model_and_tokenizer(model_dir, device="cpu")
    first_token = tokenizer(_ask(server, "m", max_tokens=1)["text"])["input_ids"][0]
    # Declare the token the model says first an end-of-turn token: it must now stop at once.
    generation = json.loads((model_dir / "generation_config.json").read_text())
    generation["eos_token_id"] = [generation["eos_token_id"], first_token]
    (model_dir / "generation_config.json").write_text(json.dumps(generation))
    fresh = ModelServer(device="cpu")
    fresh.add_merged("m", model_dir)
    result = _ask(fresh, "m")
    assert result == {
        "text": "",
        "finish_reason": "stop",
        "prompt_tokens": result["prompt_tokens"],
        "completion_tokens": 1,
    }


def test_model_sampling_defaults_do_not_leak_into_requests(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    generation.update(
        do_sample=True, temperature=5.0, top_k=3, repetition_penalty=2.0, no_repeat_ngram_size=2
    )
    (model_dir / "generation_config.json").write_text(json.dumps(generation))
    server = ModelServer(device="cpu")
    server.add_merged("plain", tiny_model_dir)
    server.add_merged("opinionated", model_dir)
    assert _ask(server, "opinionated")["text"] == _ask(server, "plain")["text"]


def test_length_limit(server):
    result = _ask(server, "one", max_tokens=3)
    assert result["finish_reason"] == "length" and result["completion_tokens"] == 3


def test_seeded_sampling_is_reproducible(server):
    a = _ask(server, "one", temperature=1.0, seed=7, max_tokens=16)
    b = _ask(server, "one", temperature=1.0, seed=7, max_tokens=16)
    c = _ask(server, "one", temperature=1.0, seed=8, max_tokens=16)
    greedy = _ask(server, "one", max_tokens=16)
    assert a == b
    assert a["text"] != c["text"] or a["text"] != greedy["text"]


def test_tiny_top_p_is_greedy(server):
    assert _ask(server, "one", temperature=1.0, top_p=1e-6, seed=1) == _ask(server, "one")


def test_content_parts_are_flattened(server):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]}
    ]
    assert server.chat("one", parts, max_tokens=8, temperature=0) == _ask(server, "one", max_tokens=8)


def test_abandoned_stream_releases_the_model(server):
    stream = server.stream_chat("one", QUESTION, max_tokens=200, temperature=0)
    next(stream)
    stream.close()
    assert _ask(server, "one", max_tokens=2)["completion_tokens"] == 2


# --- errors ------------------------------------------------------------------------------------------------


def test_unknown_model(server):
    with pytest.raises(UnknownModel, match="nope"):
        _ask(server, "nope")
    with pytest.raises(UnknownModel):
        server.stream_chat("nope", QUESTION)
    with pytest.raises(UnknownModel):
        server.remove("nope")


def test_duplicate_name_refused(server, adapters):
    with pytest.raises(TunedeckError, match="already"):
        server.add_adapter("one", adapters["two"])


def test_remove(server):
    _ask(server, "one")
    _ask(server, "two")
    server.remove("one")
    assert {m["name"] for m in server.list_models()} == {"two", "three"}
    assert _ask(server, "two", max_tokens=2)["completion_tokens"] == 2
    server.remove("two")
    server.remove("three")
    assert server.list_models() == [] and server._bases == {}


def test_removing_last_loaded_adapter_keeps_others_servable(server, adapters, tiny_model_dir):
    expected = _reference_text(tiny_model_dir, adapters["two"], QUESTION)
    _ask(server, "one")
    server.remove("one")  # "one" was the only adapter loaded on the base
    assert _ask(server, "two")["text"] == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p")],
)
def test_bad_parameters(server, kwargs, message):
    with pytest.raises(GenerationRequestError, match=message):
        _ask(server, "one", **kwargs)


def test_bad_messages(server):
    with pytest.raises(GenerationRequestError, match="messages"):
        server.chat("one", [])
    with pytest.raises(GenerationRequestError, match="role"):
        server.chat("one", [{"content": "hi"}])


def test_prompt_longer_than_context(server):
    with pytest.raises(GenerationRequestError, match="context"):
        server.complete("one", "hello " * 600, max_tokens=4)


def test_context_limit_clamps_max_tokens(server):
    result = server.complete("one", "hello " * 254, max_tokens=100, temperature=0)
    assert result["prompt_tokens"] + result["completion_tokens"] <= 512


# --- the real default model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_served(tmp_path_factory):
    dest, _, _ = default_model_folder(tmp_path_factory)
    server = ModelServer(device="cpu")
    server.add_merged("smol", dest)
    result = server.chat("smol", QUESTION, max_tokens=48, temperature=0)
    assert result["finish_reason"] == "stop" and "4" in result["text"], result
    *deltas, final = server.stream_chat("smol", QUESTION, max_tokens=48, temperature=0)
    assert "".join(deltas) == result["text"] and final == result

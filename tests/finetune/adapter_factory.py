"""Builds PEFT adapters on the tiny model without training: random weights that visibly change outputs.

The training loop is tested elsewhere; merge and serving only need adapters of each kind whose effect is
known.
"""

from __future__ import annotations

import json
from pathlib import Path

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_config(method: str):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    if method in ("lora", "qlora", "dora"):
        return LoraConfig(
            r=4, lora_alpha=8, target_modules=LLAMA_LINEAR, use_dora=method == "dora", task_type="CAUSAL_LM"
        )
    if method == "ia3":
        return IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            task_type="CAUSAL_LM",
        )
    if method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    raise ValueError(method)


def make_adapter(base_dir, out_dir, method: str = "lora", *, seed: int = 1, scale: float = 0.05) -> Path:
    """Saves an adapter of `method` for `base_dir` into `out_dir`; QLoRA is built on the 4-bit base."""
    import torch
    from peft import get_peft_model

    from finetune.modelstore import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(base_dir, device="cpu", dtype="fp32", quantize_4bit=method == "qlora")
    torch.manual_seed(seed)  # peft initialises some adapter weights from the global RNG
    model = get_peft_model(base, peft_config(method))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * scale
                # IA3 vectors scale activations around 1; other adapter weights perturb around their init.
                param.copy_(1.0 + noise * 4 if "ia3_" in name else param + noise)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    (out_dir / "tunedeck.json").write_text(json.dumps({"method": method, "plan": {"method": method}}))
    return out_dir


_default_model: dict = {}


def default_model_folder(tmp_path_factory) -> tuple[Path, dict, float]:
    """The real SmolLM2 converted once per test session, shared by every test module that needs it."""
    import time

    from finetune.modelstore import import_default_model

    if not _default_model:
        dest = tmp_path_factory.getbasetemp() / "default-model" / "SmolLM2-135M-Instruct"
        started = time.monotonic()
        info = import_default_model(dest)
        _default_model.update(dest=dest, info=info, seconds=time.monotonic() - started)
    return _default_model["dest"], _default_model["info"], _default_model["seconds"]

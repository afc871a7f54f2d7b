"""Wraps a base model for each fine-tuning method and saves/loads the result as an adapter folder.

LoRA, QLoRA, DoRA, IA3, prefix tuning, prompt tuning and DPO (on LoRA) use peft. Adapter layers are classic
bottleneck adapters (Houlsby et al. 2019): a small down-project / GELU / up-project block with a residual, after
the attention and the MLP of every decoder layer; peft has no such method, so they live here, saved in the same
folder layout (adapter_config.json + adapter_model.safetensors) with peft_type BOTTLENECK_ADAPTER.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import TrainingError
from .method_traits import method_names, names_where

PEFT_METHODS = set(names_where(peft=True))
ALL_METHODS = set(method_names())
BOTTLENECK_TYPE = "BOTTLENECK_ADAPTER"


def _targets(plan: dict):
    modules = plan.get("target_modules")
    if not modules:
        return "all-linear"
    return modules


def peft_config_for(plan: dict, model):
    """The peft config that implements plan["method"]."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    method = plan["method"]
    if method in ("lora", "qlora", "dora", "dpo", "kto"):
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=int(plan.get("rank") or 16),
            lora_alpha=float(plan.get("alpha") or 2 * int(plan.get("rank") or 16)),
            lora_dropout=float(plan.get("dropout", 0.05) or 0.0),
            target_modules=_targets(plan),
            use_dora=method == "dora",
            bias="none",
        )
    if method == "ia3":
        targets = plan.get("target_modules") or None
        feedforward = [m for m in (targets or []) if any(k in m for k in ("down_proj", "fc2", "mlp.c_proj", "w2"))]
        if targets and not feedforward:
            feedforward = None
        kwargs = {"target_modules": targets}
        if targets:
            kwargs["feedforward_modules"] = feedforward or []
        return IA3Config(task_type=TaskType.CAUSAL_LM, **kwargs)
    if method == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=int(plan.get("num_virtual_tokens") or 20))
    if method == "prompt":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=int(plan.get("num_virtual_tokens") or 20))
    raise TrainingError(f"Unknown method {method!r}; choose one of {', '.join(sorted(ALL_METHODS))}.")


def wrap_for_training(model, plan: dict):
    """Freezes the base and adds the method's trainable parameters; returns the model to train."""
    for p in model.parameters():
        p.requires_grad_(False)
    if plan["method"] == "adapter":
        return add_bottleneck_adapters(model, int(plan.get("adapter_bottleneck") or 64))
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config_for(plan, model))
    except ValueError as exc:
        raise TrainingError(f"Cannot apply {plan['method']} to this model: {exc}") from None


# ------------------------------------------------------------------------------------------ bottleneck adapters


def _decoder_layers(model):
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers", "transformer.blocks"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise TrainingError("Adapter layers need a decoder-layer stack this version does not recognise.")


def _sublayers(layer):
    names = []
    for name in ("self_attn", "attn", "attention", "mlp", "feed_forward"):
        if getattr(layer, name, None) is not None:
            names.append(name)
    if not names:
        raise TrainingError("Adapter layers could not find attention/MLP blocks in the decoder layers.")
    return names


def _hidden_size(model) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or getattr(config, "n_embd"))


def _make_adapter(hidden: int, bottleneck: int, dtype, device):
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Linear(hidden, bottleneck)
            self.up = nn.Linear(bottleneck, hidden)
            nn.init.zeros_(self.up.weight)  # starts as the identity: training begins from the base model
            nn.init.zeros_(self.up.bias)

        def forward(self, x):
            return x + self.up(torch.nn.functional.gelu(self.down(x)))

    return Bottleneck().to(device=device, dtype=dtype)


def add_bottleneck_adapters(model, bottleneck: int, *, trainable: bool = True):
    """Adds adapters after each attention and MLP block, via forward hooks (the base modules stay untouched)."""
    from torch import nn

    layers = _decoder_layers(model)
    hidden = _hidden_size(model)
    reference = next(p for p in model.parameters() if p.is_floating_point())
    dtype = reference.dtype if reference.dtype.is_floating_point and reference.element_size() >= 2 else None
    adapters = nn.ModuleDict()
    for i, layer in enumerate(layers):
        for name in _sublayers(layer):
            adapter = _make_adapter(hidden, bottleneck, dtype or reference.dtype, reference.device)
            adapters[f"{i}_{name}"] = adapter
            getattr(layer, name).register_forward_hook(_hook(adapter))
    for p in adapters.parameters():
        p.requires_grad_(trainable)
    model.tunedeck_adapters = adapters
    model.tunedeck_adapter_config = {"peft_type": BOTTLENECK_TYPE, "bottleneck": bottleneck, "hidden_size": hidden}
    return model


def _hook(adapter):
    def forward_hook(module, args, output):
        if isinstance(output, tuple):
            return (adapter(output[0]),) + tuple(output[1:])
        return adapter(output)

    return forward_hook


def is_bottleneck_folder(adapter_dir) -> bool:
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("peft_type") == BOTTLENECK_TYPE


def save_bottleneck(model, out_dir) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.tunedeck_adapters.state_dict().items()}
    save_file(state, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps(model.tunedeck_adapter_config, indent=2))


def load_bottleneck(model, adapter_dir):
    """Adds saved adapter layers to a loaded base model, for evaluation or serving."""
    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if int(config.get("hidden_size", 0)) != _hidden_size(model):
        raise TrainingError(
            f"These adapter layers were trained for hidden size {config.get('hidden_size')}, "
            f"but the base model has {_hidden_size(model)}."
        )
    add_bottleneck_adapters(model, int(config["bottleneck"]), trainable=False)
    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    model.tunedeck_adapters.load_state_dict(state)
    return model


# ------------------------------------------------------------------------------------------ saving and checkpoints


def trainable_state(model) -> dict:
    """Only the trained parameters (what a checkpoint needs), keyed by their names."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise TrainingError(f"The checkpoint does not match this model ({len(missing)} unknown parameters).")
    import torch

    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def save_adapter(model, plan: dict, out_dir) -> None:
    out_dir = Path(out_dir)
    if plan["method"] == "adapter":
        save_bottleneck(model, out_dir)
    else:
        model.save_pretrained(str(out_dir), safe_serialization=True)

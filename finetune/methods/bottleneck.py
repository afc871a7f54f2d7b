"""Bottleneck adapter layers (Houlsby et al. 2019), Tunedeck's own module: a small down-project / GELU / up-project
block with a residual, after the attention and the MLP of every decoder layer. peft has no such method, so it lives
here, saved in peft's folder layout (adapter_config.json + adapter_model.safetensors) with peft_type
BOTTLENECK_ADAPTER. They add modules with their own non-linearity, so they never merge, and vLLM cannot serve them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import TrainingError
from .base import Method, register_method

BOTTLENECK_TYPE = "BOTTLENECK_ADAPTER"
DEFAULT_BOTTLENECK = 64
ADAPTERS_PER_LAYER = 2  # after the attention and after the MLP


@dataclass(frozen=True)
class BottleneckMethod(Method):
    peft: bool = False

    def wrap(self, model, plan: dict):
        return add_bottleneck_adapters(model, int(plan.get("adapter_bottleneck") or DEFAULT_BOTTLENECK))

    def save(self, model, out_dir) -> None:
        save_bottleneck(model, out_dir)

    # ------------------------------------------------------------------ the estimator

    def trainable_bytes(self, compute_bytes: int) -> int:
        return compute_bytes  # created in the base's dtype, unlike peft's fp32 adapters

    def trainable_parameters(self, shape, setup) -> int:
        h, b = shape.hidden_size, setup.adapter_bottleneck
        one_adapter = h * b + b + b * h + h  # down and up projections with biases
        return shape.num_layers * ADAPTERS_PER_LAYER * one_adapter

    def activation_bytes_per_token(self, shape, setup) -> float:
        """Each adapter keeps its input, the down projection's output and the GELU's output (base dtype)."""
        return ADAPTERS_PER_LAYER * setup.compute_bytes * (shape.hidden_size + 2 * setup.adapter_bottleneck)

    # ------------------------------------------------------------------ the planner

    def plan_settings(self, base: dict) -> dict:
        return {"adapter_bottleneck": base["adapter_bottleneck"]}


ADAPTER = register_method(BottleneckMethod(
    "adapter", "Bottleneck adapters", 1e-4,
    "bottleneck adapters are dense layers in the residual path, trained like a small network",
    merge_refusal="adapter layers add new modules (with their own non-linearity) between the base layers; they "
    "cannot be folded into the base weights",
    adapter_peft_types=("ADAPTION_PROMPT",)))


# ------------------------------------------------------------------------------------------ the modules


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
    return int(getattr(config, "hidden_size", None) or config.n_embd)


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

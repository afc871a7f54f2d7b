"""The fine-tuning methods: one module per method or family, each registering its own `Method` (base.py).

    lora.py            lora, qlora, dora
    ia3.py             ia3
    virtual_tokens.py  prefix, prompt
    bottleneck.py      adapter (Tunedeck's own bottleneck adapter layers)
    preference.py      dpo, kto (on a LoRA, against the base as reference)
    orpo.py            orpo (on a LoRA, no reference): the worked example of adding a method

A new method is one new module here (a Method subclass answering its hooks, one register_method call) plus its
tests: every module of this package is imported below, so nothing else needs an edit. Pure Python at import time:
torch and peft are imported inside the methods that use them.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from ..errors import TrainingError
from .base import (
    AUTO,
    METHODS,
    Method,
    auto_method_for_schema,
    auto_methods,
    find_method,
    get_method,
    merge_problem,
    method_for_peft_type,
    method_names,
    method_plan_field_labels,
    method_plan_fields,
    methods_where,
    names_where,
    register_method,
    schema_problem,
)

# Each module registers its methods on import. The built-in families come first, in the order users see them;
# any other module of the package follows, by name.
BUILT_IN_ORDER = ("lora", "ia3", "virtual_tokens", "bottleneck", "preference")


def _method_modules() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_")}
    return [*[name for name in BUILT_IN_ORDER if name in found], *sorted(found - set(BUILT_IN_ORDER))]


for _module in _method_modules():
    importlib.import_module(f".{_module}", __name__)

from .bottleneck import (  # after the loop above, which registers the built-in families in their order
    BOTTLENECK_TYPE,
    add_bottleneck_adapters,
    is_bottleneck_folder,
    load_bottleneck,
    save_bottleneck,
)

PEFT_METHODS = set(names_where(peft=True))
ALL_METHODS = set(method_names())

__all__ = [
    "ALL_METHODS", "AUTO", "BOTTLENECK_TYPE", "METHODS", "PEFT_METHODS", "Method", "add_bottleneck_adapters",
    "auto_method_for_schema", "auto_methods", "find_method", "get_method", "is_bottleneck_folder",
    "load_bottleneck", "load_trainable_state", "merge_problem", "method_for_peft_type", "method_names",
    "method_plan_field_labels", "method_plan_fields", "methods_where", "names_where", "peft_config_for", "register_method", "save_adapter",
    "save_bottleneck", "schema_problem", "trainable_state", "wrap_for_training",
]


def peft_config_for(plan: dict, model=None):
    """The peft config that implements plan["method"]."""
    method = get_method(plan["method"])
    config = method.peft_config(plan)
    if config is None:
        raise TrainingError(f"{method.label} is not a peft method; it has no peft config.")
    return config


def wrap_for_training(model, plan: dict):
    """Freezes the base and adds the method's trainable parameters; returns the model to train."""
    method = get_method(plan["method"])
    for p in model.parameters():
        p.requires_grad_(False)
    return method.wrap(model, plan)


def save_adapter(model, plan: dict, out_dir) -> None:
    get_method(plan["method"]).save(model, Path(out_dir))


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

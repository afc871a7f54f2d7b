"""The optimizer a plan names (plan["optimizer"], chosen by autotune/select.py and costed by autotune/estimate.py).

    build_optimizer(params, plan, device) -> torch.optim.Optimizer

adamw             torch.optim.AdamW
adamw_fused       torch.optim.AdamW(fused=True): one kernel per step on CUDA (the default there)
paged_adamw       bitsandbytes PagedAdamW: fp32 state in CUDA unified memory, evicted to host RAM under pressure
paged_adamw_8bit  bitsandbytes PagedAdamW8bit: the same with blockwise 8-bit state (2 bytes per parameter)
"""
from __future__ import annotations

from autotune.estimate import OPTIMIZERS, default_optimizer

from .errors import TrainingError


def optimizer_name(plan: dict, device) -> str:
    device_type = getattr(device, "type", str(device)).split(":")[0]
    name = str(plan.get("optimizer") or default_optimizer("cuda" if device_type == "cuda" else "cpu")).lower()
    if name not in OPTIMIZERS:
        raise TrainingError(f"Unknown optimizer {name!r} in the plan; choose one of {', '.join(OPTIMIZERS)}.")
    if OPTIMIZERS[name][1] and device_type != "cuda":
        raise TrainingError(f"Optimizer {name!r} pages its state through CUDA unified memory and needs a GPU; "
                            f"this job runs on {device_type}. Replan, or choose adamw.")
    return name


def build_optimizer(params, plan: dict, device):
    """The plan's optimizer over `params`, with its learning_rate and weight_decay (the schedule sets lr later)."""
    import torch

    name = optimizer_name(plan, device)
    params = [p for p in params if p.requires_grad]
    settings = {"lr": float(plan.get("learning_rate") or 1e-4), "weight_decay": float(plan.get("weight_decay") or 0.0)}
    if name in ("adamw", "adamw_fused"):
        return torch.optim.AdamW(params, fused=name == "adamw_fused", **settings)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise TrainingError(f"Optimizer {name!r} needs the bitsandbytes package on this worker; install "
                            "tunedeck[train], or replan with adamw.") from None
    optimizer = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.PagedAdamW
    return optimizer(params, **settings)

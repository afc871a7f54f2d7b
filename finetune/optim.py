"""The optimizer a plan names (plan["optimizer"], chosen by autotune/select.py and costed by autotune/estimate.py).

    build_optimizer(params, plan, device) -> torch.optim.Optimizer

adamw             torch.optim.AdamW
adamw_fused       torch.optim.AdamW(fused=True): one kernel per step on CUDA (the default there)
paged_adamw       bitsandbytes PagedAdamW: fp32 state in CUDA unified memory, evicted to host RAM under pressure
paged_adamw_8bit  bitsandbytes PagedAdamW8bit: the same with blockwise 8-bit state (2 bytes per parameter)
"""
from __future__ import annotations

from .errors import TrainingError

ADAM_STATES = 2  # two moments per trainable parameter
FP32 = 4
BNB_BLOCKWISE = 256  # values per fp32 absmax in bitsandbytes' 8-bit optimizer state
# name: (bytes of state per trainable parameter, or None for two moments in the parameter's dtype; paged).
# autotune/estimate.py costs the state from this table.
OPTIMIZERS = {
    "adamw": (None, False),
    "adamw_fused": (None, False),
    "paged_adamw": (ADAM_STATES * FP32, True),
    "paged_adamw_8bit": (ADAM_STATES * (1 + FP32 / BNB_BLOCKWISE), True),
}


def default_optimizer(device: str) -> str:
    """The optimizer for a plan that names none: one fused AdamW kernel per step on CUDA, plain AdamW elsewhere."""
    return "adamw_fused" if device == "cuda" else "adamw"


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

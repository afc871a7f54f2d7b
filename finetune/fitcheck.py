"""Will the plan fit, and what to do when it does not.

Before the first real step, fit_check runs the plan's worst micro-batch (its longest rows) through forward,
backward and an optimizer step at learning rate 0 and measures the peak memory; act_on_fit_check records it, or
shrinks the plan and raises Replan so training starts again with the smaller one. During training a CUDA
out-of-memory error (is_oom) is answered the same way by the loop: release_memory, shrink_after_oom, retry.
"""
from __future__ import annotations

from .collate import collate, packed_positions
from .errors import OutOfMemory
from .fastloss import token_loss_sum
from .methods import get_method
from .trainspec import TrainSpec
from .units import format_bytes


class Replan(Exception):
    """The fit check found the plan too big: train again from the start with the smaller plan in spec."""


# ------------------------------------------------------------------------------------------ measuring


def worst_case_batch(train_rows: list[dict], micro_batch: int) -> list[dict]:
    """The micro-batch with the most tokens the plan can produce: the longest examples together."""
    def length(row):
        return len(row["input_ids"]) if "input_ids" in row else len(row["chosen"]["input_ids"]) + len(
            row["rejected"]["input_ids"])

    return sorted(train_rows, key=length, reverse=True)[:micro_batch]


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _optimizer_state_bytes(optimizer) -> int:
    return _tensor_bytes(v for state in optimizer.state.values() for v in state.values() if hasattr(v, "dtype"))


def measure_step_peak(model, spec: TrainSpec, batch: list[dict], optimizer, pad_id: int, device) -> int:
    """Runs forward, backward and an optimizer step (learning rate 0, so no weight moves) on `batch` and returns
    the peak memory it took. On a GPU: what the caching allocator reserved. On the CPU: weights, gradients,
    optimizer state and every tensor autograd saved for the backward pass, counted by storage."""
    import torch

    saved: dict = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        method = get_method(spec.method)
        if method.preference:
            loss, _, _, _ = method.loss(model, batch, spec, pad_id, device)
        else:
            ids, labels, mask = collate(batch, pad_id, device)
            loss, _ = token_loss_sum(model, ids, labels, mask, packed_positions(batch, ids.shape[1], device))
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_reserved(device))
    else:
        weights = _tensor_bytes(list(model.parameters()) + list(model.buffers()))
        grads = _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)
        peak = weights + grads + _optimizer_state_bytes(optimizer) + sum(saved.values())
    # Leave no trace: no gradients, no Adam moments from a batch that was only measured.
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    return peak


def fit_check(model, spec: TrainSpec, train_rows, optimizer, pad_id, device) -> dict | None:
    """Measures the plan's worst micro-batch before the first real step. None when the plan has no budget."""
    memory = (spec.plan or {}).get("memory") or {}
    capacity = memory.get("capacity_bytes")
    batch = worst_case_batch(train_rows, spec.micro_batch)
    measured = measure_step_peak(model, spec, batch, optimizer, pad_id, device)
    if device.type == "cuda":
        # The estimate counts the CUDA context, which the allocator's numbers do not include.
        measured += int((memory.get("breakdown") or {}).get("cuda_context", 0))
    tokens = sum(len(r["input_ids"]) if "input_ids" in r else len(r["chosen"]["input_ids"]) for r in batch)
    return {
        "estimated_bytes": memory.get("total_bytes"),
        "measured_bytes": measured,
        "capacity_bytes": capacity,
        "fits": capacity is None or measured <= capacity,
        "micro_batch": spec.micro_batch,
        "max_seq_len": spec.max_seq_len,
        "gradient_checkpointing": spec.gradient_checkpointing,
        "batch_tokens": tokens,
        "device": device.type,
        "device_name": _device_name(device),
        "method": spec.method,
    }


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"



def act_on_fit_check(check: dict, spec: TrainSpec, on_event) -> None:
    estimated, capacity, measured = (format_bytes(check[k], unit="GiB", digits=2, missing="?")
                                     for k in ("estimated_bytes", "capacity_bytes", "measured_bytes"))
    said = f"estimated {estimated}, " if check["estimated_bytes"] else ""
    if check["fits"]:
        budget = f"budget {capacity}" if check["capacity_bytes"] else "no memory budget in the plan"
        on_event("fit_check", f"Fit check: the longest micro-batch ({check['batch_tokens']} tokens) took "
                 f"{measured} ({said}{budget}).", check)
        spec.plan["fit_check"] = check
        return
    change = shrink_after_oom(spec)
    fallback = get_method(spec.method).oom_fallback
    if change is None and fallback and check["device"] == "cuda":
        spec.method = fallback
        change = f"{get_method(fallback).label} (4-bit base weights)"
    message = (f"Fit check: the longest micro-batch took {measured}, over the budget of {capacity} "
               f"({said.rstrip(', ')}).")
    if change is None:
        raise OutOfMemory(message + " Nothing smaller is left to try: use a shorter max_seq_len, QLoRA or a bigger GPU.")
    on_event("fit_check", message + f" Replanned before training: {change}.", {**check, "replanned": change})
    spec.plan.setdefault("fit_history", []).append(check)
    spec.plan["method"] = spec.method
    raise Replan(change)


# ------------------------------------------------------------------------------------------ shrinking the plan


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shrink_after_oom(spec: TrainSpec) -> str | None:
    """Halves the micro-batch (doubling accumulation, so the effective batch stays), then turns on checkpointing."""
    if spec.micro_batch > 1:
        spec.micro_batch //= 2
        spec.grad_accum *= 2
        return f"micro-batch {spec.micro_batch} x {spec.grad_accum} accumulation steps (same effective batch)"
    if not spec.gradient_checkpointing and get_method(spec.method).gradient_checkpointing:
        spec.gradient_checkpointing = True
        return "gradient checkpointing on"
    return None


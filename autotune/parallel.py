"""How many ranks (GPUs, or processes on a CPU) a plan trains on, and how they split the work.

select() plans one GPU's micro-batch and the global accumulation first; this module then chooses the world size:
- data parallel (DDP) when the plan fits one GPU and the worker has more: the step's micro-batches are shared
  out, so the global batch (micro-batch x accumulation x GPUs) stays what one GPU would train, and the per-rank
  accumulation is the global one divided by the GPU count (the learning rate and schedule are the global
  step's, so they do not change);
- sharding the frozen base (FSDP2) when the plan fits no single GPU: the base's weights are split across the
  GPUs, the fewest that fit; a 4-bit base is stored as bf16 words so FSDP can shard it (`quant_storage`);
- on a CPU, the number of processes is the user's (`gpus`, default 1), trained with gloo.
The plan's keys: `gpus` (the world size), `parallel` (`ddp` or `fsdp`, only when gpus > 1), `global_batch`, and
with FSDP `memory.per_gpu_bytes`. finetune/distributed_launch.py starts the ranks.
"""
from __future__ import annotations

from finetune.methods import find_method
from finetune.units import format_bytes


def plan_ranks(plan: dict, inventory: dict, overrides: dict, notes) -> None:
    """Sets plan["gpus"], plan["parallel"], the per-rank grad_accum and plan["global_batch"], with the reason;
    plan["nodes"] when the user asks for the ranks to span several workers (the override `nodes`: a job that
    waits for several free workers is asked for, never planned behind the user's back)."""
    nodes = int(overrides.get("nodes") or 1)
    requested = int(overrides["gpus"]) if overrides.get("gpus") else (nodes if nodes > 1 else None)
    cuda = plan["hardware"]["device"] == "cuda"
    per_worker = len([g for g in inventory.get("gpus") or [] if isinstance(g, dict)])
    if nodes > 1:
        return _plan_nodes(plan, requested, nodes, per_worker if cuda else None, notes)
    _plan_one_worker(plan, inventory, overrides, notes, requested)


def _plan_nodes(plan: dict, world: int, nodes: int, per_worker: int | None, notes) -> None:
    """Data parallel over `nodes` workers with world / nodes ranks each (jobs/rank_launch.py places them)."""
    if world % nodes:
        plan["fits"] = False
        notes.warn(f"{world} ranks do not split evenly over {nodes} workers: ask for a multiple of {nodes}.")
    elif per_worker is not None and world // nodes > per_worker:
        plan["fits"] = False
        notes.warn(f"{world // nodes} GPUs per worker asked for, but a worker has {per_worker}.")
    notes.reason(f"{world} ranks on {nodes} workers ({max(1, world // nodes)} each), data parallel, meeting at a "
                 "c10d rendezvous on the worker that takes the job.")
    _set_world(plan, world, "ddp", int(plan["grad_accum"]), notes)
    plan["nodes"] = nodes


def _plan_one_worker(plan: dict, inventory: dict, overrides: dict, notes, requested: int | None) -> None:
    plan.pop("nodes", None)
    global_accum = int(plan["grad_accum"])
    if plan["hardware"]["device"] != "cuda":
        world = requested or 1
        if world > 1:
            notes.reason(f"{world} training processes on the CPU (gloo), as asked; each trains its share of "
                         "every step's micro-batches.")
        _set_world(plan, world, "ddp", global_accum, notes)
        return
    gpus = [g for g in inventory.get("gpus") or [] if isinstance(g, dict)]
    if requested and requested > len(gpus):
        plan["fits"] = False
        spread = (f" (or spread them over {requested // len(gpus)} workers: the override nodes={requested // len(gpus)})"
                  if gpus and requested % len(gpus) == 0 else "")
        notes.warn(f"{requested} GPUs asked for, but the worker has {len(gpus)}: it cannot run this plan{spread}.")
        _set_world(plan, requested, "ddp", global_accum, notes)
        return
    if not plan.get("fits", True) and len(gpus) > 1:
        sharded = _sharded_world(plan, gpus, requested)
        if sharded:
            return _plan_sharding(plan, sharded, global_accum, notes)
    world = requested or _data_parallel_world(plan, len(gpus), "micro_batch" in overrides)
    if world > 1 and "micro_batch" not in overrides:
        global_accum = _split_micro_batches(plan, world)
    if world > 1:
        notes.reason(f"{world} GPUs, data parallel (DDP): the model fits one GPU, so each GPU holds a copy and "
                     f"trains its share of each step; about {world}x faster than one GPU.")
    _set_world(plan, world, "ddp", global_accum, notes)


def _data_parallel_world(plan: dict, gpu_count: int, micro_batch_fixed: bool) -> int:
    """The most GPUs that share the step's sequences (its micro-batches when the micro-batch is the user's)
    evenly: more would change the global batch."""
    units = plan["grad_accum"] * (1 if micro_batch_fixed else plan["micro_batch"])
    return max((w for w in range(1, gpu_count + 1) if units % w == 0), default=1)


def _split_micro_batches(plan: dict, world: int) -> int:
    """A smaller micro-batch when the step's sequences are fewer than world x the planned micro-batch (it fits,
    being smaller): returns the step's micro-batches, world x the per-rank accumulation."""
    per_rank = plan["micro_batch"] * plan["grad_accum"] // world
    micro = max(m for m in range(1, plan["micro_batch"] + 1) if per_rank % m == 0)
    plan["micro_batch"] = micro
    return per_rank // micro * world


def _sharded_world(plan: dict, gpus: list, requested: int | None) -> int | None:
    """The fewest GPUs over which the base's weights, sharded, let the plan fit each GPU; None if none do."""
    memory = plan.get("memory") or {}
    weights = int((memory.get("breakdown") or {}).get("weights") or 0)
    total = int(memory.get("total_bytes") or 0)
    capacity = int(memory.get("capacity_bytes") or 0)
    if not weights or not capacity:
        return None
    choices = [requested] if requested else range(2, len(gpus) + 1)
    for world in choices:
        per_gpu = total - weights + weights // world
        if per_gpu <= capacity:
            return world
    return None


def _plan_sharding(plan: dict, world: int, global_accum: int, notes) -> None:
    memory = plan["memory"]
    weights = int(memory["breakdown"]["weights"])
    per_gpu = int(memory["total_bytes"]) - weights + weights // world
    memory["per_gpu_bytes"] = per_gpu
    plan["fits"] = True
    _drop_one_gpu_misfit(notes)
    plan["fused_cross_entropy"] = False  # the fused loss calls the body apart from the root FSDP unit's hooks
    if getattr(find_method(plan.get("method")), "quantized_base", False):
        plan["quant_storage"] = "bf16"  # FSDP shards tensors of one float type: the 4-bit weights packed in bf16
    notes.reason(f"{world} GPUs, the frozen base sharded across them (FSDP2): it fits no single GPU; "
                 f"{format_bytes(per_gpu)} per GPU of {format_bytes(int(memory['capacity_bytes']))}.")
    _set_world(plan, world, "fsdp", global_accum, notes)


def _drop_one_gpu_misfit(notes) -> None:
    """The warning that the plan does not fit (autotune/select.py's misfit message) was about one GPU."""
    notes.warnings[:] = [w for w in notes.warnings if not w.startswith(ONE_GPU_MISFIT)]
    notes.reasons[:] = [r for r in notes.reasons if not r.startswith("Warning: " + ONE_GPU_MISFIT)]


ONE_GPU_MISFIT = "This plan needs "


def _set_world(plan: dict, world: int, parallel: str, global_accum: int, notes) -> None:
    plan["gpus"] = world
    if world > 1:
        plan["parallel"] = parallel
        per_rank = max(1, -(-global_accum // world))
        if per_rank * world != global_accum:
            notes.warn(f"The step's {global_accum} micro-batches do not split evenly over {world} ranks: the global "
                       f"batch grows to {per_rank * world} micro-batches.")
        plan["grad_accum"] = per_rank
    else:
        plan.pop("parallel", None)
    plan["global_batch"] = plan["micro_batch"] * plan["grad_accum"] * world


# ------------------------------------------------------------------------ the search's trials (one process)


def one_process_equivalent(plan: dict) -> dict:
    """The plan on one process at the same global batch (the search's trials run in one process)."""
    world = max(1, int(plan.get("gpus") or 1))
    single = {k: v for k, v in plan.items() if k not in ("parallel", "global_batch", "nodes")}
    single.update(gpus=1, grad_accum=int(plan["grad_accum"]) * world)
    return single


def spread_over_ranks(plan: dict, world: int) -> dict:
    """A one-process plan (the search's winner) put back on `world` ranks at the same global batch where the step's
    sequences divide evenly, else with the per-rank accumulation rounded up."""
    spread = dict(plan)
    if world > 1:
        sequences = spread["micro_batch"] * spread["grad_accum"]
        if sequences % world == 0:
            spread["grad_accum"] = _split_micro_batches(spread, world) // world
        else:
            spread["grad_accum"] = max(1, -(-spread["grad_accum"] // world))
    spread["gpus"] = world
    spread["global_batch"] = spread["micro_batch"] * spread["grad_accum"] * world
    return spread

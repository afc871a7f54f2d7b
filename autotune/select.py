"""Choose a training plan that fits the hardware, from the model's config and the dataset's token statistics.

    select(inventory, model_config, dataset_stats, preferences) -> plan

The plan has every key of the REST contract (method, rank, alpha, target_modules, micro_batch, grad_accum,
max_seq_len, gradient_checkpointing, learning_rate, epochs, memory, reasons) plus device, dtype, fits, warnings
and the method's own settings (dropout, num_virtual_tokens, adapter_bottleneck, dpo_beta, kto_beta). Each reason is one
sentence with the numbers behind the choice.

How it chooses, and why:

- Hardware: the GPU with the most free memory (or preferences["device_index"]); capacity is its free memory
  times 0.95, since the estimate already counts the CUDA context and fragmentation and other processes may grow.
  Without a GPU, a CPU plan (fp32, no QLoRA unless asked for) against 80% of available RAM.
- Method: LoRA unless it does not fit at micro-batch 1 with checkpointing, then QLoRA (4-bit weights cost speed
  and a little quality, so only when needed). preferences["method"] forces one.
- Rank: 16 and alpha = 2 x rank by default, 32 over 100,000 rows (enough signal to use the extra capacity). The
  rank 8 that small datasets used to get is gone: the search stage tries ranks 4-32 when its budget allows.
- max_seq_len: the dataset's 99th-percentile length rounded up to a multiple of 64 (kernel-friendly shapes), at
  least 64 and at most the model's context. Only if nothing fits is it halved, QLoRA first.
- micro_batch: the largest power of two up to 64 (and up to the effective batch, so the optimisation does not
  change with the GPU) that fits; grad_accum = ceil(effective / micro_batch). The effective batch is 16, or 8
  under 1,000 rows, where 16 leaves too few optimizer steps per pass.
- Gradient checkpointing: the faster of the best batch without it and the best batch with it, with a modelled
  speed of tokens / (tokens + 512) per micro-batch (small batches leave the GPU idle) divided by 1.3 with
  checkpointing (it recomputes the forward pass). So it is off whenever a reasonably sized batch fits without it.
- Optimizer: torch's AdamW (fused on CUDA). Only when no plan fits with it is bitsandbytes' PagedAdamW8bit tried,
  whose state lives in CUDA unified memory that the driver evicts to host RAM under pressure (see estimate.py).
- Learning rate by method (adapters start at zero and take larger steps than full fine-tuning); the search stage
  (autotune/search.py) tries higher ones first where its trials are cheap. Length (autotune/length.py): a
  ceiling of 300 optimizer steps or 20 passes, whichever comes first (at least one pass), evaluated at least
  every pass; validation decides where below it the run stops (early stopping, best checkpoint kept). Without
  validation rows (dataset_stats["validation_rows"] == 0) nothing can stop a run early, so the ceiling is the old
  fixed rule (80 steps, at most 3 passes). (Issue 32: a constant 80 steps / 3 passes left 108 rows of new labels
  at exact match 0.31 where 10 passes at a higher rate reached 0.95.)
- dtype: bf16 where the device runs it faster than fp32, decided from the worker's own matmul measurement
  (inventory["matmul_speed"], autotune/precision.py), CPU included; on a GPU without a measurement, its
  compute capability (bf16 tensor cores from Ampere on); a GPU without bf16 trains in fp16 with a gradient
  scaler (finetune/train.py, fp32 master weights).

The plan names the hardware it was made for in plan["hardware"] ({"device", "name"}); the worker that picks the
job up compares it with its own and replans when they differ (jobs/runner.py).

preferences["overrides"] sets any plan field; the others are chosen around it (memory is re-estimated with the
override). An override that cannot fit is kept, with fits false and a warning. When nothing fits, even QLoRA at
micro-batch 1 with checkpointing and 64-token sequences, the smallest plan comes back with fits false and the
shortfall in its reasons. preferences may also carry "effective_batch" and "calibration" (passed to estimate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

from finetune.methods import AUTO, auto_methods, get_method
from finetune.units import format_bytes

from .estimate import (
    DEFAULT_ADAPTER_BOTTLENECK,
    DEFAULT_LORA_DROPOUT,
    DEFAULT_NUM_VIRTUAL_TOKENS,
    METHODS,
    default_optimizer,
    estimate,
    trainable_parameters,
)
from .length import choose_length, length_reason
from .parallel import plan_ranks
from .shapes import ModelShape

# Sizes in a reason, in the units the pages use: MiB below 1 GiB (tiny models), GiB above.
bytes_text = partial(format_bytes, smallest="MiB")

GPU_SAFETY_FACTOR = 0.95
CPU_SAFETY_FACTOR = 0.80
DEFAULT_EFFECTIVE_BATCH = 16
MAX_MICRO_BATCH = 64
SEQ_MULTIPLE = 64
MIN_SEQ_LEN = 64
DEFAULT_SEQ_LEN = 1024  # without token statistics
CHECKPOINTING_SLOWDOWN = 1.3  # recomputing the forward pass in backward costs about 30%
HALF_SATURATION_TOKENS = 512  # tokens per micro-batch at which a GPU reaches half its throughput (modelled)
BF16_MIN_SPEEDUP = 1.1  # bf16 must beat fp32 matmuls by this much to be worth its precision loss
# finetune/train.py scales fp16 losses with torch.amp.GradScaler over fp32 master weights.
FP16_HAS_GRAD_SCALER = True
MEMORY_OPTIMIZER = "paged_adamw_8bit"  # tried when nothing fits with the default optimizer

SMALL_DATASET_ROWS = 1_000
LARGE_DATASET_ROWS = 100_000
# Under SMALL_DATASET_ROWS the effective batch is halved: twice the optimizer steps per pass over few rows
# (issue 20: at 16 a 400-row task got 23 steps an epoch and fell behind the batch-8 recipe).
SMALL_EFFECTIVE_BATCH = 8
DEFAULT_RANK, LARGE_RANK = 16, 32

# overrides the search itself honours; any other override is copied into the plan as given
SEARCHED = {"method", "micro_batch", "max_seq_len", "gradient_checkpointing", "device", "dtype", "optimizer"}
ESTIMATE_FIELDS = ("rank", "target_modules", "dropout", "num_virtual_tokens", "adapter_bottleneck", "double_quant",
                   "fused_cross_entropy", "liger", "packing", "attn_implementation", "optimizer")


@dataclass
class Target:
    device: str  # "cuda" or "cpu"
    name: str
    free_bytes: int
    capacity_bytes: int
    bf16: bool = False
    compute_capability: str = ""
    matmul: dict | None = None  # the worker's bf16 vs fp32 matmul measurement on this device, if any
    paged_optimizers: bool = False  # CUDA with bitsandbytes on the worker

    @property
    def bf16_speedup(self) -> float | None:
        value = (self.matmul or {}).get("bf16_speedup")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def describe_capacity(self) -> str:
        safety = GPU_SAFETY_FACTOR if self.device == "cuda" else CPU_SAFETY_FACTOR
        where = "free on " + self.name if self.device == "cuda" else "available RAM"
        return f"{bytes_text(self.capacity_bytes)} usable ({safety:.0%} of {bytes_text(self.free_bytes)} {where})"


@dataclass
class Fit:
    plan: dict  # the estimate's inputs: method, max_seq_len, micro_batch, gradient_checkpointing, ...
    memory: dict  # estimate()'s answer
    fits: bool
    larger_needs: int | None = None  # what the next larger micro-batch would need, for the reason
    alternative: Fit | None = None  # the best batch in the other checkpointing mode

    @property
    def micro_batch(self) -> int:
        return self.plan["micro_batch"]

    @property
    def checkpointing(self) -> bool:
        return self.plan["gradient_checkpointing"]

    @property
    def speed(self) -> float:
        return modelled_speed(self.micro_batch * self.plan["max_seq_len"], self.checkpointing)


@dataclass
class Notes:
    reasons: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def reason(self, text: str):
        self.reasons.append(text)

    def warn(self, text: str):
        self.warnings.append(text)
        self.reasons.append("Warning: " + text)


# ------------------------------------------------------------------------ public


def select(inventory: dict, model_config: dict, dataset_stats: dict | None = None,
           preferences: dict | None = None) -> dict:
    shape = ModelShape.from_config(model_config)
    preferences = preferences or {}
    overrides = dict(preferences.get("overrides") or {})
    stats = dataset_stats or {}
    rows = int(stats.get("rows") or 0)
    validation_rows = stats.get("validation_rows")  # None: unknown (planned as if the usual split exists)
    token_stats = stats.get("token_stats") or {}
    notes = Notes()

    target = choose_target(inventory or {}, preferences, overrides, notes)
    method = requested_method(preferences, overrides, target, notes)
    dtype = choose_dtype(target, overrides, notes)
    rank, alpha = choose_rank(rows, overrides)
    seq, seq_fixed = choose_seq_len(shape, token_stats, overrides)
    if seq_fixed and shape.max_position_embeddings and seq > shape.max_position_embeddings:
        notes.warn(f"max_seq_len {seq} is longer than the model's {shape.max_position_embeddings:,}-token context;"
                   " positions beyond it were never trained (or do not exist, with learned position embeddings).")
    effective = int(preferences.get("effective_batch") or effective_batch_for(rows))
    base = base_plan(shape, method, dtype, target, rank, overrides)

    fit = search(shape, base, target, method, seq, seq_fixed, overrides, effective, rows,
                 preferences.get("calibration"))
    plan = assemble(shape, fit, base, rank, alpha, effective, rows, overrides, target)
    plan.update(choose_length(rows, plan["micro_batch"] * plan["grad_accum"], validation_rows, overrides))
    explain(plan, fit, shape, target, method, (rows, validation_rows), token_stats, seq, overrides, effective,
            notes)
    plan_ranks(plan, inventory or {}, overrides, notes)  # issue 36: how many GPUs, DDP or FSDP
    plan["reasons"], plan["warnings"] = notes.reasons, notes.warnings
    return plan


def planned_hardware(inventory: dict, overrides: dict | None = None) -> dict:
    """{"device", "name"} of what select() would plan for on this inventory: what plan["hardware"] is compared
    with by the worker that picks the job up."""
    target = choose_target(inventory or {}, {}, dict(overrides or {}), Notes())
    return {"device": target.device, "name": target.name}


def modelled_speed(tokens_per_micro_batch: int, checkpointing: bool) -> float:
    """Relative training speed: GPUs need enough tokens per kernel to be busy; checkpointing recomputes."""
    efficiency = tokens_per_micro_batch / (tokens_per_micro_batch + HALF_SATURATION_TOKENS)
    return efficiency / (CHECKPOINTING_SLOWDOWN if checkpointing else 1.0)


# ------------------------------------------------------------------------ hardware, method, dtype


def choose_target(inventory: dict, preferences: dict, overrides: dict, notes: Notes) -> Target:
    gpus = [g for g in inventory.get("gpus") or [] if isinstance(g, dict)]
    device = str(overrides.get("device") or "auto").lower()
    if device == "cpu" or (not gpus and device != "cuda"):
        target = cpu_target(inventory.get("cpu") or {})
        target.matmul = measured_matmul(inventory, "cpu", None)
        return target
    if not gpus:
        notes.warn("device cuda was requested but the inventory has no GPU, so nothing can fit.")
        return Target("cuda", "no GPU", 0, 0)
    gpu = pick_gpu(gpus, preferences.get("device_index"), notes)
    free = int(gpu.get("free_bytes") or 0)
    # vLLM servers still starting on this GPU have not allocated their share yet (running ones show in free).
    serving = int(gpu.get("serving_reserved_bytes") or 0)
    if serving > 0:
        free = max(0, free - serving)
        notes.reason(f"{bytes_text(serving)} of the GPU is promised to vLLM servers that are starting, so it is not counted.")
    name = str(gpu.get("name") or f"GPU {gpu.get('index', 0)}")
    # An inventory that does not say (an older worker) is taken to have bitsandbytes, as QLoRA plans assume.
    paged = (inventory.get("packages") or {}).get("bitsandbytes", True) is not False
    return Target("cuda", name, free, int(free * GPU_SAFETY_FACTOR), bool(gpu.get("bf16")),
                  str(gpu.get("compute_capability") or ""), measured_matmul(inventory, "cuda", name), paged)


def measured_matmul(inventory: dict, device: str, name: str | None) -> dict | None:
    """The worker's matmul measurement for this device (autotune/precision.py), or None."""
    for entry in inventory.get("matmul_speed") or []:
        if isinstance(entry, dict) and entry.get("device") == device and (name is None or entry.get("name") == name):
            return entry
    return None


def pick_gpu(gpus: list, device_index, notes: Notes) -> dict:
    if device_index is not None:
        for gpu in gpus:
            if gpu.get("index") == device_index:
                return gpu
        notes.warn(f"GPU {device_index} is not in the inventory; planning for the GPU with the most free memory.")
    return max(gpus, key=lambda g: int(g.get("free_bytes") or 0))


def cpu_target(cpu: dict) -> Target:
    available = int(cpu.get("ram_available_bytes") or 0)
    cores = cpu.get("cores")
    name = f"CPU ({cores} cores)" if cores else "CPU"
    return Target("cpu", name, available, int(available * CPU_SAFETY_FACTOR))


def requested_method(preferences: dict, overrides: dict, target: Target, notes: Notes) -> str:
    method = str(overrides.get("method") or preferences.get("method") or AUTO).lower()
    if method == AUTO:
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose auto or one of {', '.join(METHODS)}")
    if get_method(method).quantized_base and target.device == "cpu":
        unquantised = auto_methods("cpu")[0].label
        notes.warn(f"{get_method(method).label} on CPU needs bitsandbytes' CPU backend and is far slower than "
                   f"{unquantised} there.")
    return method


def choose_dtype(target: Target, overrides: dict, notes: Notes) -> str:
    requested = str(overrides.get("dtype") or "auto").lower()
    if requested != "auto":
        if requested == "bf16" and target.device == "cuda" and not target.bf16:
            notes.warn(f"{target.name} (compute capability {target.compute_capability}) has no bf16 tensor cores;"
                       " the bf16 override will be slow or fail.")
        if requested == "fp16" and not FP16_HAS_GRAD_SCALER:
            notes.warn("fp16 without a gradient scaler: small gradients underflow to zero and training may stall;"
                       " bf16 or fp32 is safer.")
        return requested
    speedup = target.bf16_speedup
    if speedup is not None:
        return "bf16" if speedup >= BF16_MIN_SPEEDUP and (target.device == "cpu" or target.bf16) else "fp32"
    if target.device == "cpu":
        return "fp32"
    if target.bf16:
        return "bf16"
    return "fp16" if FP16_HAS_GRAD_SCALER else "fp32"


# ------------------------------------------------------------------------ dataset-driven choices


def choose_rank(rows: int, overrides: dict) -> tuple[int, float]:
    if "rank" in overrides:
        rank = int(overrides["rank"])
    elif rows > LARGE_DATASET_ROWS:
        rank = LARGE_RANK
    else:
        rank = DEFAULT_RANK
    alpha = overrides.get("alpha", 2 * rank)
    return rank, alpha


def choose_seq_len(shape: ModelShape, token_stats: dict, overrides: dict) -> tuple[int, bool]:
    """(max_seq_len, whether an override fixed it)."""
    if "max_seq_len" in overrides:
        return int(overrides["max_seq_len"]), True
    p99 = int(token_stats.get("p99") or 0)
    wanted = round_up(p99, SEQ_MULTIPLE) if p99 > 0 else DEFAULT_SEQ_LEN
    return clamp_seq_len(shape, wanted), False


def clamp_seq_len(shape: ModelShape, seq: int) -> int:
    context = shape.max_position_embeddings
    if context:
        seq = min(seq, context)
    return max(MIN_SEQ_LEN, seq)


def round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def shorter_lengths(seq: int) -> list[int]:
    """seq, then halvings rounded down to a multiple of 64, down to 64: the last resort when nothing fits."""
    lengths = [seq]
    while lengths[-1] > MIN_SEQ_LEN:
        lengths.append(max(MIN_SEQ_LEN, lengths[-1] // 2 // SEQ_MULTIPLE * SEQ_MULTIPLE))
    return lengths


# ------------------------------------------------------------------------ the search


def base_plan(shape: ModelShape, method: str, dtype: str, target: Target, rank: int, overrides: dict) -> dict:
    plan = {"dtype": dtype, "device": target.device, "rank": rank, "target_modules": "all-linear",
            "dropout": DEFAULT_LORA_DROPOUT, "num_virtual_tokens": DEFAULT_NUM_VIRTUAL_TOKENS,
            "adapter_bottleneck": DEFAULT_ADAPTER_BOTTLENECK,
            # Training computes the loss chunk by chunk on the labelled positions (finetune/fastloss.py) unless the
            # logits are soft-capped or the method puts virtual tokens in front; DPO keeps full logits.
            # "auto" ends as LoRA or QLoRA, which share LoRA's traits.
            "fused_cross_entropy": (auto_methods()[0] if method == AUTO else get_method(method)).can_pack
            and not shape.final_logit_softcapping}
    plan.update({k: overrides[k] for k in ESTIMATE_FIELDS if k in overrides})
    shape.modules_for(plan["target_modules"])  # an unknown module name is an error now, not in training
    return plan


def method_candidates(method: str, seq: int, seq_fixed: bool, target: Target, may_shorten: bool) -> list:
    """(method, max_seq_len) in order of preference; the first that fits wins. Once LoRA misses at the full
    length only QLoRA is tried, so more memory can never turn LoRA into QLoRA."""
    lengths = [seq] if seq_fixed or not may_shorten else shorter_lengths(seq)
    if method != AUTO:
        return [(method, s) for s in lengths]
    tried = [m.name for m in auto_methods(target.device)]  # LoRA, then QLoRA where the GPU can run it
    return [(name, seq) for name in tried[:-1]] + [(tried[-1], s) for s in lengths]


def optimizer_candidates(base: dict, target: Target) -> list[str]:
    """The default optimizer, then (on a GPU with bitsandbytes) the paged 8-bit one, unless one is asked for."""
    if base.get("optimizer"):
        return [base["optimizer"]]
    default = default_optimizer(target.device)
    return [default, MEMORY_OPTIMIZER] if target.device == "cuda" and target.paged_optimizers else [default]


def search(shape, base, target, method, seq, seq_fixed, overrides, effective, rows, calibration) -> Fit:
    fixed_batch = overrides.get("micro_batch")
    modes = [bool(overrides["gradient_checkpointing"])] if "gradient_checkpointing" in overrides else [False, True]
    batches = [int(fixed_batch)] if fixed_batch else batch_options(effective, rows)
    candidates = method_candidates(method, seq, seq_fixed, target, may_shorten=not fixed_batch)
    for method_name, length in candidates:
        for optimizer in optimizer_candidates(base, target):
            plan = {**base, "method": method_name, "max_seq_len": length, "optimizer": optimizer}
            fit = best_batch(shape, plan, target, batches, modes, calibration)
            if fit:
                return fit
    if fixed_batch:
        return forced_batch(shape, base, target, method, seq, seq_fixed, overrides, effective, rows, calibration)
    method_name, length = candidates[-1]
    plan = {**base, "method": method_name, "max_seq_len": length, "micro_batch": 1,
            "optimizer": optimizer_candidates(base, target)[-1],
            "gradient_checkpointing": True in modes}
    return Fit(plan, estimate(shape, plan, calibration), fits=False)


def forced_batch(shape, base, target, method, seq, seq_fixed, overrides, effective, rows, calibration) -> Fit:
    """An overridden micro-batch that fits nowhere: choose the rest as if it were free, then impose it."""
    free = search(shape, base, target, method, seq, seq_fixed,
                  {k: v for k, v in overrides.items() if k != "micro_batch"}, effective, rows, calibration)
    modes = [bool(overrides["gradient_checkpointing"])] if "gradient_checkpointing" in overrides else [False, True]
    trials = []
    for checkpointing in modes:
        plan = {**free.plan, "micro_batch": int(overrides["micro_batch"]), "gradient_checkpointing": checkpointing}
        memory = estimate(shape, plan, calibration)
        trials.append(Fit(plan, memory, fits=memory["total_bytes"] <= target.capacity_bytes))
    return next((t for t in trials if t.fits), trials[-1])


def batch_options(effective: int, rows: int) -> list[int]:
    """Powers of two, largest first, up to 64 and no larger than the effective batch or the dataset."""
    cap = min(MAX_MICRO_BATCH, max(1, effective), rows if rows > 0 else MAX_MICRO_BATCH)
    options = [1]
    while options[-1] * 2 <= cap:
        options.append(options[-1] * 2)
    return options[::-1]


def best_batch(shape, plan, target, batches, modes, calibration) -> Fit | None:
    """The largest fitting micro-batch in each checkpointing mode, then the faster of the two."""
    found = [f for f in (largest_fitting(shape, plan, target, batches, mode, calibration) for mode in modes) if f]
    if not found:
        return None
    found.sort(key=lambda f: (f.speed, not f.checkpointing, f.micro_batch), reverse=True)
    best = found[0]
    best.alternative = found[1] if len(found) > 1 else None
    return best


def largest_fitting(shape, plan, target, batches, checkpointing, calibration) -> Fit | None:
    larger_needs = None
    for micro_batch in batches:
        trial = {**plan, "micro_batch": micro_batch, "gradient_checkpointing": checkpointing}
        memory = estimate(shape, trial, calibration)
        if memory["total_bytes"] <= target.capacity_bytes:
            return Fit(trial, memory, fits=True, larger_needs=larger_needs)
        larger_needs = memory["total_bytes"]
    return None


# ------------------------------------------------------------------------ the plan


def assemble(shape, fit: Fit, base, rank, alpha, effective, rows, overrides, target: Target) -> dict:
    method = fit.plan["method"]
    micro_batch = fit.micro_batch
    grad_accum = int(overrides.get("grad_accum") or math.ceil(effective / micro_batch))
    plan = {
        "method": method,
        "rank": rank,
        "alpha": alpha,
        "target_modules": target_module_names(shape, method, base["target_modules"]),
        "micro_batch": micro_batch,
        "grad_accum": grad_accum,
        "max_seq_len": fit.plan["max_seq_len"],
        "gradient_checkpointing": fit.checkpointing,
        "learning_rate": overrides.get("learning_rate", get_method(method).learning_rate),
        "epochs": overrides.get("epochs", 1),  # the length is chosen next (autotune/length.py)
        "memory": {**fit.memory, "capacity_bytes": target.capacity_bytes},
        "device": base["device"],
        "dtype": base["dtype"],
        "optimizer": fit.plan["optimizer"],
        "hardware": {"device": target.device, "name": target.name},
        "fused_cross_entropy": bool(fit.plan.get("fused_cross_entropy")),
        "fits": fit.fits,
    }
    plan.update(get_method(method).plan_settings(base))  # dropout, dpo_beta, num_virtual_tokens, ...
    plan.update({k: overrides[k] for k in get_method(method).plan_fields() if k in overrides})  # a beta as given
    plan.update({k: v for k, v in overrides.items() if k not in plan})  # seed, warmup_ratio, ... as given
    return plan


def target_module_names(shape: ModelShape, method: str, requested) -> list[str]:
    """The layers the method adapts; none for methods that add their own parameters (prefix, adapter, ...)."""
    return get_method(method).target_module_names(shape, requested)


def effective_batch_for(rows: int) -> int:
    return SMALL_EFFECTIVE_BATCH if 0 < rows < SMALL_DATASET_ROWS else DEFAULT_EFFECTIVE_BATCH


# ------------------------------------------------------------------------ reasons


def explain(plan, fit, shape, target, method, data, token_stats, seq, overrides, effective, notes: Notes):
    rows, validation_rows = data
    notes.reason(method_reason(plan, fit, shape, target, method))
    if get_method(plan["method"]).lora_family:
        notes.reason(rank_reason(plan, shape, rows, overrides))
    notes.reason(modules_reason(plan, shape, overrides))
    notes.reason(seq_reason(plan, shape, token_stats, seq, overrides))
    notes.reason(batch_reason(plan, fit, target, effective, rows, overrides))
    notes.reason(checkpointing_reason(fit, target, overrides))
    notes.reason(learning_rate_reason(plan, overrides))
    notes.reason(length_reason(plan, rows, validation_rows, overrides))
    notes.reason(dtype_reason(plan, target, overrides))
    notes.reason(optimizer_reason(plan, fit, shape, target, overrides))
    for key in sorted(set(overrides) - SEARCHED - {"rank", "alpha", "target_modules", "grad_accum",
                                                      "learning_rate", "epochs", "max_steps"}):
        notes.reason(f"{key} = {overrides[key]!r} (override).")
    if not plan["fits"]:
        notes.warn(shortfall(plan, target))


def method_reason(plan, fit, shape, target, method) -> str:
    chosen = get_method(plan["method"])
    label = chosen.label
    weights = plan["memory"]["breakdown"]["weights"]
    kind = "4-bit NF4" if chosen.quantized_base else plan["dtype"]
    trainable = trainable_parameters(shape, fit.plan)
    need = f"need {bytes_text(plan['memory']['total_bytes'])} of the {target.describe_capacity()}"
    share = f"{trainable / shape.parameters:.2%}" if shape.parameters else "n/a"
    detail = f"the {kind} weights ({bytes_text(weights)}) plus training state ({trainable:,} trainable parameters, " \
             f"{share} of {billions(shape.parameters)})"
    if method != AUTO:
        return f"{label}, as requested: {detail} {need}."
    first = auto_methods(target.device)[0]
    if chosen.quantized_base and not first.quantized_base:
        smallest = {**fit.plan, "method": first.name, "micro_batch": 1, "gradient_checkpointing": True}
        first_need = estimate(shape, smallest)["total_bytes"]
        return f"{label}: {first.label} needs {bytes_text(first_need)} even at micro-batch 1 with checkpointing, more " \
               f"than the {bytes_text(target.capacity_bytes)} usable; {detail} {need}."
    return f"{label}: {detail} {need}."


def rank_reason(plan, shape, rows, overrides) -> str:
    head = f"Rank {plan['rank']} (alpha {_number(plan['alpha'])})"
    if "rank" in overrides:
        return f"{head}: set by override."
    if rows > LARGE_DATASET_ROWS:
        why = f"{rows:,} rows carry enough signal to use a larger adapter"
    elif rows:
        why = f"the default for {rows:,} rows (32 above {LARGE_DATASET_ROWS:,}; the search tries 4 to 32 when " \
              "its budget allows)"
    else:
        why = "the default, without dataset statistics"
    return f"{head}: {why}; alpha = 2 x rank keeps the update's scale independent of the rank."


def modules_reason(plan, shape, overrides) -> str:
    modules = plan["target_modules"]
    method = get_method(plan["method"])
    if not method.adapts_layers:
        return method.modules_reason(shape, "", 0)
    count = len(shape.modules_for(modules)) * shape.num_layers
    names = ", ".join(modules)
    if "target_modules" in overrides:
        return f"Target modules {names} (override): {count} adapted matrices in {shape.num_layers} layers."
    return method.modules_reason(shape, names, count)


def seq_reason(plan, shape, token_stats, wanted, overrides) -> str:
    seq = plan["max_seq_len"]
    if "max_seq_len" in overrides:
        return f"Max sequence length {seq} (override); {truncation_text(token_stats, seq)}."
    p99 = int(token_stats.get("p99") or 0)
    if p99:
        text = f"Max sequence length {seq}: the 99th percentile is {p99:,} tokens, rounded up to a multiple of " \
               f"{SEQ_MULTIPLE}"
    else:
        text = f"Max sequence length {seq}: no token statistics, so a common default of {DEFAULT_SEQ_LEN}"
    if shape.max_position_embeddings and round_up(p99, SEQ_MULTIPLE) > shape.max_position_embeddings:
        text += f", capped at the model's {shape.max_position_embeddings:,}-token context"
    if seq < wanted:
        text += f", then shortened from {wanted} because nothing longer fits"
    return f"{text}; {truncation_text(token_stats, seq)}."


def truncation_text(token_stats, seq) -> str:
    longest = int(token_stats.get("max") or 0)
    if not longest:
        return "truncation unknown without token statistics"
    if longest <= seq:
        return f"no example is truncated (the longest has {longest:,} tokens)"
    count = truncated_count(token_stats, seq)
    total = int(token_stats.get("count") or 0)
    share = f" ({count / total:.1%})" if count is not None and total else ""
    if count is None:
        return f"at most 1% of examples, up to {longest:,} tokens long, lose their ends"
    return f"about {count:,} examples{share} are longer, up to {longest:,} tokens, and lose their ends"


def truncated_count(token_stats, seq) -> int | None:
    """Examples longer than seq: exact from the precomputed cut-offs or the longest examples' lengths
    (finetune.data.tokens.examples_longer_than), else interpolated in the histogram."""
    exact = (token_stats.get("truncated") or {}).get(str(seq))
    if exact is not None:
        return int(exact)
    longest = token_stats.get("longest") or []
    if longest and (longest[-1] <= seq or len(longest) >= int(token_stats.get("count") or 0)):
        return sum(1 for n in longest if n > seq)
    histogram = token_stats.get("histogram") or {}
    edges, counts = histogram.get("edges") or [], histogram.get("counts") or []
    if len(edges) != len(counts) + 1:
        return None
    longer = 0.0
    for low, high, count in zip(edges, edges[1:], counts):
        if high > seq + 1:
            longer += count * (high - max(low, seq + 1)) / (high - low)
    return int(round(longer))


def batch_reason(plan, fit, target, effective, rows, overrides) -> str:
    mb, accum = plan["micro_batch"], plan["grad_accum"]
    head = f"Micro-batch {mb} x {accum} accumulation step{'s' if accum != 1 else ''} " \
           f"(effective batch {mb * accum})"
    if "micro_batch" in overrides:
        return f"{head}: micro-batch set by override, needing {bytes_text(plan['memory']['total_bytes'])}."
    mode = "with" if fit.checkpointing else "without"
    if fit.larger_needs:
        return f"{head}: the largest power of two that fits {mode} checkpointing ({mb * 2} would need " \
               f"{bytes_text(fit.larger_needs)} of {bytes_text(target.capacity_bytes)})."
    cap = "the effective batch" if mb >= effective else f"the {rows:,} rows"
    if mb >= MAX_MICRO_BATCH:
        cap = f"the maximum of {MAX_MICRO_BATCH}"
    return f"{head}: {cap} caps the micro-batch, and it fits {mode} checkpointing in " \
           f"{bytes_text(plan['memory']['total_bytes'])}."


def checkpointing_reason(fit: Fit, target: Target, overrides) -> str:
    state = "on" if fit.checkpointing else "off"
    if "gradient_checkpointing" in overrides:
        return f"Gradient checkpointing {state} (override)."
    other = fit.alternative
    cost = f"recomputing the forward pass costs about {CHECKPOINTING_SLOWDOWN - 1:.0%}"
    if not fit.fits:
        return f"Gradient checkpointing {state}: it saves the most memory, and the plan does not fit even so."
    if other is None and fit.checkpointing:
        smallest = fit.micro_batch if "micro_batch" in overrides else 1
        return f"Gradient checkpointing on: without it not even micro-batch {smallest} fits in " \
               f"{bytes_text(target.capacity_bytes)}; {cost}."
    if other is None:
        return f"Gradient checkpointing off: micro-batch {fit.micro_batch} already fits without it."
    if other.micro_batch == fit.micro_batch and not fit.checkpointing:
        return f"Gradient checkpointing off: micro-batch {fit.micro_batch} fits without it, so checkpointing " \
               f"would only slow training ({cost})."
    return f"Gradient checkpointing {state}: micro-batch {fit.micro_batch} {'with' if fit.checkpointing else 'without'}" \
           f" it has a modelled relative speed of {fit.speed:.2f} against {other.speed:.2f} for micro-batch " \
           f"{other.micro_batch} {'with' if other.checkpointing else 'without'} it ({cost})."


def learning_rate_reason(plan, overrides) -> str:
    if "learning_rate" in overrides:
        return f"Learning rate {plan['learning_rate']:g} (override)."
    return f"Learning rate {plan['learning_rate']:g}: {get_method(plan['method']).learning_rate_why}."


def dtype_reason(plan, target, overrides) -> str:
    dtype = plan["dtype"]
    if "dtype" in overrides:
        return f"{dtype} weights and compute (override) on {target.name}."
    speedup = target.bf16_speedup
    if speedup is not None:
        size = (target.matmul or {}).get("size")
        measured = f"measured {speedup:.2f}x fp32 matmul speed" + (f" ({size}x{size})" if size else "") + \
            f" on this {'CPU' if target.device == 'cpu' else 'GPU'} ({target.name})"
        if dtype == "bf16":
            return f"bf16: {measured}; half of fp32's memory as well."
        if target.device == "cuda" and not target.bf16:
            return f"fp32: {target.name} has no bfloat16 tensor cores ({measured}), and fp16 is not offered " \
                   f"while training has no gradient scaler."
        return f"fp32: bf16 {measured}, below the {BF16_MIN_SPEEDUP:.1f}x that would pay for its coarser rounding."
    if target.device == "cpu":
        return f"fp32 on {target.name}: the worker has not measured bf16 matmul speed here yet, and fp32 is the " \
               f"safe default until it does."
    if dtype == "bf16":
        return f"bf16: {target.name} (compute capability {target.compute_capability}) has bfloat16 tensor cores;" \
               f" half of fp32's memory without fp16's overflow."
    if dtype == "fp16":
        return f"fp16: {target.name} (compute capability {target.compute_capability}) has no bfloat16 tensor " \
               f"cores; training scales the loss with a GradScaler."
    return f"fp32: {target.name} (compute capability {target.compute_capability}) has no bfloat16 tensor cores, " \
           f"and fp16 is not offered while training has no gradient scaler (small gradients would underflow)."


def optimizer_reason(plan, fit, shape, target, overrides) -> str:
    name = plan["optimizer"]
    if "optimizer" in overrides:
        return f"Optimizer {name} (override)."
    if name != MEMORY_OPTIMIZER:
        fused = ", fused into one kernel per step" if name == "adamw_fused" else ""
        state = plan["memory"]["breakdown"].get("optimizer", 0)
        return f"Optimizer {name}: torch's AdamW{fused}; its two moments take {bytes_text(state)}."
    default = default_optimizer(target.device)
    with_default = estimate(shape, {**fit.plan, "optimizer": default})["total_bytes"]
    paged = plan["memory"].get("evictable_bytes", 0)
    return f"Optimizer {name} (bitsandbytes): with {default} this plan needs {bytes_text(with_default)}, over the " \
           f"{bytes_text(target.capacity_bytes)} usable; its 8-bit state ({bytes_text(paged)}) is paged in CUDA unified memory, " \
           f"which the driver moves to host RAM when the GPU runs short."


def shortfall(plan, target) -> str:
    need = plan["memory"]["total_bytes"]
    return f"This plan needs {bytes_text(need)} but only {bytes_text(target.capacity_bytes)} is usable on {target.name}: " \
           f"{bytes_text(max(0, need - target.capacity_bytes))} is missing; expect out-of-memory errors (use a smaller " \
           f"model, a shorter max_seq_len, or a larger GPU)."


def billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)

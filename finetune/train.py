"""The training loop: one plain function that turns a plan, a base model and a dataset into an adapter folder.

A hand-written loop (not transformers.Trainer) because the platform needs things Trainer hides: a callback on
every optimizer step, cancellation between micro-batches, exact resume from the newest checkpoint, and recovery
from CUDA out-of-memory by halving the micro-batch without changing the effective batch.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from . import checkpoint as ckpt
from . import cpudropout, fastloss, fourbit
from .data import iter_examples
from .errors import OutOfMemory, TrainingError
from .learning_guard import LearningGuard
from .method_traits import method_traits
from .optim import build_optimizer
from .methods import ALL_METHODS, save_adapter, wrap_for_training
from .tokenize import IGNORE, encode_example, encode_preference, render_prompt


@dataclass
class TrainSpec:
    base_model_path: str
    train_file: str
    output_dir: str
    eval_file: str | None = None
    checkpoint_dir: str | None = None
    method: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: object = "all-linear"
    micro_batch: int = 4
    grad_accum: int = 1
    max_seq_len: int = 1024
    gradient_checkpointing: bool = False
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    lr_schedule: str = "constant"  # constant, or cosine down to min_lr_ratio of the peak; both after the warmup
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0  # None: no clipping
    length_group_window: int = 64  # micro-batches per length-sorting window; 0 or 1: plain shuffle
    length_group_min_windows: int = 16  # ... but at least this many windows per epoch (1: small data fully sorted)
    weight_decay: float = 0.0
    seed: int = 42
    device: str = "auto"
    dtype: str = "auto"
    num_virtual_tokens: int = 20
    adapter_bottleneck: int = 64
    dpo_beta: float = 0.1
    kto_beta: float = 0.1
    packing: bool = False
    completion_only: bool = True
    eval_every_steps: int | None = None
    # Evaluations in a row without a new best validation loss before training stops (0: train to the end). The
    # adapter saved is always the best evaluation's, not the last step's.
    early_stopping_patience: int = 3
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float = 10.0
    max_eval_generations: int = 4
    max_new_tokens: int = 64
    max_eval_examples: int = 200
    trust_remote_code: bool = False
    plan: dict = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: dict, **paths) -> "TrainSpec":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in plan.items() if k in known and v is not None}
        spec = cls(**{**values, **paths, "plan": dict(plan)})
        spec.validate()
        return spec

    def validate(self):
        if self.method not in ALL_METHODS:
            raise TrainingError(f"Unknown method {self.method!r}; choose one of {', '.join(sorted(ALL_METHODS))}.")
        for name in ("micro_batch", "grad_accum", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise TrainingError(f"{name} must be at least 1 (got {getattr(self, name)}).")
        if not self.learning_rate or self.learning_rate <= 0:
            raise TrainingError("learning_rate must be positive.")
        if not Path(self.train_file).is_file():
            raise TrainingError(f"The training file {self.train_file} is missing; re-process the dataset.")

    def as_plan(self) -> dict:
        plan = dict(self.plan)
        for name in ("method", "micro_batch", "grad_accum", "max_seq_len", "gradient_checkpointing", "packing"):
            plan[name] = getattr(self, name)
        return plan


@dataclass
class TrainResult:
    status: str
    adapter_dir: str | None
    metrics: dict
    generations: list
    plan: dict


# ------------------------------------------------------------------------------------------ data


def load_encoded(path, tokenizer, spec: TrainSpec, limit: int | None = None):
    """Encodes a normalised file; returns (examples, stats). Examples with nothing left to learn are dropped."""
    examples, stats = [], {"rows": 0, "truncated": 0, "skipped_no_labels": 0, "tokens": 0, "trained_tokens": 0}
    for example in iter_examples(path):
        if limit is not None and len(examples) >= limit:
            break
        stats["rows"] += 1
        if method_traits(spec.method).paired:
            if "chosen" not in example:
                raise TrainingError("DPO needs a preference dataset (prompt, chosen, rejected columns).")
            pair = encode_preference(example, tokenizer, spec.max_seq_len)
            if not any(l != IGNORE for l in pair["chosen"]["labels"]) or not any(
                l != IGNORE for l in pair["rejected"]["labels"]
            ):
                stats["skipped_no_labels"] += 1
                continue
            examples.append(pair)
            stats["tokens"] += len(pair["chosen"]["input_ids"]) + len(pair["rejected"]["input_ids"])
            continue
        if spec.method == "kto" and "label" not in example:
            raise TrainingError("KTO needs a dataset whose rows are labelled desirable or undesirable (a kto_tag or "
                                "label column of true/false).")
        if spec.method != "kto" and "label" in example:
            raise TrainingError("This dataset labels its answers desirable or undesirable (kto_tag/label): train it "
                                "with method kto, or every undesirable answer would be learned as a good one.")
        encoded = encode_example(example, tokenizer, spec.max_seq_len, completion_only=spec.completion_only)
        stats["truncated"] += int(encoded.truncated)
        if encoded.trained_tokens == 0:
            stats["skipped_no_labels"] += 1
            continue
        examples.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
        if spec.method == "kto":
            examples[-1]["desirable"] = bool(example["label"])
        stats["tokens"] += len(encoded.input_ids)
        stats["trained_tokens"] += encoded.trained_tokens
    return examples, stats


def pack(examples: list[dict], max_seq_len: int) -> list[dict]:
    """Concatenates short examples into rows of up to max_seq_len tokens (first-fit by length, no splitting).

    Each row keeps its examples' lengths in "segments": positions restart at every example and attention stays
    inside it (see packed_positions), so a packed row trains exactly as its examples would one by one."""
    rows: list[dict] = []
    for ex in sorted(examples, key=lambda e: -len(e["input_ids"])):
        for row in rows:
            if len(row["input_ids"]) + len(ex["input_ids"]) <= max_seq_len:
                row["input_ids"] += ex["input_ids"]
                row["labels"] += [IGNORE] + ex["labels"][1:]  # never predict an example's first token
                row["segments"].append(len(ex["input_ids"]))
                break
        else:
            rows.append({"input_ids": list(ex["input_ids"]), "labels": list(ex["labels"]),
                         "segments": [len(ex["input_ids"])]})
    return rows


def packed_positions(rows: list[dict], width: int, device):
    """Position ids that restart at every packed example (and at the padding). With these and no 2-D attention
    mask, transformers builds a block-diagonal causal mask (flash-attention: variable-length kernels), so no
    token attends across an example boundary. None for rows that were not packed."""
    import torch

    if not any("segments" in r for r in rows):
        return None
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        at = 0
        for n in r.get("segments", [len(r["input_ids"])]) + [width - len(r["input_ids"])]:
            positions[i, at : at + n] = torch.arange(n)
            at += n
    return positions.to(device)


def packing_isolates_examples(model, device) -> bool:
    """Checks on two short token runs that, packed into one row, each is computed exactly as when alone: true for
    architectures whose attention honours restarting position ids (transformers' packed-sequence masks)."""
    import torch

    first, second = [1, 2, 3, 4], [5, 6, 7]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([second], device=device), use_cache=False).logits[0]
            row = torch.tensor([first + second], device=device)
            positions = torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device)
            packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0, len(first):]
        return torch.allclose(packed.float(), alone.float(), rtol=1e-2, atol=1e-2)
    except Exception:  # noqa: BLE001 - a model that rejects the arguments cannot pack either
        return False
    finally:
        model.train(was_training)


def batch_order(n: int, micro_batch: int, seed: int, epoch: int, lengths: list[int],
                window_batches: int = 64, min_windows: int = 16) -> list[list[int]]:
    """Micro-batches of similar length (little padding), in a shuffled order that depends only on seed+epoch.

    Rows are shuffled, then sorted by length within windows of `window_batches` micro-batches, but never fewer
    than `min_windows` windows per epoch: sorting a whole small dataset into one length order makes every
    micro-batch a run of near-identical rows (in templated data often one class or one phrasing), and that was
    measured to cost held-out accuracy (bench/train_quality.py). Below 2 micro-batches a window is a plain shuffle.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    indices = list(range(n))
    rng.shuffle(indices)
    window = micro_batch * length_window_batches(n, micro_batch, window_batches, min_windows)
    ordered = []
    for start in range(0, n, window):
        chunk = sorted(indices[start : start + window], key=lambda i: lengths[i])
        ordered.extend(chunk)
    batches = [ordered[i : i + micro_batch] for i in range(0, n, micro_batch)]
    rng.shuffle(batches)
    return batches


def length_window_batches(n: int, micro_batch: int, window_batches: int, min_windows: int = 16) -> int:
    """Micro-batches per length-sorting window: at most window_batches, and small enough for min_windows windows
    per epoch; 1 (no sorting across rows) when that leaves less than 2."""
    cap = max(1, math.ceil(n / micro_batch) // max(1, min_windows))
    size = min(max(1, window_batches), cap)
    return size if size >= 2 else 1


def collate(rows: list[dict], pad_id: int, device):
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


# ------------------------------------------------------------------------------------------ model


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def load_for_training(spec: TrainSpec):
    """Base model (4-bit for QLoRA) wrapped for the method, in train mode, with the method's parameters trainable."""
    import torch

    from .modelstore import load_model_and_tokenizer

    quantize = method_traits(spec.method).quantized_base
    if quantize:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TrainingError("QLoRA needs the bitsandbytes package on this worker; install tunedeck[train].") from None
    model, tokenizer = load_model_and_tokenizer(
        spec.base_model_path,
        device=spec.device,
        dtype=spec.dtype,
        quantize_4bit=quantize,
        trust_remote_code=spec.trust_remote_code,
    )
    # Lean QLoRA: no prepare_model_for_kbit_training. It upcasts every non-quantised weight to fp32 and was
    # measured 2.2-2.9x slower than NF4 weights with bf16 compute; the LoRA weights follow the compute dtype.
    model.config.use_cache = False
    if spec.plan.get("fused_cross_entropy") is False:
        fastloss.use_full_logits(model)
    spec.plan["kernels"] = apply_fused_kernels(model, spec)
    if spec.gradient_checkpointing and method_traits(spec.method).gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs, so no enable_input_require_grads() is needed.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_for_training(model, spec.as_plan())
    if spec.plan.get("cpu_dropout") is not False and cpudropout.use_on(model):
        spec.plan["kernels"].append(cpudropout.KERNEL_NAME)
    if quantize:
        compute = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
        for p in model.parameters():
            if p.requires_grad and p.dtype != compute:
                p.data = p.data.to(compute)
        # An evaluation before training would otherwise repack the 4-bit weights on AVX512-BF16 CPUs into a
        # layout that passes no gradient back (see fourbit.py).
        fourbit.keep_trainable(model)
    if _compute_dtype(model) == torch.float16:
        # Master weights in fp32: the gradient scaler unscales fp32 gradients, and fp16 updates round to nothing.
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.float16:
                p.data = p.data.float()
    # from_pretrained returns eval mode, in which gradient checkpointing and dropout silently do nothing.
    model.train()
    return model, tokenizer


def apply_fused_kernels(model, spec: TrainSpec) -> list[str]:
    """Liger's Triton kernels for RMSNorm, SwiGLU and RoPE on a CUDA model, when liger-kernel is installed (the
    `gpu` extra) and the plan does not turn them off. Patched on the base model before the adapter wraps it, so
    LoRA layers inside the MLP keep working. Returns what was applied; the loss is fused separately (fastloss)."""
    if spec.plan.get("liger") is False or _device_of(model).type != "cuda":
        return []
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return []
    try:
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception:  # noqa: BLE001 - an unsupported architecture trains on the plain kernels
        return []
    return ["liger-rms-norm", "liger-swiglu", "liger-rope"]


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _compute_dtype(model):
    return getattr(_base_of(model), "dtype", None)


def _device_of(model):
    return next(model.parameters()).device


def token_loss_sum(model, ids, labels, mask, position_ids=None):
    """Summed cross-entropy over the learned tokens (the caller divides by the token count of the whole step).
    Fused with the output layer where the model allows it: see fastloss.py."""
    return fastloss.token_loss_sum(model, ids, labels, mask, position_ids)


def _answer_logprobs(model, ids, labels, mask):
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits
    if logits.shape[1] > labels.shape[1]:
        logits = logits[:, -labels.shape[1] :]
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1)


def dpo_loss(model, batch: list[dict], beta: float, pad_id: int, device):
    """Direct Preference Optimisation; the reference model is the base itself, with the LoRA switched off."""
    import torch
    import torch.nn.functional as F

    rows = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
    ids, labels, mask = collate(rows, pad_id, device)
    policy = _answer_logprobs(model, ids, labels, mask)
    with torch.no_grad(), model.disable_adapter():
        reference = _answer_logprobs(model, ids, labels, mask)
    n = len(batch)
    margin = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
    losses = -F.logsigmoid(beta * margin)
    accuracy = float((margin > 0).float().mean())
    tokens = int((labels[:, 1:] != IGNORE).sum())
    return losses.sum(), n, tokens, {"reward_accuracy": accuracy, "reward_margin": float(beta * margin.mean())}


def preference_loss(model, batch: list[dict], spec, pad_id: int, device):
    """The loss of the methods that compare the adapter with its base (adapter disabled): dpo and kto."""
    if spec.method == "kto":
        return kto_loss(model, batch, spec.kto_beta, pad_id, device)
    return dpo_loss(model, batch, spec.dpo_beta, pad_id, device)


def kto_loss(model, batch: list[dict], beta: float, pad_id: int, device):
    """Kahneman-Tversky Optimisation (Ethayarajh et al. 2024, as TRL's KTOTrainer computes it) on unpaired
    desirable/undesirable answers. The reference is the base itself with the LoRA switched off, as in dpo_loss.
    The reference point z0 (the policy's KL from the reference) is estimated by the batch mean of the answers'
    log-ratios, clamped at 0 and not back-propagated (the paper's batch estimate; TRL uses mismatched pairs).
    Desirable: 1 - sigmoid(beta (r - z0)); undesirable: 1 - sigmoid(beta (z0 - r)), r = log pi/pi_ref."""
    import torch

    ids, labels, mask = collate(batch, pad_id, device)
    policy = _answer_logprobs(model, ids, labels, mask)
    with torch.no_grad(), model.disable_adapter():
        reference = _answer_logprobs(model, ids, labels, mask)
    ratios = policy - reference
    kl = ratios.detach().mean().clamp(min=0)
    desirable = torch.tensor([bool(b["desirable"]) for b in batch], device=ratios.device)
    losses = torch.where(desirable, 1 - torch.sigmoid(beta * (ratios - kl)), 1 - torch.sigmoid(beta * (kl - ratios)))
    right = torch.where(desirable, ratios > kl, ratios < kl)
    rewards = (beta * ratios).detach()
    info = {"reward_accuracy": float(right.float().mean()), "kl": float(kl)}
    if bool(desirable.any()) and bool((~desirable).any()):
        info["reward_margin"] = float(rewards[desirable].mean() - rewards[~desirable].mean())
    tokens = int((labels[:, 1:] != IGNORE).sum())
    return losses.sum(), len(batch), tokens, info


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(model, examples: list[dict], spec: TrainSpec, pad_id: int) -> dict:
    import torch

    if not examples:
        return {}
    device = _device_of(model)
    model.eval()
    total, count, extra = 0.0, 0, {}
    with torch.no_grad():
        for start in range(0, len(examples), spec.micro_batch):
            batch = examples[start : start + spec.micro_batch]
            if method_traits(spec.method).preference:
                loss, n, _, info = preference_loss(model, batch, spec, pad_id, device)
                extra.setdefault("reward_accuracy", []).append(info["reward_accuracy"])
            else:
                ids, labels, mask = collate(batch, pad_id, device)
                loss, n = token_loss_sum(model, ids, labels, mask)
            total += float(loss)
            count += n
    model.train()
    eval_loss = total / max(count, 1)
    out = {"eval_loss": eval_loss}
    if not method_traits(spec.method).preference:
        out["perplexity"] = math.exp(min(eval_loss, 50))
    else:
        out["reward_accuracy"] = sum(extra["reward_accuracy"]) / len(extra["reward_accuracy"])
    return out


def generate_samples(model, tokenizer, eval_file, spec: TrainSpec) -> list[dict]:
    """Greedy answers to a few held-out prompts, stopping at the end-of-turn token, for side-by-side review."""
    import torch

    from .generation import decode_answer, generate
    from .modelstore import stop_token_ids

    if not eval_file or spec.max_eval_generations <= 0:
        return []
    samples = []
    device = _device_of(model)
    model.eval()
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    for example in iter_examples(eval_file):
        if len(samples) >= spec.max_eval_generations:
            break
        if "messages" in example:
            messages = example["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt_messages, reference = messages[:last], messages[last]["content"]
        elif "chosen" in example:
            prompt_messages, reference = list(example["prompt"]), example["chosen"]
        else:
            continue
        prompt = render_prompt(tokenizer, prompt_messages)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -spec.max_seq_len :]
        with torch.no_grad():
            out = generate(
                model,
                ids.to(device),
                max_new_tokens=spec.max_new_tokens,
                do_sample=False,
                eos_token_id=stops or None,
                pad_token_id=tokenizer.pad_token_id,
            )
        text = decode_answer(tokenizer, out[0, ids.shape[1] :])
        samples.append({"prompt": prompt_messages[-1]["content"] if prompt_messages else "", "output": text,
                        "reference": reference})
    model.train()
    return samples


def _memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


# ------------------------------------------------------------------------------------------ fit check


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
        if method_traits(spec.method).preference:
            loss, _, _, _ = preference_loss(model, batch, spec, pad_id, device)
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


def _act_on_fit_check(check: dict, spec: TrainSpec, on_event) -> None:
    estimated = check["estimated_bytes"]
    said = f"estimated {_gib(estimated)}, " if estimated else ""
    if check["fits"]:
        budget = f"budget {_gib(check['capacity_bytes'])}" if check["capacity_bytes"] else "no memory budget in the plan"
        on_event("fit_check", f"Fit check: the longest micro-batch ({check['batch_tokens']} tokens) took "
                 f"{_gib(check['measured_bytes'])} ({said}{budget}).", check)
        spec.plan["fit_check"] = check
        return
    change = _shrink_after_oom(spec)
    if change is None and spec.method in ("lora", "dora") and check["device"] == "cuda":
        spec.method = "qlora"
        change = "QLoRA (4-bit base weights)"
    message = (f"Fit check: the longest micro-batch took {_gib(check['measured_bytes'])}, over the budget of "
               f"{_gib(check['capacity_bytes'])} ({said.rstrip(', ')}).")
    if change is None:
        raise OutOfMemory(message + " Nothing smaller is left to try: use a shorter max_seq_len, QLoRA or a bigger GPU.")
    on_event("fit_check", message + f" Replanned before training: {change}.", {**check, "replanned": change})
    spec.plan.setdefault("fit_history", []).append(check)
    spec.plan["method"] = spec.method
    raise Replan(change)


def _gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


# ------------------------------------------------------------------------------------------ the loop


def _lr_at(step: int, total: int, warmup: int, peak: float, schedule: str = "cosine", floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _noop(*args, **kwargs):
    return None


def train(
    spec: TrainSpec,
    on_progress: Callable[[dict], None] | None = None,
    on_event: Callable[[str, str, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Trains spec.method on spec.train_file and saves the adapter to spec.output_dir. See docs/internals.md."""
    on_progress = on_progress or _noop
    on_event = on_event or _noop
    should_stop = should_stop or (lambda: False)
    spec.validate()
    oom_recoveries = 0
    while True:
        try:
            return _train_once(spec, on_progress, on_event, should_stop, oom_recoveries)
        except OutOfMemory:
            raise
        except Replan:
            _release_memory()
            continue
        except Exception as exc:
            if not _is_oom(exc):
                raise
            _release_memory()
            change = _shrink_after_oom(spec)
            if change is None:
                raise OutOfMemory(
                    "Out of GPU memory even with micro-batch 1 and gradient checkpointing at "
                    f"max_seq_len {spec.max_seq_len}. Use QLoRA, a smaller max_seq_len or a bigger GPU."
                ) from None
            oom_recoveries += 1
            on_event("oom_recovered", f"Ran out of GPU memory; retrying with {change}.", spec.as_plan())


class Replan(Exception):
    """The fit check found the plan too big: train again from the start with the smaller plan in spec."""


def _release_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _shrink_after_oom(spec: TrainSpec) -> str | None:
    """Halves the micro-batch (doubling accumulation, so the effective batch stays), then turns on checkpointing."""
    if spec.micro_batch > 1:
        spec.micro_batch //= 2
        spec.grad_accum *= 2
        return f"micro-batch {spec.micro_batch} x {spec.grad_accum} accumulation steps (same effective batch)"
    if not spec.gradient_checkpointing and method_traits(spec.method).gradient_checkpointing:
        spec.gradient_checkpointing = True
        return "gradient checkpointing on"
    return None


@dataclass
class Run:
    """Everything one training attempt holds between its steps. Built by setup_run, read by the rest."""
    spec: TrainSpec
    model: object
    tokenizer: object
    device: object
    pad_id: int
    train_rows: list
    eval_rows: list
    data_stats: dict
    params: list
    optimizer: object
    scaler: object  # a GradScaler when the compute dtype is fp16 (its range needs loss scaling), else None
    total_steps: int
    warmup: int
    trainable: int
    total_params: int
    state: dict
    resumed: bool
    guard: LearningGuard
    lengths: list = field(default_factory=list)
    order: list = field(default_factory=list)


def _train_once(spec, on_progress, on_event, should_stop, oom_recoveries) -> TrainResult:
    """One attempt, read top to bottom: set up, measure the base, step until done or cancelled, then finish."""
    run = setup_run(spec, on_event)
    initial_eval = {} if run.resumed else evaluate_before_training(run, on_event, on_progress)
    clock = {"started": time.monotonic(), "last_checkpoint": time.monotonic(), "loss_ema": None, "last_eval": {}}
    while run.state["step"] < run.total_steps:
        step_start, began = dict(run.state), time.monotonic()
        outcome = optimizer_step(run, should_stop)
        clock["step_seconds"] = clock.get("step_seconds", 0.0) + time.monotonic() - began
        if outcome is None:  # cancelled between micro-batches: the half-done step is thrown away
            run.state = step_start
            return finish_cancelled(run, on_event)
        report_step(run, outcome, clock, on_progress, on_event)
        if clock.get("stopped_early"):
            break
    run.guard.check_finished(initial_eval, clock.get("best"))
    return finish_run(run, clock, initial_eval, oom_recoveries)


# ------------------------------------------------------------------------------------------ setup


def setup_run(spec: TrainSpec, on_event) -> Run:
    import torch

    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    model, tokenizer = load_for_training(spec)
    device = _device_of(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_rows, data_stats, eval_rows = _load_rows(spec, tokenizer)
    train_rows = _pack_if_planned(spec, model, device, train_rows, on_event)

    batches_per_epoch = math.ceil(len(train_rows) / spec.micro_batch)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / spec.grad_accum))
    total_steps = int(spec.max_steps or max(1, math.ceil(spec.epochs * steps_per_epoch)))
    trainable, total_params = count_parameters(model)
    named_params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named_params]
    optimizer = build_optimizer(params, {**spec.plan, "learning_rate": spec.learning_rate,
                                         "weight_decay": spec.weight_decay}, device)

    # Before any checkpoint is restored: the measurement clears the optimizer state it creates.
    _act_on_fit_check(fit_check(model, spec, train_rows, optimizer, pad_id, device), spec, on_event)

    state = {"step": 0, "micro_index": 0, "epoch": 0, "tokens_seen": 0}
    resumed = ckpt.latest(spec.checkpoint_dir) if spec.checkpoint_dir else None
    if resumed:
        state = ckpt.restore(resumed, model, optimizer)
        on_event("resumed", f"Resumed from the checkpoint at step {state['step']}.", {"step": state["step"]})
    on_event("started", f"Training {spec.method} on {len(train_rows)} examples for {total_steps} steps "
             f"({trainable:,} trainable parameters of {total_params:,}).",
             {"data": data_stats, "total_steps": total_steps, "trainable_parameters": trainable,
              "loss_path": fastloss.loss_path(model)})
    run = Run(spec=spec, model=model, tokenizer=tokenizer, device=device, pad_id=pad_id, train_rows=train_rows,
              eval_rows=eval_rows, data_stats=data_stats, params=params, optimizer=optimizer,
              scaler=_grad_scaler(model, device), total_steps=total_steps,
              warmup=int(spec.warmup_ratio * total_steps), trainable=trainable, total_params=total_params,
              state=state, resumed=bool(resumed), guard=LearningGuard(named_params))
    run.lengths = [len(r["input_ids"]) if "input_ids" in r else len(r["chosen"]["input_ids"]) for r in train_rows]
    run.order = _epoch_order(run, state["epoch"])
    return run


def _load_rows(spec: TrainSpec, tokenizer):
    train_rows, data_stats = load_encoded(spec.train_file, tokenizer, spec)
    if not train_rows:
        raise TrainingError(
            "No training example has any token left to learn after tokenisation "
            f"(max_seq_len {spec.max_seq_len}): raise max_seq_len or check the answers are not empty."
        )
    eval_rows = []
    if spec.eval_file and Path(spec.eval_file).is_file():
        eval_rows, _ = load_encoded(spec.eval_file, tokenizer, spec, limit=spec.max_eval_examples)
    return train_rows, data_stats, eval_rows


def _pack_if_planned(spec: TrainSpec, model, device, train_rows, on_event):
    if not (spec.packing and method_traits(spec.method).can_pack):
        return train_rows
    if packing_isolates_examples(model, device):
        return pack(train_rows, spec.max_seq_len)
    spec.packing = False
    on_event("packing_off", "Packing turned off: this model's attention cannot keep packed examples "
             "apart (it ignores restarting position ids), so they would attend to each other.", {})
    return train_rows


def _grad_scaler(model, device):
    """fp16 has too little range for small gradients: scale the loss up and the gradients back down (a step with
    an overflow is skipped). bf16 and fp32 need none."""
    import torch

    if _compute_dtype(model) != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def _epoch_order(run: Run, epoch: int) -> list[list[int]]:
    spec = run.spec
    return batch_order(len(run.train_rows), spec.micro_batch, spec.seed, epoch, run.lengths,
                       spec.length_group_window, spec.length_group_min_windows)


def evaluate_before_training(run: Run, on_event, on_progress) -> dict:
    """The base model's own score on the held-out rows: the yardstick every later evaluation is read against."""
    if not run.eval_rows:
        return {}
    initial = evaluate(run.model, run.eval_rows, run.spec, run.pad_id)
    on_event("evaluated", f"Before training: eval loss {initial['eval_loss']:.4f}.", {"step": 0, **initial})
    on_progress({"step": 0, "total_steps": run.total_steps, **initial})
    return initial


# ------------------------------------------------------------------------------------------ one optimizer step


def _next_micro_batches(run: Run) -> list[list[dict]]:
    """The grad_accum micro-batches of the next optimizer step, moving to a new epoch's order when one runs out."""
    micro = []
    for _ in range(run.spec.grad_accum):
        if run.state["micro_index"] >= len(run.order):
            run.state["epoch"] += 1
            run.state["micro_index"] = 0
            run.order = _epoch_order(run, run.state["epoch"])
        micro.append([run.train_rows[i] for i in run.order[run.state["micro_index"]]])
        run.state["micro_index"] += 1
    return micro


def _loss_denominator(spec: TrainSpec, micro: list[list[dict]]) -> int:
    """What the step's summed loss is divided by: every learned token of the whole step (so a long example
    weighs by its tokens whichever micro-batch it falls in), or every pair for preference methods."""
    if method_traits(spec.method).preference:
        return sum(len(b) for b in micro)
    return sum(sum(sum(1 for l in r["labels"][1:] if l != IGNORE) for r in b) for b in micro)


def _micro_batch_loss(run: Run, batch: list[dict]):
    """(summed loss, items it sums over, tokens in the batch, extra metrics) for one micro-batch."""
    if method_traits(run.spec.method).preference:
        return preference_loss(run.model, batch, run.spec, run.pad_id, run.device)
    ids, labels, mask = collate(batch, run.pad_id, run.device)
    positions = packed_positions(batch, ids.shape[1], run.device)
    loss, n = token_loss_sum(run.model, ids, labels, mask, positions)
    return loss, n, int(mask.sum()), {}


def optimizer_step(run: Run, should_stop) -> dict | None:
    """Accumulates the gradients of grad_accum micro-batches and takes one optimizer step. None when cancelled."""
    import torch

    run.optimizer.zero_grad(set_to_none=True)
    micro = _next_micro_batches(run)
    denominator = max(_loss_denominator(run.spec, micro), 1)
    loss_sum, items, tokens, info = 0.0, 0, 0, {}
    for batch in micro:
        if should_stop():
            return None
        loss, n, batch_tokens, info = _micro_batch_loss(run, batch)
        scaled = loss / denominator
        (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        loss_sum += float(loss.detach())
        items += n
        tokens += batch_tokens
    if run.scaler:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    # clip the gradient, set this step's learning rate, step
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, run.spec.max_grad_norm or math.inf))
    lr = _lr_at(run.state["step"], run.total_steps, run.warmup, run.spec.learning_rate, run.spec.lr_schedule,
                run.spec.min_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.guard.after_step(grad_norm)
    run.state["step"] += 1
    run.state["tokens_seen"] += tokens
    return {"train_loss": loss_sum / max(items, 1), "grad_norm": grad_norm, "learning_rate": lr,
            "tokens": tokens, "info": info}


def report_step(run: Run, outcome: dict, clock: dict, on_progress, on_event) -> None:
    """Progress after a step, an evaluation when one is due, and a checkpoint when one is due (said first)."""
    spec, state = run.spec, run.state
    clock["window_tokens"] = clock.get("window_tokens", 0) + outcome["tokens"]
    clock["last_loss"] = outcome["train_loss"]
    ema = clock["loss_ema"]
    clock["loss_ema"] = outcome["train_loss"] if ema is None else 0.9 * ema + 0.1 * outcome["train_loss"]
    elapsed = time.monotonic() - clock["started"]
    progress = {
        "step": state["step"], "total_steps": run.total_steps,
        "epoch": state["epoch"] + state["micro_index"] / max(1, len(run.order)),
        "train_loss": outcome["train_loss"], "learning_rate": outcome["learning_rate"],
        "grad_norm": outcome["grad_norm"],
        "tokens_per_second": clock["window_tokens"] / elapsed if elapsed > 0 else 0.0,
        # the optimizer steps alone, evaluations left out: what the search compares its trials' speed by
        "train_tokens_per_second": clock["window_tokens"] / max(clock.get("step_seconds", 0.0), 1e-9),
        "eta_seconds": elapsed / state["step"] * (run.total_steps - state["step"]),
        "memory_bytes": _memory_bytes(run.device),
    }
    progress.update({k: v for k, v in outcome["info"].items() if isinstance(v, float)})
    if state["step"] % _eval_every(run) == 0 or state["step"] == run.total_steps:
        clock["last_eval"] = evaluate(run.model, run.eval_rows, spec, run.pad_id)
        progress.update(clock["last_eval"])
        if clock["last_eval"]:
            on_event("evaluated", f"Step {state['step']}: eval loss {clock['last_eval']['eval_loss']:.4f}.",
                     clock["last_eval"])
            track_best(run, clock, on_event)
    checkpoint_due = _checkpoint_due(run, clock)
    # Said before the checkpoint exists, so a caller that batches progress can write it first: a worker killed
    # right after the save must not leave a checkpoint ahead of the recorded metrics.
    progress["checkpoint_due"] = checkpoint_due
    on_progress(progress)
    if checkpoint_due:
        path = ckpt.save(spec.checkpoint_dir, run.model, run.optimizer, state, spec.as_plan())
        clock["last_checkpoint"] = time.monotonic()
        on_event("checkpoint", f"Checkpoint saved at step {state['step']}.", {"path": str(path), **state})


EVAL_SHARE = 0.10  # validation may cost this share of the training compute (a forward pass ~ 1/3 of a step)


def _eval_every(run: Run) -> int:
    """Steps between evaluations: as given, else up to 8 per run when early stopping watches them (4 without),
    fewer when the validation rows are many against the rows trained: on 360 training rows and 40 validation
    rows, 8 evaluations plus the one before training were a third of the run's compute."""
    if run.spec.eval_every_steps:
        return run.spec.eval_every_steps
    per_run = 8 if run.spec.early_stopping_patience and run.eval_rows else 4
    if run.eval_rows:
        rows_trained = run.total_steps * run.spec.micro_batch * run.spec.grad_accum
        affordable = EVAL_SHARE * 3 * rows_trained / len(run.eval_rows) - 1  # - 1: the one before training
        per_run = max(2, min(per_run, int(affordable)))
    return max(1, math.ceil(run.total_steps / per_run))


def track_best(run: Run, clock: dict, on_event) -> None:
    """Keeps a copy of the trainable weights at the best validation loss so far, and sets clock["stopped_early"]
    once early_stopping_patience evaluations in a row brought no new best. The copy lives in memory (adapter
    weights only); a run resumed from a checkpoint starts tracking afresh."""
    loss = clock["last_eval"].get("eval_loss")
    if loss is None or not math.isfinite(loss):
        return
    best = clock.get("best")
    if best is None or loss < best["eval"]["eval_loss"]:
        clock["best"] = {"step": run.state["step"], "eval": dict(clock["last_eval"]), "evals_since": 0,
                         "weights": [p.detach().to("cpu", copy=True) for p in run.params]}
        return
    best["evals_since"] += 1
    patience = run.spec.early_stopping_patience
    if patience and best["evals_since"] >= patience and run.state["step"] < run.total_steps:
        clock["stopped_early"] = True
        on_event("stopped_early", f"Stopped early at step {run.state['step']} of {run.total_steps}: no better "
                 f"validation loss in {patience} evaluations; keeping step {best['step']} "
                 f"(eval loss {best['eval']['eval_loss']:.4f}).",
                 {"step": run.state["step"], "best_step": best["step"], "best_eval_loss": best["eval"]["eval_loss"]})


def restore_best(run: Run, clock: dict) -> None:
    """Puts the best evaluation's weights back into the model before it is saved (no-op when the last was best)."""
    import torch

    best = clock.get("best")
    if not best or best["step"] == run.state["step"]:
        return
    with torch.no_grad():
        for p, kept in zip(run.params, best["weights"]):
            p.copy_(kept.to(p.device))


def _checkpoint_due(run: Run, clock: dict) -> bool:
    spec, step = run.spec, run.state["step"]
    due_by_steps = spec.checkpoint_every_steps and step % spec.checkpoint_every_steps == 0
    due_by_time = time.monotonic() - clock["last_checkpoint"] >= spec.checkpoint_every_minutes * 60
    return bool(spec.checkpoint_dir and step < run.total_steps and (due_by_steps or due_by_time))


# ------------------------------------------------------------------------------------------ finish


def finish_cancelled(run: Run, on_event) -> TrainResult:
    if run.spec.checkpoint_dir and run.state["step"] > 0:
        ckpt.save(run.spec.checkpoint_dir, run.model, run.optimizer, run.state, run.spec.as_plan())
    on_event("cancelled", f"Stopped at step {run.state['step']} of {run.total_steps}.", dict(run.state))
    return TrainResult("cancelled", None, {"steps": run.state["step"]}, [], run.spec.as_plan())


def finish_run(run: Run, clock: dict, initial_eval: dict, oom_recoveries: int) -> TrainResult:
    """Saves the adapter folder atomically (staged, then renamed) with its metadata, tokenizer and stop tokens."""
    spec = run.spec
    out_dir = Path(spec.output_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    restore_best(run, clock)
    save_adapter(run.model, spec.as_plan(), staging)
    generations = generate_samples(run.model, run.tokenizer, spec.eval_file, spec)
    metrics = _final_metrics(run, clock, initial_eval, oom_recoveries)
    meta = {"method": spec.method, "plan": spec.as_plan(), "base_model": spec.base_model_path,
            "quantize_4bit": method_traits(spec.method).quantized_base, "metrics": metrics,
            "max_seq_len": spec.max_seq_len}
    (staging / "tunedeck.json").write_text(json.dumps(meta, indent=2, default=str))
    # The adapter folder carries what makes it behave like it did in training: the tokenizer with its chat
    # template, and a generation config whose stop tokens include the end-of-turn token it learned to emit.
    run.tokenizer.save_pretrained(str(staging))
    from .modelstore import save_generation_config

    save_generation_config(staging, run.tokenizer, getattr(_base_of(run.model), "generation_config", None))
    os.replace(staging, out_dir)
    if spec.checkpoint_dir:
        ckpt.clear(spec.checkpoint_dir)
    return TrainResult("succeeded", str(out_dir), metrics, generations, spec.as_plan())


def _final_metrics(run: Run, clock: dict, initial_eval: dict, oom_recoveries: int) -> dict:
    state = run.state
    metrics = {
        "train_loss": clock["loss_ema"],
        "final_step_loss": clock.get("last_loss") if state["step"] else None,
        "steps": state["step"],
        "tokens_seen": state["tokens_seen"],
        "tokens_per_second": state["tokens_seen"] / max(time.monotonic() - clock["started"], 1e-9),
        "trainable_parameters": run.trainable,
        "total_parameters": run.total_params,
        "train_examples": len(run.train_rows),
        "truncated_examples": run.data_stats["truncated"],
        "skipped_examples": run.data_stats["skipped_no_labels"],
        "oom_recoveries": oom_recoveries,
        "peak_memory_bytes": _memory_bytes(run.device),
        "device": str(run.device),
        "loss_path": fastloss.loss_path(run.model),
        "kernels": run.spec.plan.get("kernels", []),
        **clock["last_eval"],
    }
    if run.spec.plan.get("fit_check"):
        metrics["fit_check"] = run.spec.plan["fit_check"]
    if initial_eval:
        metrics["initial_eval_loss"] = initial_eval["eval_loss"]
    best = clock.get("best")
    if best:
        # The adapter holds the best evaluation's weights, so its scores are the ones reported.
        metrics["last_eval_loss"] = clock["last_eval"].get("eval_loss")
        metrics.update(best["eval"])
        metrics["best_step"] = best["step"]
        metrics["best_eval_loss"] = best["eval"]["eval_loss"]
    metrics["stopped_early"] = bool(clock.get("stopped_early"))
    return metrics


def spec_dict(spec: TrainSpec) -> dict:
    return asdict(spec)

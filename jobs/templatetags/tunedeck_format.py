"""Human labels and values for metrics and settings (version, compare and job pages): no snake_case keys, bytes
as GiB, learning rates in scientific notation, lists and booleans as text instead of Python reprs."""
import math

from django import template

from finetune.methods import method_plan_field_labels

from .humanize_bytes import human_bytes

register = template.Library()

LABELS = {
    "eval_loss": "Validation loss",
    "initial_eval_loss": "Validation loss before training",
    "train_loss": "Train loss (smoothed over the run)",
    "final_step_loss": "Train loss (last step)",
    "perplexity": "Perplexity",
    "reward_accuracy": "Reward accuracy",
    "reward_margin": "Reward margin",
    "tokens_per_second": "Tokens per second",
    "steps": "Steps",
    "tokens_seen": "Tokens seen",
    "trainable_parameters": "Trainable parameters",
    "total_parameters": "Total parameters",
    "peak_memory_bytes": "Peak memory (whole process)",
    "memory_bytes": "Memory (whole process)",
    "train_examples": "Training examples",
    "truncated_examples": "Examples cut at max length",
    "skipped_examples": "Examples skipped (nothing to learn)",
    "oom_recoveries": "Out-of-memory recoveries",
    "exact_match": "Exact match",
    "token_f1": "Token F1",
    "rouge_l": "ROUGE-L",
    "grad_norm": "Gradient norm",
    "learning_rate": "Learning rate",
    "eta_seconds": "Time left",
    "epoch": "Epoch",
    "loss_path": "Loss computation",
    "kernels": "Faster kernels used",
    "device": "Device",
    "base_model": "Base model",
    "dataset": "Dataset",
    "method": "Method",
    "rank": "Rank",
    "alpha": "Alpha",
    "target_modules": "Target modules",
    "micro_batch": "Micro-batch",
    "grad_accum": "Gradient accumulation",
    "max_seq_len": "Max length (tokens)",
    "gradient_checkpointing": "Gradient checkpointing",
    "epochs": "Epochs",
    "max_steps": "Max steps",
    "dtype": "Precision",
    "dropout": "Dropout",
    "warmup_ratio": "Warm-up ratio",
    "weight_decay": "Weight decay",
    "seed": "Seed",
    "packing": "Packing",
    "completion_only": "Train on answers only",
    "num_virtual_tokens": "Virtual tokens",
    "adapter_bottleneck": "Adapter bottleneck",
    "max_new_tokens": "Max new tokens",
    "max_eval_generations": "Generations at the end",
    "eval_every_steps": "Evaluate every (steps)",
    "early_stopping_patience": "Early stopping patience (evaluations)",
    "early_stopping_metric": "Early stopping watches",
    "val_exact_match": "Validation exact match",
    "checkpoint_every_steps": "Checkpoint every (steps)",
    "checkpoint_every_minutes": "Checkpoint every (minutes)",
}
COUNTS = {"steps", "tokens_seen", "trainable_parameters", "total_parameters", "train_examples",
          "truncated_examples", "skipped_examples", "oom_recoveries", "max_steps", "seed", "rank", "alpha",
          "micro_batch", "grad_accum", "max_seq_len"}


@register.filter
def label(name):
    """'peak_memory_bytes' -> 'Peak memory (whole process)'; unknown keys become words."""
    name = str(name)
    if name in LABELS:
        return LABELS[name]
    own = method_plan_field_labels()  # a method's own fields, named by the method (finetune/methods/)
    if name in own:
        return own[name]
    words = name.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


@register.filter
def value(raw, name=""):
    """A metric or setting as text a person reads."""
    name = str(name or "")
    if raw is None or raw == "":
        return "–"
    if isinstance(raw, bool):
        return "yes" if raw else "no"
    if isinstance(raw, (list, tuple)):
        return ", ".join(str(x) for x in raw) if raw else "none"
    if isinstance(raw, dict):
        return ", ".join(f"{label(k)}: {value(v, k)}" for k, v in raw.items()) or "none"
    if isinstance(raw, (int, float)):
        if isinstance(raw, float) and (math.isnan(raw) or math.isinf(raw)):
            return str(raw)
        if name.endswith("_bytes") or name == "memory":
            return human_bytes(raw)
        if name in ("learning_rate", "weight_decay") or (isinstance(raw, float) and raw != 0 and abs(raw) < 1e-3):
            return f"{raw:.2g}" if name != "learning_rate" else f"{raw:.1e}"
        if name in COUNTS or isinstance(raw, int):
            return f"{int(raw):,}"
        if name == "tokens_per_second":
            return f"{raw:,.0f}"
        if name in ("exact_match", "token_f1", "rouge_l", "reward_accuracy"):
            return f"{raw:.3f}"
        return f"{raw:.4g}" if abs(raw) < 1e5 else f"{raw:,.0f}"
    return str(raw)

"""What a training run is asked to do (TrainSpec, from a plan plus paths) and what it hands back (TrainResult)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import TrainingError
from .methods import get_method

STOPPING_METRICS = ("auto", "eval_loss", "exact_match")  # what early stopping may watch (finetune/validation.py)


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
    # auto: validation exact match when the answers are short, else validation loss (finetune/validation.py)
    early_stopping_metric: str = "auto"
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float = 10.0
    max_eval_generations: int = 4
    max_new_tokens: int = 64
    max_eval_examples: int = 200
    trust_remote_code: bool = False
    plan: dict = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: dict, **paths) -> TrainSpec:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in plan.items() if k in known and v is not None}
        spec = cls(**{**values, **paths, "plan": dict(plan)})
        spec.validate()
        return spec

    def validate(self):
        get_method(self.method)  # an unknown method: "Unknown method ...; choose one of ..."
        for name in ("micro_batch", "grad_accum", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise TrainingError(f"{name} must be at least 1 (got {getattr(self, name)}).")
        self.check_stopping_metric()
        if not self.learning_rate or self.learning_rate <= 0:
            raise TrainingError("learning_rate must be positive.")
        if not Path(self.train_file).is_file():
            raise TrainingError(f"The training file {self.train_file} is missing; re-process the dataset.")

    def check_stopping_metric(self):
        if (self.early_stopping_metric or "auto") not in STOPPING_METRICS:
            raise TrainingError(f"early_stopping_metric must be one of {', '.join(STOPPING_METRICS)}, not "
                                f"{self.early_stopping_metric!r}.")

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


def spec_dict(spec: TrainSpec) -> dict:
    return asdict(spec)

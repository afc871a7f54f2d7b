"""LoRA and its family: low-rank weight deltas on the base's linear layers (peft's LoraConfig).

LoRA (Hu et al. 2021), QLoRA (the same on a 4-bit NF4 base, Dettmers et al. 2023) and DoRA (LoRA with a learned
magnitude per output channel, Liu et al. 2024). The preference methods train a LoRA too (preference.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import FP32, Method, register_method

DEFAULT_RANK = 16
DEFAULT_DROPOUT = 0.05
DROPOUT_MASK_BYTES = 1  # CUDA's fused dropout keeps a bool mask; the CPU keeps one in the input's dtype (FP32)


def target_modules(plan: dict):
    return plan.get("target_modules") or "all-linear"


@dataclass(frozen=True)
class LoraMethod(Method):
    lora_family: bool = True
    adapts_layers: bool = True
    can_merge: bool = True
    use_dora: bool = False

    def peft_config(self, plan: dict):
        from peft import LoraConfig, TaskType

        rank = int(plan.get("rank") or DEFAULT_RANK)
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=rank,
            lora_alpha=float(plan.get("alpha") or 2 * rank),
            lora_dropout=float(plan.get("dropout", DEFAULT_DROPOUT) or 0.0),
            target_modules=target_modules(plan),
            use_dora=self.use_dora,
            bias="none",
        )

    def describes_config(self, config: dict) -> bool:
        return bool(config.get("use_dora")) == self.use_dora

    # ------------------------------------------------------------------ the estimator

    def adapted_modules(self, shape, setup) -> list:
        return shape.modules_for(setup.target_modules)

    def trainable_parameters(self, shape, setup) -> int:
        per_layer = sum(setup.rank * (m.in_features + m.out_features) for m in self.adapted_modules(shape, setup))
        return shape.num_layers * per_layer

    def activation_bytes_per_token(self, shape, setup) -> float:
        """peft casts each adapted layer's input to fp32 for lora_A (plus the dropout mask), and keeps lora_A's
        output (4 x rank) for lora_B."""
        mask = dropout_mask_bytes(setup)
        total = 0.0
        inputs = {}
        for m in self.adapted_modules(shape, setup):
            if not input_shared(setup):
                inputs[m.path] = (FP32 + mask) * m.in_features
            elif m.reads != "attention output":  # a view of the attention's output, which it keeps anyway
                inputs[m.reads] = FP32 * m.in_features
            total += FP32 * setup.rank + self.extra_bytes_per_output(setup) * m.out_features
        return total + sum(inputs.values())

    def extra_bytes_per_output(self, setup) -> float:
        return 0.0

    def backward_bytes_per_token(self, shape, setup, block: float) -> float:
        """The fp32 gradient of lora_A's input; the MLP's output projection releases its fp32 input copy before the
        gate and up gradients form (measured under checkpointing), so that copy is not counted twice."""
        adapted = self.adapted_modules(shape, setup)
        block += FP32 * max((m.in_features for m in adapted), default=0)
        if any(m.in_features == shape.intermediate_size for m in adapted):  # the MLP's output projection
            block -= (FP32 + dropout_mask_bytes(setup)) * shape.intermediate_size
        return block

    # ------------------------------------------------------------------ the planner

    def target_module_names(self, shape, requested) -> list[str]:
        return list(dict.fromkeys(m.name for m in shape.modules_for(requested)))

    def plan_settings(self, base: dict) -> dict:
        return {"dropout": base["dropout"]}

    def modules_reason(self, shape, names: str, count: int) -> str:
        return f"Target modules {names}: every linear layer of the {shape.family} block ({count} matrices in " \
               f"{shape.num_layers} layers), which tracks full fine-tuning better than attention-only LoRA."


@dataclass(frozen=True)
class DoraMethod(LoraMethod):
    use_dora: bool = True

    def trainable_parameters(self, shape, setup) -> int:
        magnitudes = sum(m.out_features for m in self.adapted_modules(shape, setup))
        return super().trainable_parameters(shape, setup) + shape.num_layers * magnitudes

    def extra_bytes_per_output(self, setup) -> float:
        """DoRA keeps the base output and the fp32 LoRA output of every adapted layer."""
        return setup.compute_bytes + FP32

    def weight_temporaries(self, shape, setup) -> float:
        """The weight norm of the largest adapted layer: an fp32 identity in x in, the fp32 LoRA product, and the
        fp32 weight and sum."""
        return max(FP32 * m.in_features**2 + 4 * FP32 * m.in_features * m.out_features
                   for m in self.adapted_modules(shape, setup))


def input_shared(setup) -> bool:
    """peft hands lora_A its layer's input cast to fp32 and through dropout: a new tensor per adapted layer,
    unless the input is already fp32 and dropout is off, when the layers that read one input keep it once
    (measured on the CPU: q, k and v keep one norm output, gate and up another)."""
    return setup.compute_bytes == FP32 and setup.dropout <= 0


def dropout_mask_bytes(setup) -> int:
    """Per element of an adapted layer's input; dropout there acts on peft's fp32 copy."""
    if setup.dropout <= 0:
        return 0
    return DROPOUT_MASK_BYTES if setup.device == "cuda" else FP32


LORA = register_method(LoraMethod(
    "lora", "LoRA", 2e-4,
    "usual for LoRA, whose adapter starts at zero and needs larger steps than full fine-tuning",
    auto_order=0, adapter_peft_types=("LORA",), serves_as_lora=True, searchable=True, search_alternative=True,
    oom_fallback="qlora"))
QLORA = register_method(LoraMethod(
    "qlora", "QLoRA", 2e-4, "the QLoRA paper's rate for 7B-13B models",
    quantized_base=True, auto_order=1, serves_as_lora=True, searchable=True))
DORA = register_method(DoraMethod(
    "dora", "DoRA", 2e-4, "DoRA trains like LoRA, with the same rate",
    adapter_peft_types=("LORA",), searchable=True, search_alternative=True, oom_fallback="qlora"))

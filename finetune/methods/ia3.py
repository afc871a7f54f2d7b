"""IA3 (Liu et al. 2022): learned vectors that scale the keys, values and the feed-forward input (peft's IA3Config).
It merges: W' = W * l."""
from __future__ import annotations

from dataclasses import dataclass

from .base import FP32, Method, register_method

BACKWARD_FP32_COPIES = 3  # fp32 gradient of the scaled feed-forward input, times the vector, times the input
FEEDFORWARD_NAMES = ("down_proj", "fc2", "mlp.c_proj", "w2")


@dataclass(frozen=True)
class Ia3Method(Method):
    adapts_layers: bool = True

    def peft_config(self, plan: dict):
        from peft import IA3Config, TaskType

        targets = plan.get("target_modules") or None
        feedforward = [m for m in (targets or []) if any(k in m for k in FEEDFORWARD_NAMES)]
        if targets and not feedforward:
            feedforward = None
        kwargs = {"target_modules": targets}
        if targets:
            kwargs["feedforward_modules"] = feedforward or []
        return IA3Config(task_type=TaskType.CAUSAL_LM, **kwargs)

    # ------------------------------------------------------------------ the estimator

    def adapted_modules(self, shape, setup) -> list:
        return shape.modules_for(list(shape.ia3_target_modules))

    def trainable_parameters(self, shape, setup) -> int:
        per_layer = sum(vector_size(shape, m) for m in self.adapted_modules(shape, setup))
        return shape.num_layers * per_layer

    def activation_bytes_per_token(self, shape, setup) -> float:
        """peft casts a feed-forward layer's input to the vector's fp32 and keeps that copy for the vector's
        gradient; on other layers it keeps the base layer's output (compute dtype) for it."""
        return sum(FP32 * m.in_features if feedforward(shape, m) else setup.compute_bytes * m.out_features
                   for m in self.adapted_modules(shape, setup))

    def backward_bytes_per_token(self, shape, setup, block: float) -> float:
        """The scaled feed-forward input's fp32 gradient, its product with the vector and with the input, beside
        the hidden state's gradient, when that is more."""
        scaled_inputs = [m.in_features for m in self.adapted_modules(shape, setup) if feedforward(shape, m)]
        widest = max(scaled_inputs, default=0)
        return max(block, setup.compute_bytes * shape.hidden_size + BACKWARD_FP32_COPIES * FP32 * widest)

    # ------------------------------------------------------------------ the planner

    def target_module_names(self, shape, requested) -> list[str]:
        return list(shape.ia3_target_modules)

    def modules_reason(self, shape, names: str, count: int) -> str:
        return f"Target modules {names}: peft's IA3 choice for {shape.family}, {count} scaling vectors."


def feedforward(shape, module) -> bool:
    return any(module.matches(t) for t in shape.ia3_feedforward_modules)


def vector_size(shape, module) -> int:
    """IA3 scales a feed-forward layer's input and any other layer's output."""
    return module.in_features if feedforward(shape, module) else module.out_features


IA3 = register_method(Ia3Method(
    "ia3", "IA3", 3e-3, "IA3 trains only scaling vectors, which need much larger steps",
    can_merge=True, adapter_peft_types=("IA3",)))

"""Methods that learn virtual tokens instead of changing weights: prefix tuning (Li & Liang 2021: a key and a value
vector per virtual token in every attention layer) and prompt tuning (Lester et al. 2021: input embeddings in front
of the sequence). Neither merges, packs (the virtual tokens belong to one sequence) nor serves on vLLM."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Method, register_method

DEFAULT_NUM_VIRTUAL_TOKENS = 20


def num_virtual_tokens(plan: dict) -> int:
    return int(plan.get("num_virtual_tokens") or DEFAULT_NUM_VIRTUAL_TOKENS)


@dataclass(frozen=True)
class VirtualTokenMethod(Method):
    can_pack: bool = False
    virtual_tokens: bool = True

    def plan_settings(self, base: dict) -> dict:
        return {"num_virtual_tokens": base["num_virtual_tokens"]}


@dataclass(frozen=True)
class PrefixMethod(VirtualTokenMethod):
    def peft_config(self, plan: dict):
        from peft import PrefixTuningConfig, TaskType

        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens(plan))

    def trainable_parameters(self, shape, setup) -> int:
        """A key and a value vector per virtual token per layer (peft without the prefix projection MLP)."""
        return setup.num_virtual_tokens * shape.num_layers * 2 * shape.kv_dim

    def prefix_tokens(self, setup) -> int:
        return setup.num_virtual_tokens


@dataclass(frozen=True)
class PromptMethod(VirtualTokenMethod):
    def peft_config(self, plan: dict):
        from peft import PromptTuningConfig, TaskType

        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens(plan))

    def trainable_parameters(self, shape, setup) -> int:
        return setup.num_virtual_tokens * shape.hidden_size

    def input_tokens(self, setup) -> int:
        return setup.num_virtual_tokens


PREFIX = register_method(PrefixMethod(
    "prefix", "Prefix tuning", 1e-2,
    "prefix tuning learns a few key/value vectors per layer and needs large steps",
    gradient_checkpointing=False,  # its past key values cannot be recomputed
    merge_refusal="prefix tuning adds learned key/value vectors to every attention layer; there is no weight "
    "to fold them into",
    adapter_peft_types=("PREFIX_TUNING",)))
PROMPT = register_method(PromptMethod(
    "prompt", "Prompt tuning", 3e-2,
    "prompt tuning learns a handful of input embeddings and needs the largest steps",
    merge_refusal="prompt tuning prepends learned virtual-token embeddings to the input; there is no weight "
    "to fold them into",
    adapter_peft_types=("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")))

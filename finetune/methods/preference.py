"""Preference training on a LoRA: DPO (Rafailov et al. 2023, chosen/rejected pairs) and KTO (Ethayarajh et al.
2024, answers labelled desirable or undesirable). Both compare the policy with its reference, the base with the
LoRA switched off, on full logits (no packing, no fused loss); their losses are in finetune/losses.py. ORPO, a
preference method without a reference, is orpo.py."""
from __future__ import annotations

from dataclasses import dataclass

from ..losses import dpo_loss, kto_loss
from .base import register_method
from .lora import LoraMethod

DEFAULT_BETA = 0.1  # TRL's default for both (the Zephyr DPO recipe's beta)


@dataclass(frozen=True)
class PreferenceMethod(LoraMethod):
    can_pack: bool = False
    preference: bool = True
    serves_as_lora: bool = True
    reference_model: bool = True
    beta_field: str = ""  # the plan field of its beta (dpo_beta, kto_beta, orpo_beta)

    def plan_settings(self, base: dict) -> dict:
        return {**super().plan_settings(base), self.beta_field: DEFAULT_BETA}

    def plan_fields(self) -> dict[str, type]:
        return {self.beta_field: float}

    def plan_field_labels(self) -> dict[str, str]:
        return {self.beta_field: f"{self.label.split(' (')[0]} beta"}

    def beta(self, spec) -> float:
        """The run's beta: a TrainSpec field (dpo_beta, kto_beta), else the plan's own field (methods added since)."""
        value = getattr(spec, self.beta_field, None)
        if value is None:
            value = spec.plan.get(self.beta_field)
        return float(DEFAULT_BETA if value is None else value)


@dataclass(frozen=True)
class DpoMethod(PreferenceMethod):
    paired: bool = True

    def example_problem(self, example: dict) -> str | None:
        if "chosen" not in example:
            return "DPO needs a preference dataset (prompt, chosen, rejected columns)."
        return None

    def loss(self, model, batch: list[dict], spec, pad_id: int, device):
        return dpo_loss(model, batch, self.beta(spec), pad_id, device)


@dataclass(frozen=True)
class KtoMethod(PreferenceMethod):
    def example_problem(self, example: dict) -> str | None:
        if "label" not in example:
            return ("KTO needs a dataset whose rows are labelled desirable or undesirable (a kto_tag or label column "
                    "of true/false).")
        return None

    def example_fields(self, example: dict) -> dict:
        return {"desirable": bool(example["label"])}

    def loss(self, model, batch: list[dict], spec, pad_id: int, device):
        return kto_loss(model, batch, self.beta(spec), pad_id, device)


DPO = register_method(DpoMethod(
    "dpo", "DPO (LoRA)", 5e-6,
    "DPO pulls the policy away from its reference; small steps keep it from collapsing (the Zephyr DPO recipe's rate)",
    beta_field="dpo_beta", schemas=("preference",), auto_for_schemas=("preference",),
    schema_claim="A preference dataset trains with method {methods} (or auto).",
    wrong_data="DPO needs a preference dataset (prompt/chosen/rejected); this one is {layout}."))
KTO = register_method(KtoMethod(
    "kto", "KTO (LoRA)", 5e-6,
    "KTO pulls the policy away from its reference like DPO; the KTO paper and TRL use DPO's small rates",
    beta_field="kto_beta", schemas=("kto",), auto_for_schemas=("kto",),
    schema_claim="This dataset labels answers desirable or undesirable (its kto_tag/label column): it trains with "
    "method {methods} (or auto), so undesirable answers are not learned as good ones.",
    wrong_data="KTO needs rows labelled desirable or undesirable (a kto_tag or label column); this dataset is "
    "{layout}."))

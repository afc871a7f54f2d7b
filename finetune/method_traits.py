"""One table of what each fine-tuning method is and can do. Pure Python (no torch): autotune, finetune, jobs and
the CLI all read it, so adding a method means one `register_method(...)` entry here plus its wrapper in
finetune/methods.py (the peft way: `register_peft_method` and one folder per tuner).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodTraits:
    name: str
    label: str
    learning_rate: float  # the default peak learning rate for this method
    learning_rate_why: str
    lora_family: bool = False  # low-rank weight deltas (rank, alpha, target modules apply)
    quantized_base: bool = False  # the frozen base is loaded in 4-bit NF4
    can_merge: bool = False  # folds into the base weights (a merged model needs no adapter at serving time)
    can_pack: bool = True  # packing and the fused output-layer loss apply (plain next-token loss on labels)
    virtual_tokens: bool = False  # learns virtual-token vectors (num_virtual_tokens applies)
    preference: bool = False  # trains on preference data against a reference (the base, adapter switched off)
    paired: bool = False  # each example is a chosen/rejected pair: two sequences (dpo); kto's are unpaired
    gradient_checkpointing: bool = True  # can recompute activations (prefix tuning's past key values cannot)
    peft: bool = True  # implemented with peft (adapter layers are Tunedeck's own)


METHODS: dict[str, MethodTraits] = {}


def register_method(traits: MethodTraits) -> MethodTraits:
    METHODS[traits.name] = traits
    return traits


register_method(MethodTraits(
    "lora", "LoRA", 2e-4,
    "usual for LoRA, whose adapter starts at zero and needs larger steps than full fine-tuning",
    lora_family=True, can_merge=True))
register_method(MethodTraits(
    "qlora", "QLoRA", 2e-4, "the QLoRA paper's rate for 7B-13B models",
    lora_family=True, quantized_base=True, can_merge=True))
register_method(MethodTraits(
    "dora", "DoRA", 2e-4, "DoRA trains like LoRA, with the same rate",
    lora_family=True, can_merge=True))
register_method(MethodTraits(
    "ia3", "IA3", 3e-3, "IA3 trains only scaling vectors, which need much larger steps",
    can_merge=True))
register_method(MethodTraits(
    "prefix", "Prefix tuning", 1e-2, "prefix tuning learns a few key/value vectors per layer and needs large steps",
    can_pack=False, virtual_tokens=True, gradient_checkpointing=False))
register_method(MethodTraits(
    "prompt", "Prompt tuning", 3e-2, "prompt tuning learns a handful of input embeddings and needs the largest steps",
    can_pack=False, virtual_tokens=True))
register_method(MethodTraits(
    "adapter", "Bottleneck adapters", 1e-4,
    "bottleneck adapters are dense layers in the residual path, trained like a small network", peft=False))
register_method(MethodTraits(
    "dpo", "DPO (LoRA)", 5e-6,
    "DPO pulls the policy away from its reference; small steps keep it from collapsing (the Zephyr DPO recipe's rate)",
    lora_family=True, can_merge=True, can_pack=False, preference=True, paired=True))
register_method(MethodTraits(
    "kto", "KTO (LoRA)", 5e-6,
    "KTO pulls the policy away from its reference like DPO; the KTO paper and TRL use DPO's small rates",
    lora_family=True, can_merge=True, can_pack=False, preference=True))


def method_traits(name: str) -> MethodTraits:
    """The traits of a method by name; KeyError names the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.") from None


def method_names() -> list[str]:
    return list(METHODS)


def names_where(**wanted) -> tuple[str, ...]:
    """Method names whose traits have all the given values, e.g. names_where(lora_family=True)."""
    return tuple(m.name for m in METHODS.values() if all(getattr(m, k) == v for k, v in wanted.items()))

"""What a fine-tuning method is, and the registry of methods (peft's `register_peft_method` shape).

A method is one `Method` object, registered once by the module that defines it (lora.py, ia3.py, ...). It answers
for itself what the planner, the estimator, training, merge, serving and the job service would otherwise decide by
comparing names: its traits (the fields below), its peft config and wrapping, which training schemas it trains on,
its trainable parameters and extra memory terms, its plan settings and reasons, how it merges and how it is served.

Pure Python at import time (the web process reads it): torch and peft are imported inside the methods that need
them. The estimator's hooks take autotune's ModelShape and Setup as plain objects (finetune never imports autotune).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import TrainingError

AUTO = "auto"  # a planner choice, not a method: the planner picks among the methods with an auto_order
FP32 = 4  # bytes per element: peft keeps its adapters in fp32 whatever the base dtype
PLAIN_SCHEMAS = ("chat", "text")  # next-token examples (finetune.data.registry.TRAINING_SCHEMAS)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    learning_rate: float  # the default peak learning rate for this method
    learning_rate_why: str
    lora_family: bool = False  # low-rank weight deltas (rank, alpha, target modules apply)
    quantized_base: bool = False  # the frozen base is loaded in 4-bit NF4
    can_merge: bool = False  # folds into the base weights (a merged model needs no adapter at serving time)
    can_pack: bool = True  # packing and the fused output-layer loss apply (plain next-token loss on labels)
    virtual_tokens: bool = False  # learns virtual-token vectors (num_virtual_tokens applies)
    # Trains on preference data with its own loss() on full logits, summed per pair or answer and validated by
    # reward accuracy; the other methods train on the loop's next-token loss (packing, the fused loss).
    preference: bool = False
    reference_model: bool = False  # its loss compares the policy with a reference: the base, adapter switched off
    paired: bool = False  # each example is a chosen/rejected pair: two sequences (dpo, orpo); kto's are unpaired
    gradient_checkpointing: bool = True  # can recompute activations (prefix tuning's past key values cannot)
    peft: bool = True  # implemented with peft (adapter layers are Tunedeck's own)
    adapts_layers: bool = False  # adapts existing linear layers (target_modules apply)
    schemas: tuple[str, ...] = PLAIN_SCHEMAS  # the training schemas (what a layout yields) it trains on
    auto_for_schemas: tuple[str, ...] = ()  # schemas whose data "auto" trains with this method
    schema_claim: str = ""  # for those schemas, what another method is told ({methods}: the ones that accept it)
    wrong_data: str = ""  # what this method says of data outside its schemas ({layout}: the dataset's layout)
    auto_order: int | None = None  # where "auto" tries it (lowest first); None: only when asked for
    merge_refusal: str = ""  # why it cannot be folded into the base weights ("" when it can, or no reason known)
    adapter_peft_types: tuple[str, ...] = ()  # peft types of a folder without tunedeck.json that mean this method
    serves_as_lora: bool = False  # vLLM and TGI load it, unmerged, as a plain LoRA adapter
    searchable: bool = False  # the search stage tunes its settings (rank, alpha, targets, learning rate)
    search_alternative: bool = False  # the search stage may switch a plan to it
    oom_fallback: str = ""  # the method a CUDA fit check that fails replans to ("": none)

    # ------------------------------------------------------------------ data

    def accepts_schema(self, schema: str) -> bool:
        return schema in self.schemas

    def example_problem(self, example: dict) -> str | None:
        """Why one normalised example cannot train this method (None: it can)."""
        if "label" in example:
            return ("This dataset labels its answers desirable or undesirable (kto_tag/label): train it with method "
                    "kto, or every undesirable answer would be learned as a good one.")
        return None

    def example_fields(self, example: dict) -> dict:
        """What an encoded example keeps from the normalised one besides its tokens."""
        return {}

    # ------------------------------------------------------------------ training

    def peft_config(self, plan: dict):
        """The peft config that implements this method for the plan; None when peft does not implement it."""
        return None  # noqa: RET501  (subclasses return a config)

    def wrap(self, model, plan: dict):
        """Adds the method's trainable parameters to a frozen base; returns the model to train."""
        from peft import get_peft_model

        try:
            return get_peft_model(model, self.peft_config(plan))
        except ValueError as exc:
            raise TrainingError(f"Cannot apply {self.name} to this model: {exc}") from None

    def loss(self, model, batch: list[dict], spec, pad_id: int, device):
        """A preference method's loss on a micro-batch: (summed loss, items it sums over, tokens, metrics with
        reward_accuracy). Training, validation and the fit check call it for every method whose `preference` is
        true; the others train on the next-token loss, which the loop runs itself."""
        raise TrainingError(f"{self.label} trains on the next-token loss; it has no loss of its own.")

    def plan_fields(self) -> dict[str, type]:
        """The method's own plan fields and their types (a preference method's beta): what a user may override."""
        return {}

    def plan_field_labels(self) -> dict[str, str]:
        """How pages name the method's own plan fields ("DPO beta")."""
        return {}

    def save(self, model, out_dir) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)

    def describes_config(self, config: dict) -> bool:
        """Whether a bare adapter_config.json of one of its adapter_peft_types is this method."""
        return True

    # ------------------------------------------------------------------ the estimator (autotune/estimate.py)

    def trainable_parameters(self, shape, setup) -> int:
        return 0

    def adapted_modules(self, shape, setup) -> list:
        """The block's linear layers the method puts an adapter on."""
        return []

    def trainable_bytes(self, compute_bytes: int) -> int:
        """Bytes per trainable parameter."""
        return FP32

    def input_tokens(self, setup) -> int:
        """Virtual tokens put in front of every sequence's inputs."""
        return 0

    def prefix_tokens(self, setup) -> int:
        """Virtual keys and values every attention layer sees before the sequence's own."""
        return 0

    def activation_bytes_per_token(self, shape, setup) -> float:
        """What the method's own modules keep for backward, per token per layer."""
        return 0.0

    def backward_bytes_per_token(self, shape, setup, block: float) -> float:
        """A block's backward working set per token, given the base block's."""
        return block

    def weight_temporaries(self, shape, setup) -> float:
        """Weight-sized tensors the method creates in flight in one layer."""
        return 0.0

    # ------------------------------------------------------------------ the planner (autotune/select.py)

    def target_module_names(self, shape, requested) -> list[str]:
        return []

    def plan_settings(self, base: dict) -> dict:
        """The method's own plan fields, from the planner's base plan."""
        return {}

    def modules_reason(self, shape, names: str, count: int) -> str:
        return f"Target modules: none, {self.label} adds its own parameters instead of adapting layers."


# ---------------------------------------------------------------------------------------------- the registry

METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS or method.name == AUTO:
        raise ValueError(f"A method named {method.name!r} is already registered.")
    METHODS[method.name] = method
    return method


def get_method(name) -> Method:
    """The method of that name; unknown names get a TrainingError (a ValueError) naming the known ones."""
    method = find_method(name)
    if method is None:
        raise TrainingError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    return method


def find_method(name) -> Method | None:
    """The method of that name (any case), or None: adapters from elsewhere may name methods Tunedeck lacks."""
    return METHODS.get(str(name or "").strip().lower())


def method_names() -> list[str]:
    return list(METHODS)


def methods_where(**traits) -> tuple[Method, ...]:
    """The methods whose traits have all the given values, e.g. methods_where(lora_family=True)."""
    for key in traits:
        if key not in Method.__dataclass_fields__:
            raise TypeError(f"Methods have no trait {key!r}.")
    return tuple(m for m in METHODS.values() if all(getattr(m, k) == v for k, v in traits.items()))


def names_where(**traits) -> tuple[str, ...]:
    return tuple(m.name for m in methods_where(**traits))


def method_plan_fields() -> dict[str, type]:
    """Every method's own plan fields (dpo_beta, kto_beta, ...) and their types."""
    return {name: kind for m in METHODS.values() for name, kind in m.plan_fields().items()}


def method_plan_field_labels() -> dict[str, str]:
    return {name: text for m in METHODS.values() for name, text in m.plan_field_labels().items()}


def auto_methods(device: str = "cuda") -> list[Method]:
    """What "auto" tries, in order; on the CPU only methods whose base stays unquantised."""
    chosen = [m for m in METHODS.values() if m.auto_order is not None]
    if device == "cpu":
        chosen = [m for m in chosen if not m.quantized_base]
    return sorted(chosen, key=lambda m: m.auto_order)


def auto_method_for_schema(schema: str) -> str:
    """What "auto" trains a dataset of this schema with: its own method (dpo for preference data), else auto."""
    return next((m.name for m in METHODS.values() if schema in m.auto_for_schemas), AUTO)


def schema_problem(name: str, schema: str, layout: str) -> str | None:
    """Why method `name` cannot train a dataset of this training schema (None: it can, or auto decides).
    The method speaks first (DPO needs pairs); then the schema's own method (a KTO dataset trains with kto)."""
    if name == AUTO:
        return None
    method = get_method(name)
    if method.accepts_schema(schema):
        return None
    if method.wrong_data:
        return method.wrong_data.format(layout=layout)
    owner = next((m for m in METHODS.values() if schema in m.auto_for_schemas and m.schema_claim), None)
    accepting = " or ".join(m.name for m in METHODS.values() if m.accepts_schema(schema))
    if owner is not None:
        return owner.schema_claim.format(methods=accepting)
    return f"{method.label} cannot train on {layout} data; choose auto or {accepting or 'another dataset'}."


def merge_problem(name: str, peft_type: str) -> str | None:
    """Why an adapter (its method's name and its folder's peft type) cannot be merged, or None."""
    claimed = method_for_peft_type(peft_type)
    method = find_method(name)
    refusing = next((m for m in (claimed, method) if m is not None and m.merge_refusal), None)
    if refusing is not None:
        return (f"A {name} adapter cannot be merged: {refusing.merge_refusal}. Deploy it unmerged instead "
                "(base model + adapter).")
    if method is None or not method.can_merge:
        mergeable = sorted(names_where(can_merge=True))
        return (f"Merging {name!r} adapters is not supported (mergeable: {', '.join(mergeable)}); deploy it "
                "unmerged instead.")
    return None


def method_for_peft_type(peft_type: str, config: dict | None = None) -> Method | None:
    """The method a bare adapter folder (no tunedeck.json) is, from its peft type and adapter_config.json."""
    config = config or {}
    for method in METHODS.values():
        if peft_type in method.adapter_peft_types and method.describes_config(config):
            return method
    return None

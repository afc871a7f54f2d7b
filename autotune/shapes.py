"""The shape of a decoder-only transformer, read from its Hugging Face config.json dict alone.

`ModelShape.from_config(config)` knows the layouts of the families Tunedeck plans for:

- llama, mistral, qwen2, gemma, gemma2 (and the generic fallback): separate q/k/v/o projections with grouped-query
  attention (k and v have num_key_value_heads * head_dim outputs), a gated MLP (gate_proj, up_proj -> down_proj)
  and RMSNorm. Qwen2 adds q/k/v biases; Gemma2 has four norms per layer and soft-capped attention logits.
- phi3: fused qkv_proj and gate_up_proj.
- gpt2: fused c_attn (q, k, v), c_proj (attention and MLP output share the name), c_fc, learned position
  embeddings, LayerNorm with biases, every linear layer with a bias, and a tied lm_head.

Everything else falls back to the Llama layout read from the usual field names, which is how most current
decoder-only models are built; a config without the fields the layout needs raises ValueError naming the field.
Counts are exact for the listed families (they match the published parameter counts), so the memory estimate
can start from bytes per parameter rather than from a model download.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REFERENCE_CONFIG_DIR = Path(__file__).parent / "configs"

LLAMA_LIKE = ("llama", "mistral", "qwen2", "gemma", "gemma2")
SUPPORTED_FAMILIES = (*LLAMA_LIKE, "phi3", "gpt2")


OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "c_proj")  # the last linear layer of a sublayer, in every layout


@dataclass(frozen=True)
class LinearModule:
    """One linear layer inside a decoder block, as peft sees it."""

    name: str  # the attribute name peft's target_modules matches, e.g. "q_proj"
    path: str  # the path inside the block, e.g. "self_attn.q_proj"; tells GPT-2's two c_proj apart
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def parameters(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    @property
    def in_attention(self) -> bool:
        return self.path.startswith(("self_attn.", "attn."))

    @property
    def reads(self) -> str:
        """The tensor this layer reads: the layers that open a sublayer share its norm's output; an output
        projection reads what its sublayer computed."""
        sublayer = "attention" if self.in_attention else "mlp"
        return f"{sublayer} {'output' if self.name in OUTPUT_PROJECTIONS else 'input'}"

    def matches(self, target: str) -> bool:
        """peft matches a target against the module name or the tail of its dotted path."""
        return target == self.name or self.path == target or self.path.endswith("." + target)


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    family: str  # the layout used: one of SUPPORTED_FAMILIES, or "generic"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    linear_modules: tuple[LinearModule, ...]  # the linear layers of one decoder block
    norm_kind: str = "rms"  # "rms" (weight only) or "layer" (weight and bias)
    norms_per_layer: int = 2
    position_embeddings: int = 0  # learned absolute positions (GPT-2)
    gated_mlp: bool = True
    # Intermediate-size tensors the MLP keeps for backward in stock transformers: a fused SiLU/GELU keeps its
    # input, the gate's output and the up projection (3); GPT-2's Python gelu_new keeps four.
    mlp_saved_tensors: int = 3
    residual_dropouts: int = 0  # dropout layers with p > 0 per block; each keeps a 1-byte mask per element
    attention_dropout: bool = False  # dropout on the attention probabilities in training
    default_attention: str = "sdpa"  # what transformers picks without flash-attn: "sdpa" or "eager"
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    ia3_target_modules: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    ia3_feedforward_modules: tuple[str, ...] = ("down_proj",)

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        if not isinstance(config, dict):
            raise ValueError(f"model config must be the dict of a config.json, not {type(config).__name__}")
        config = _text_config(config)
        model_type = str(config.get("model_type") or "").lower()
        reader = {"gpt2": _read_gpt2, "phi3": _read_phi3}.get(model_type, _read_llama_like)
        return reader(config, model_type)

    # ---------------------------------------------------------------- derived sizes

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def linear_module_names(self) -> list[str]:
        """The distinct peft target names of the block's linear layers, in forward order."""
        return list(dict.fromkeys(m.name for m in self.linear_modules))

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size + self.position_embeddings

    @property
    def lm_head_parameters(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def norm_parameters_each(self) -> int:
        return self.hidden_size * (2 if self.norm_kind == "layer" else 1)

    @property
    def layer_linear_parameters(self) -> int:
        return sum(m.parameters for m in self.linear_modules)

    @property
    def layer_norm_parameters(self) -> int:
        return self.norms_per_layer * self.norm_parameters_each

    @property
    def layer_parameters(self) -> int:
        return self.layer_linear_parameters + self.layer_norm_parameters

    @property
    def linear_parameters(self) -> int:
        """All decoder-block linear weights and biases: what QLoRA quantises."""
        return self.num_layers * self.layer_linear_parameters

    @property
    def parameters(self) -> int:
        return (
            self.embedding_parameters
            + self.num_layers * self.layer_parameters
            + self.norm_parameters_each  # the final norm
            + self.lm_head_parameters
        )

    def component_parameters(self) -> dict[str, int]:
        """Parameter counts per component, summing to `parameters`."""
        attention = sum(m.parameters for m in self.linear_modules if m.in_attention)
        return {
            "embeddings": self.embedding_parameters,
            "attention": self.num_layers * attention,
            "mlp": self.num_layers * (self.layer_linear_parameters - attention),
            "norms": self.num_layers * self.layer_norm_parameters + self.norm_parameters_each,
            "lm_head": self.lm_head_parameters,
        }

    def modules_for(self, target_modules) -> list[LinearModule]:
        """The block's linear layers a peft `target_modules` value selects ("all-linear", a name, or a list)."""
        if target_modules in (None, "all-linear", "all_linear", ["all-linear"]):
            return list(self.linear_modules)
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        unknown = [t for t in targets if not any(m.matches(t) for m in self.linear_modules)]
        if unknown:
            raise ValueError(
                f"target_modules {unknown} are not linear layers of a {self.family} block; "
                f"choose from {', '.join(self.linear_module_names)}"
            )
        return [m for m in self.linear_modules if any(m.matches(t) for t in targets)]


# -------------------------------------------------------------------- readers


def _text_config(config: dict) -> dict:
    """Multimodal wrappers keep the language model's fields in text_config."""
    if "text_config" in config and "hidden_size" not in config and "n_embd" not in config:
        inner = dict(config["text_config"])
        inner.setdefault("model_type", config.get("model_type", ""))
        inner.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", True))
        return inner
    return config


def _require(config: dict, *names: str, family: str) -> int:
    """The first of `names` present in the config, as a positive int."""
    for name in names:
        value = config.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"config field {name!r} must be a positive number, not {value!r}")
            return int(value)
    raise ValueError(f"config.json has no {names[0]!r}, which a {family} model needs")


def _read_llama_like(config: dict, model_type: str) -> ModelShape:
    family = model_type if model_type in LLAMA_LIKE else "generic"
    hidden = _require(config, "hidden_size", family=family)
    layers = _require(config, "num_hidden_layers", family=family)
    heads = _require(config, "num_attention_heads", family=family)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    intermediate = _require(config, "intermediate_size", family=family)
    vocab = _require(config, "vocab_size", family=family)
    qkv_bias = bool(config.get("attention_bias", False)) or family == "qwen2"
    o_bias = bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    modules = (
        LinearModule("q_proj", "self_attn.q_proj", hidden, q_dim, qkv_bias),
        LinearModule("k_proj", "self_attn.k_proj", hidden, kv_dim, qkv_bias),
        LinearModule("v_proj", "self_attn.v_proj", hidden, kv_dim, qkv_bias),
        LinearModule("o_proj", "self_attn.o_proj", q_dim, hidden, o_bias),
        LinearModule("gate_proj", "mlp.gate_proj", hidden, intermediate, mlp_bias),
        LinearModule("up_proj", "mlp.up_proj", hidden, intermediate, mlp_bias),
        LinearModule("down_proj", "mlp.down_proj", intermediate, hidden, mlp_bias),
    )
    softcap = config.get("attn_logit_softcapping") if family == "gemma2" else None
    return ModelShape(
        model_type=model_type or "unknown",
        family=family,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=vocab,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", family in ("gemma", "gemma2"))),
        max_position_embeddings=_optional_int(config.get("max_position_embeddings")),
        linear_modules=modules,
        norms_per_layer=4 if family == "gemma2" else 2,
        # transformers has no SDPA path for soft-capped attention, so Gemma2 trains with eager attention
        default_attention="eager" if softcap else "sdpa",
        attention_dropout=float(config.get("attention_dropout") or 0) > 0,
        attn_logit_softcapping=softcap,
        final_logit_softcapping=config.get("final_logit_softcapping"),
        # peft's own IA3 defaults for these families
        ia3_target_modules=("q_proj", "v_proj", "down_proj") if family in ("gemma", "gemma2", "qwen2")
        else ("k_proj", "v_proj", "down_proj"),
    )


def _read_phi3(config: dict, model_type: str) -> ModelShape:
    hidden = _require(config, "hidden_size", family="phi3")
    heads = _require(config, "num_attention_heads", family="phi3")
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    intermediate = _require(config, "intermediate_size", family="phi3")
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    modules = (
        LinearModule("qkv_proj", "self_attn.qkv_proj", hidden, q_dim + 2 * kv_dim),
        LinearModule("o_proj", "self_attn.o_proj", q_dim, hidden),
        LinearModule("gate_up_proj", "mlp.gate_up_proj", hidden, 2 * intermediate),
        LinearModule("down_proj", "mlp.down_proj", intermediate, hidden),
    )
    return ModelShape(
        model_type="phi3",
        family="phi3",
        hidden_size=hidden,
        num_layers=_require(config, "num_hidden_layers", family="phi3"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=_require(config, "vocab_size", family="phi3"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=_optional_int(config.get("max_position_embeddings")),
        linear_modules=modules,
        residual_dropouts=2 if float(config.get("resid_pdrop") or 0) > 0 else 0,
        attention_dropout=float(config.get("attention_dropout") or 0) > 0,
        ia3_target_modules=("qkv_proj", "down_proj"),
        ia3_feedforward_modules=("down_proj",),
    )


def _read_gpt2(config: dict, model_type: str) -> ModelShape:
    hidden = _require(config, "n_embd", "hidden_size", family="gpt2")
    heads = _require(config, "n_head", "num_attention_heads", family="gpt2")
    inner = int(config.get("n_inner") or 4 * hidden)
    positions = _require(config, "n_positions", "max_position_embeddings", family="gpt2")
    modules = (
        LinearModule("c_attn", "attn.c_attn", hidden, 3 * hidden, True),
        LinearModule("c_proj", "attn.c_proj", hidden, hidden, True),
        LinearModule("c_fc", "mlp.c_fc", hidden, inner, True),
        LinearModule("c_proj", "mlp.c_proj", inner, hidden, True),
    )
    activation = str(config.get("activation_function", "gelu_new"))
    return ModelShape(
        model_type="gpt2",
        family="gpt2",
        hidden_size=hidden,
        num_layers=_require(config, "n_layer", "num_hidden_layers", family="gpt2"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=inner,
        vocab_size=_require(config, "vocab_size", family="gpt2"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        max_position_embeddings=positions,
        linear_modules=modules,
        norm_kind="layer",
        position_embeddings=positions * hidden,
        gated_mlp=False,
        mlp_saved_tensors=4 if activation == "gelu_new" else 1,
        residual_dropouts=2 if float(config.get("resid_pdrop", 0.1) or 0) > 0 else 0,
        attention_dropout=float(config.get("attn_pdrop", 0.1) or 0) > 0,
        ia3_target_modules=("c_attn", "mlp.c_proj"),
        ia3_feedforward_modules=("mlp.c_proj",),
    )


def _optional_int(value) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


# -------------------------------------------------------------------- reference configs


def reference_config_names() -> list[str]:
    return sorted(p.stem for p in REFERENCE_CONFIG_DIR.glob("*.json"))


def load_reference_config(name: str) -> dict:
    """A hand-written config.json of a reference model in autotune/configs, e.g. "Llama-3.1-8B"."""
    path = REFERENCE_CONFIG_DIR / f"{name}.json"
    if not path.exists():
        raise ValueError(f"no reference config {name!r}; have {', '.join(reference_config_names())}")
    return json.loads(path.read_text())

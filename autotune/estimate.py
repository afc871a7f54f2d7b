"""Peak training memory of a plan, predicted from the model's config.json alone.

    estimate(model_config, plan, calibration=None) -> {"total_bytes": int, "breakdown": {name: int}}

The peak of a parameter-efficient training step comes at the start of backward: the frozen weights, the adapter
and its optimizer state, every tensor autograd saved during forward, and the loss's vocabulary-sized buffers are
all alive at once. Each term below is that peak's share, in bytes (a = bytes per element of the compute dtype:
2 for bf16/fp16, 4 for fp32; T = tokens in a micro-batch = sequences x max_seq_len; L = layers; h = hidden size;
I = intermediate size; V = vocabulary).

weights       The frozen base in the compute dtype: parameters x a. QLoRA stores the decoder-block linear layers
              as NF4, 0.5 byte per parameter, plus one absmax per 64 weights: fp32 (4/64 byte per parameter), or
              with double quantisation (the default) an 8-bit absmax plus one fp32 constant per 256 absmax
              (1/64 + 4/(64*256)). Embeddings, lm_head and norms stay in the compute dtype (training must not
              upcast them to fp32 the way peft's prepare_model_for_kbit_training does: that adds 2 bytes per
              non-quantised parameter, about 2 GB on Llama-3-8B).
trainable     Adapter parameters: peft keeps its adapters in fp32 (4 bytes) whatever the base dtype; the bottleneck
              adapters (finetune/methods/bottleneck.py) are created in the base's dtype (a bytes).
gradients     One gradient per trainable parameter, in the parameter's dtype.
optimizer     The plan's `optimizer` (OPTIMIZERS below), per trainable parameter:
                adamw, adamw_fused  torch.optim.AdamW: two moments in the parameter's dtype (2 x 4 bytes for fp32
                                    adapters). Fused changes speed, not memory.
                paged_adamw         bitsandbytes PagedAdamW: two fp32 moments (8 bytes) in CUDA unified memory.
                paged_adamw_8bit    bitsandbytes PagedAdamW8bit: two uint8 moments plus one fp32 absmax per 256
                                    values of each (2 + 2 x 4/256 bytes). Tensors under 4,096 elements keep fp32
                                    moments (bitsandbytes' min_8bit_size); LoRA matrices of real models are larger.
              Paged state is allocated with cudaMallocManaged, outside PyTorch's caching allocator: the driver moves
              it to host RAM when the GPU runs short and back when the optimizer step touches it. It is therefore
              not part of the peak that must fit (breakdown "optimizer" is 0); the estimate reports it as
              "evictable_bytes", which must fit in host RAM instead.
activations   What autograd keeps for backward, counted per token per layer for a stock transformers block with
              SDPA (flash or memory-efficient kernels: no seq x seq scores). PyTorch saves a tensor only when a
              gradient needs it, so the frozen linear layers keep nothing; what is kept:
                RMSNorm         the fp32 upcast of its input: 4h per norm (Liger's fused norm: a*h)
                attention       q, k, v, the output, and the fp32 log-sum-exp: a*(2*q_dim + 2*kv) + 4*heads,
                                where kv is q_dim when k and v are repeated to every head (eager attention, or
                                SDPA given a mask) and the grouped kv_dim otherwise (flash-attention; SDPA
                                without a mask, which transformers gives it for unpadded rows)
                MLP             gate output, activation output, up output: 3*a*I (Liger SwiGLU: 2*a*I;
                                GPT-2's Python gelu_new: 4*a*I)
                LoRA            peft casts each adapted layer's input to fp32 for lora_A: 4*in_features per
                                adapted layer, plus the dropout mask when dropout > 0 (1 byte per element on
                                CUDA's fused dropout, 4 on CPU), plus 4*rank for lora_B. In fp32 without
                                dropout the cast is a no-op: the layers that read one tensor keep it once,
                                and the attention's output projection keeps a view of what SDPA keeps
                DoRA            adds the base output and the fp32 LoRA output per adapted layer: (a + 4)*out
                IA3             on key/value layers the base output (a*out); on feed-forward layers peft casts
                                the input to the vector's fp32 and keeps that copy (4*in)
                adapter         bottleneck adapters after attention and MLP: input and two bottleneck tensors, a bytes
              plus per sequence per layer the mask SDPA turns into a compute-dtype bias, a*seq*(seq+prefix),
              assumed when a micro-batch has several rows (padded to the longest) without packing,
              and always with prefix tuning, whose keys and values are concatenated to the sequence's
              (2*a*q_dim per virtual token); and for eager attention (Gemma2's soft-capped logits) the fp32
              softmax, the probabilities and the tanh output: heads*seq*(4 + 2a) per token. On the CPU, SDPA
              with attention dropout (GPT-2) runs its math kernel instead: fp32 copies of q, k and v and the fp32
              softmax, dropout mask and dropped probabilities, 3*4*(q_dim + heads*seq) per token. Without gradient
              checkpointing that is L layers' worth, less what the first block keeps for nothing: autograd
              saves nothing before the first trained module, so its input norm (and, when no attention module
              trains, as with bottleneck adapters, its attention) keeps nothing, unless prompt tuning's
              virtual tokens come in front. With checkpointing, one saved hidden state per layer (a*h*L). On
              top: what backward adds beyond the saved tensors, the larger of the final norm's backward
              (transformers' RMSNorm works in fp32: 5 copies of the hidden state, 20h) and a block's: the
              gradients of the hidden state and the widest intermediates, a*(2h + 2I), plus LoRA's fp32
              gradient of lora_A's input (4*max in_features) less the MLP output projection's fp32 input copy,
              which its backward releases first; for IA3 the fp32 gradient of the scaled feed-forward input,
              its product with the vector and with the input (3 x 4*in, beside a*h), when larger; QLoRA's
              dequantised copy of the largest linear weight (out x in x a); DoRA's weight-norm temporaries for
              the largest adapted layer (an fp32 identity in x in, the fp32 LoRA product and the fp32 weight
              and sum: 4*in^2 + 16*in*out); and with checkpointing the recomputed layer in full. The loss's
              buffers are freed before the first block runs backward (and the blocks' forward temporaries come
              before the loss exists), so a block's share counts only beyond `logits`.
logits        Forward ends with the lm_head output over every position (a per element) and, for the labelled
              positions, its shifted copy, the fp32 upcast and its log-softmax (a + 8); backward starts with
              the log-softmax, its gradient and the gradient of its input (12): the larger counts, 12 bytes
              per element in bf16 and fp32 alike. A 128k vocabulary at 8 x 2048 tokens spends 25 GB here.
              Gemma2's final soft-capping keeps one more a-byte copy. With the fused linear cross-entropy
              (finetune/fastloss.py) the logits exist only a chunk at a time: `fused_loss_chunk_rows` rows
              (Liger's ceil(V/h) chunks rounded to a power of two, at least 256 rows, at most 256 MiB of fp32
              logits, never more than the labelled rows), each chunk alive as its fp32 logits and their
              fp32 log-softmax: rows x V x 8 bytes; plus the labelled hidden states picked out of the body's
              output and their gradient, kept for backward (2 x T x h x a). DPO runs chosen and rejected (2
              sequences per pair); DPO and KTO take log-probabilities from full logits whatever the plan says,
              and their reference forward (no gradients) peaks at its fp32 logits and log-softmax beside the
              policy's kept log-softmax: 12 bytes per element, within the policy's buffers.
cuda_context  The CUDA context, cuBLAS handles and kernels that never pass through the caching allocator: about
              500 MiB on CUDA, nothing on CPU.
allocator_headroom  The caching allocator's fragmentation: 7% of what is allocated and freed every step
              (activations, logits, gradients, optimizer state).

The per-layer activation counts were checked against what autograd actually saves (saved_tensors_hooks on a
bf16 model with peft LoRA, tests/autotune/test_estimate_against_autograd.py): within 2-8%, never under; and
the whole step (activations + logits + gradients) against every tensor one forward and backward through
finetune's loss path allocates on the CPU, for every method at three shapes
(tests/autotune/test_estimate_against_allocation.py): within 0.99-1.10, over where the test's rows are
unpadded. Every constant is named below. A GPU calibration run (bench/memory_estimate.py) compares predictions
with torch.cuda.max_memory_reserved; its corrections come back through `calibration`, e.g.
{"activation_scale": 1.07, "logits_scale": 0.95}, without touching the formula.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.fastloss import chunk_rows_for as fused_loss_chunk_rows  # the fused loss's own chunk rule
from finetune.methods import get_method, method_names
from finetune.methods.bottleneck import DEFAULT_BOTTLENECK as DEFAULT_ADAPTER_BOTTLENECK
from finetune.methods.lora import DEFAULT_DROPOUT as DEFAULT_LORA_DROPOUT
from finetune.methods.lora import DEFAULT_RANK
from finetune.methods.virtual_tokens import DEFAULT_NUM_VIRTUAL_TOKENS
from finetune.optim import ADAM_STATES, OPTIMIZERS, default_optimizer

from .shapes import LinearModule, ModelShape

GIB = 1024**3
MIB = 1024**2

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
FP32 = 4

NF4_BYTES_PER_PARAM = 0.5
QUANT_BLOCKSIZE = 64  # weights per absmax
DOUBLE_QUANT_BLOCKSIZE = 256  # absmax per second-level fp32 constant

RMSNORM_BACKWARD_FP32_COPIES = 5  # hidden-state-sized fp32 temporaries of transformers' RMSNorm backward
SDPA_MATH_FP32_COPIES = 3  # q, k, v and softmax, mask, dropped probabilities in SDPA's math kernel (CPU dropout)
LOSS_FP32_BUFFERS = 3  # log-softmax output, its gradient, the gradient of its input
DROPOUT_MASK_BYTES = 1  # CUDA's fused dropout keeps a bool mask; CPU keeps a mask in the input's dtype
CUDA_CONTEXT_BYTES = 500 * MIB
ALLOCATOR_HEADROOM_FRACTION = 0.07

METHODS = tuple(method_names())

CALIBRATION_KEYS = {
    "weights_scale": "multiplies weights",
    "state_scale": "multiplies trainable, gradients and optimizer",
    "activation_scale": "multiplies activations",
    "logits_scale": "multiplies logits",
    "cuda_context_bytes": "replaces the CUDA context size",
    "allocator_headroom_fraction": "replaces the fragmentation margin's fraction",
}


@dataclass(frozen=True)
class Setup:
    """The plan fields that decide memory, with defaults filled in and checked."""

    method: str = "lora"
    rank: int = DEFAULT_RANK
    target_modules: object = "all-linear"
    micro_batch: int = 1
    max_seq_len: int = 512
    gradient_checkpointing: bool = False
    dtype: str = "bf16"
    device: str = "cuda"
    dropout: float = DEFAULT_LORA_DROPOUT
    num_virtual_tokens: int = DEFAULT_NUM_VIRTUAL_TOKENS
    adapter_bottleneck: int = DEFAULT_ADAPTER_BOTTLENECK
    double_quant: bool = True
    fused_cross_entropy: bool = False
    liger: bool = False
    packing: bool = False
    attn_implementation: str | None = None  # None: what transformers picks for the architecture
    optimizer: str | None = None  # None: adamw_fused on CUDA, adamw on the CPU

    @classmethod
    def from_plan(cls, plan: dict) -> "Setup":
        fields = {k: plan[k] for k in cls.__dataclass_fields__ if plan.get(k) is not None}
        device = str(fields.get("device", "cuda")).lower()
        fields["device"] = "cpu" if device == "cpu" else "cuda"
        dtype = str(fields.get("dtype", "auto")).lower()
        fields["dtype"] = dtype if dtype in DTYPE_BYTES else ("fp32" if fields["device"] == "cpu" else "bf16")
        fields["method"] = str(fields.get("method", "lora")).lower()
        optimizer = str(fields.get("optimizer") or default_optimizer(fields["device"])).lower()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if OPTIMIZERS[optimizer][1] and fields["device"] == "cpu":
            raise ValueError(f"optimizer {optimizer!r} pages through CUDA unified memory and needs a GPU")
        fields["optimizer"] = optimizer
        if fields["method"] not in METHODS:
            raise ValueError(f"unknown method {fields['method']!r}; choose one of {', '.join(METHODS)}")
        for name in ("rank", "micro_batch", "max_seq_len", "num_virtual_tokens", "adapter_bottleneck"):
            if name in fields and (isinstance(fields[name], bool) or int(fields[name]) < 1):
                raise ValueError(f"plan field {name!r} must be a positive integer, not {fields[name]!r}")
        return cls(**fields)

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def trainable_bytes(self) -> int:
        """Bytes per trainable parameter: bottleneck adapters follow the base dtype, peft's adapters are fp32."""
        return get_method(self.method).trainable_bytes(self.compute_bytes)

    @property
    def sequences(self) -> int:
        """Sequences per micro-batch: DPO runs the chosen and the rejected answer of every pair."""
        return self.micro_batch * (2 if get_method(self.method).paired else 1)

    @property
    def tokens_per_sequence(self) -> int:
        """Prompt tuning prepends its virtual tokens to every sequence."""
        return self.max_seq_len + get_method(self.method).input_tokens(self)

    @property
    def tokens(self) -> int:
        return self.sequences * self.tokens_per_sequence


# ------------------------------------------------------------------------ public


def estimate(model_config, plan: dict, calibration: dict | None = None) -> dict:
    """Predicted peak memory of one training step: {"total_bytes", "breakdown"} (see the module docstring)."""
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    setup = Setup.from_plan(plan or {})
    scale = _calibration(calibration)
    trainable = trainable_parameters(shape, plan or {})
    state = optimizer_state_bytes(trainable, setup) * scale["state_scale"]
    paged = OPTIMIZERS[setup.optimizer][1]
    breakdown = {
        "weights": weight_bytes(shape, setup) * scale["weights_scale"],
        "trainable": trainable * setup.trainable_bytes * scale["state_scale"],
        "gradients": trainable * setup.trainable_bytes * scale["state_scale"],
        "optimizer": 0 if paged else state,
        "activations": activation_bytes(shape, setup) * scale["activation_scale"],
        "logits": logits_bytes(shape, setup) * scale["logits_scale"],
        "cuda_context": scale["cuda_context_bytes"] if setup.device == "cuda" else 0,
    }
    dynamic = sum(breakdown[k] for k in ("activations", "logits", "gradients", "optimizer"))
    breakdown["allocator_headroom"] = dynamic * scale["allocator_headroom_fraction"]
    breakdown = {name: int(math.ceil(value)) for name, value in breakdown.items()}
    return {"total_bytes": sum(breakdown.values()), "breakdown": breakdown,
            "evictable_bytes": int(math.ceil(state)) if paged else 0}


def optimizer_state_bytes(trainable: int, setup: Setup) -> float:
    per_parameter = OPTIMIZERS[setup.optimizer][0]
    return trainable * (per_parameter if per_parameter is not None else ADAM_STATES * setup.trainable_bytes)


def trainable_parameters(model_config, plan: dict) -> int:
    """Parameters the method trains (what peft's print_trainable_parameters reports)."""
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    setup = plan if isinstance(plan, Setup) else Setup.from_plan(plan or {})
    return get_method(setup.method).trainable_parameters(shape, setup)


def adapted_modules(shape: ModelShape, setup: Setup) -> list[LinearModule]:
    """The block's linear layers the method puts an adapter on."""
    return get_method(setup.method).adapted_modules(shape, setup)


# ------------------------------------------------------------------------ weights


def weight_bytes(shape: ModelShape, setup: Setup) -> float:
    a = setup.compute_bytes
    if not get_method(setup.method).quantized_base:
        return shape.parameters * a
    quantised = shape.linear_parameters
    return quantised * nf4_bytes_per_parameter(setup.double_quant) + (shape.parameters - quantised) * a


def nf4_bytes_per_parameter(double_quant: bool = True) -> float:
    if double_quant:
        absmax = 1 / QUANT_BLOCKSIZE + FP32 / (QUANT_BLOCKSIZE * DOUBLE_QUANT_BLOCKSIZE)
    else:
        absmax = FP32 / QUANT_BLOCKSIZE
    return NF4_BYTES_PER_PARAM + absmax


# ------------------------------------------------------------------------ activations


def activation_bytes(shape: ModelShape, setup: Setup) -> float:
    """What forward keeps, plus what backward adds beyond the loss buffers it has freed by then."""
    per_layer = layer_activation_bytes(shape, setup)
    block = setup.tokens * _block_backward_bytes_per_token(shape, setup) + _weight_temporaries(shape, setup)
    if setup.gradient_checkpointing:
        # one saved hidden state per layer; backward recomputes one layer at a time
        stored = shape.num_layers * setup.tokens * setup.compute_bytes * shape.hidden_size
        block += per_layer
    else:
        stored = shape.num_layers * per_layer - _untrained_first_layer_bytes(shape, setup)
    final_norm = setup.tokens * _norm_bytes_per_token(shape, setup)
    # Backward adds, beyond the saved tensors, first the final norm's working set, then each block's; by then
    # the loss's buffers are gone, and what backward adds reuses them.
    in_backward = max(setup.tokens * _norm_backward_bytes_per_token(shape, setup), block)
    beyond_loss = max(0.0, in_backward - logits_bytes(shape, setup))
    return stored + final_norm + beyond_loss


def layer_activation_bytes(shape: ModelShape, setup: Setup) -> float:
    """Bytes one decoder block keeps for backward over a whole micro-batch."""
    per_token = (
        shape.norms_per_layer * _norm_bytes_per_token(shape, setup)
        + _attention_bytes_per_token(shape, setup)
        + _mlp_bytes_per_token(shape, setup)
        + shape.residual_dropouts * shape.hidden_size * DROPOUT_MASK_BYTES
        + _adapter_bytes_per_token(shape, setup)
    )
    return per_token * setup.tokens + setup.sequences * _attention_bytes_per_sequence(shape, setup)


def _untrained_first_layer_bytes(shape: ModelShape, setup: Setup) -> float:
    """What the first block does not keep: autograd saves nothing for a sublayer whose input and weights all
    lack a gradient, so before the first trained module (or virtual token) nothing is kept. The first block's
    input norm keeps nothing unless prompt tuning's virtual tokens come in front; its attention keeps nothing
    when no attention module (nor a prefix) trains, as with bottleneck adapters, which sit after it."""
    method = get_method(setup.method)
    if method.input_tokens(setup):
        return 0.0
    skipped = setup.tokens * _norm_bytes_per_token(shape, setup)
    attention_trains = method.prefix_tokens(setup) > 0 or any(m.in_attention for m in adapted_modules(shape, setup))
    if not attention_trains:
        skipped += setup.tokens * _attention_bytes_per_token(shape, setup)
        skipped += setup.sequences * _attention_bytes_per_sequence(shape, setup)
    return skipped


def _uses_liger(shape: ModelShape, setup: Setup) -> bool:
    return setup.liger and shape.family != "gpt2"


def _norm_bytes_per_token(shape: ModelShape, setup: Setup) -> float:
    if shape.norm_kind == "layer":
        return setup.compute_bytes * shape.hidden_size + 2 * FP32  # input, mean and rstd
    if _uses_liger(shape, setup):
        return setup.compute_bytes * shape.hidden_size + FP32  # input and rstd
    return FP32 * shape.hidden_size  # transformers' RMSNorm upcasts its input to fp32 and keeps it


def _attention_implementation(shape: ModelShape, setup: Setup) -> str:
    return setup.attn_implementation or shape.default_attention


def _attention_bytes_per_token(shape: ModelShape, setup: Setup) -> float:
    a = setup.compute_bytes
    q_dim = shape.q_dim
    implementation = _attention_implementation(shape, setup)
    # Eager attention, and SDPA with a mask, repeat k and v to every query head; SDPA without a mask
    # (enable_gqa) and flash-attention take the grouped heads as they are
    repeated = implementation == "eager" or _sdpa_mask(shape, setup)
    kv = q_dim if repeated else shape.kv_dim
    core = a * (2 * q_dim + 2 * kv) + FP32 * shape.num_heads  # q, out, k, v, log-sum-exp
    seq = setup.tokens_per_sequence
    if implementation == "sdpa" and setup.device == "cpu" and shape.attention_dropout:
        # the CPU's SDPA kernel has no dropout: its math fallback keeps fp32 copies of q, k and v, and per head
        # and key the fp32 softmax, the dropout mask and the dropped probabilities (measured on GPT-2)
        return SDPA_MATH_FP32_COPIES * FP32 * (q_dim + shape.num_heads * seq)
    if implementation != "eager":
        return core
    probabilities = shape.num_heads * seq * (FP32 + a)  # fp32 softmax output and its compute-dtype copy
    softcap = shape.num_heads * seq * a if shape.attn_logit_softcapping else 0  # tanh keeps its output
    return core + probabilities + softcap


def _sdpa_mask(shape: ModelShape, setup: Setup) -> bool:
    """Whether SDPA gets a mask: rows padded to the longest (more than one sequence, without packing) or
    prefix tuning's mask over the virtual keys. transformers drops an all-ones mask and uses is_causal."""
    if _attention_implementation(shape, setup) != "sdpa":
        return False
    return get_method(setup.method).prefix_tokens(setup) > 0 or (setup.sequences > 1 and not setup.packing)


def _attention_bytes_per_sequence(shape: ModelShape, setup: Setup) -> float:
    """Per-layer attention costs that grow with the sequence rather than the token."""
    a, seq = setup.compute_bytes, setup.tokens_per_sequence
    prefix = get_method(setup.method).prefix_tokens(setup)
    total = 0.0
    if _sdpa_mask(shape, setup):
        total += a * seq * (seq + prefix)  # SDPA turns the boolean mask into a bias it keeps for backward
    if prefix:
        total += prefix * 2 * a * shape.q_dim  # prefix keys and values concatenated to the sequence's
    return total


def _mlp_bytes_per_token(shape: ModelShape, setup: Setup) -> float:
    saved = shape.mlp_saved_tensors - (1 if _uses_liger(shape, setup) and shape.gated_mlp else 0)
    return saved * setup.compute_bytes * shape.intermediate_size


def _adapter_bytes_per_token(shape: ModelShape, setup: Setup) -> float:
    """What the method's own modules keep (finetune/methods/: LoRA's fp32 inputs, IA3's scaled copies, ...)."""
    return get_method(setup.method).activation_bytes_per_token(shape, setup)


def _norm_backward_bytes_per_token(shape: ModelShape, setup: Setup) -> float:
    """transformers' RMSNorm backward works in fp32: the upcast gradient, its products with the weight and the
    normalised input, and the variance's pow and div (5 fp32 copies of the hidden state, measured). Fused norms
    (LayerNorm, Liger) take the incoming gradient and give the outgoing one."""
    if shape.norm_kind == "layer" or _uses_liger(shape, setup):
        return 2 * setup.compute_bytes * shape.hidden_size
    return RMSNORM_BACKWARD_FP32_COPIES * FP32 * shape.hidden_size


def _block_backward_bytes_per_token(shape: ModelShape, setup: Setup) -> float:
    """The hidden state's gradient and the MLP's widest gradients; for LoRA the fp32 gradient of lora_A's input.
    The MLP's backward starts at its output projection, which releases what it saved (LoRA's fp32 copy of its
    input) before the gate and up gradients form (measured under checkpointing), so that copy is not counted
    twice. For IA3, the fp32 gradient of the scaled feed-forward input, its product with the vector and with
    the input, beside the hidden state's gradient."""
    per_token = setup.compute_bytes * (2 * shape.hidden_size + 2 * shape.intermediate_size)
    return get_method(setup.method).backward_bytes_per_token(shape, setup, per_token)


def _weight_temporaries(shape: ModelShape, setup: Setup) -> float:
    """Weight-sized tensors one layer creates in flight."""
    method = get_method(setup.method)
    total = method.weight_temporaries(shape, setup)  # DoRA's weight-norm temporaries
    if method.quantized_base:
        largest = max(m.in_features * m.out_features for m in shape.linear_modules)
        total += largest * setup.compute_bytes  # bitsandbytes dequantises the weight for each matmul
    return total


# ------------------------------------------------------------------------ logits


def logits_bytes(shape: ModelShape, setup: Setup) -> float:
    a, vocab = setup.compute_bytes, shape.vocab_size
    # dpo and kto take log-probabilities from full logits (finetune/train.py) whatever the plan says
    if setup.fused_cross_entropy and not get_method(setup.method).preference:
        labelled = setup.tokens  # every position may carry a label (full-sequence loss)
        chunk_tokens = min(labelled, fused_loss_chunk_rows(labelled, vocab, shape.hidden_size))
        chunk_bytes_per_element = 2 * FP32  # fp32 logits and their fp32 log-softmax
        return chunk_tokens * vocab * chunk_bytes_per_element + 2 * labelled * shape.hidden_size * a
    # Forward ends with the logits of every position (prompt tuning's virtual tokens too), then the labelled
    # positions' shifted copy, fp32 upcast and log-softmax (a + 8 bytes); backward starts with the log-softmax,
    # its gradient and its input's gradient (12 bytes): whichever is more. Preference methods' reference forward
    # peaks at its own fp32 logits and log-softmax beside the policy's kept log-softmax, no more than that.
    labelled = setup.sequences * setup.max_seq_len
    softcap = a * setup.tokens if shape.final_logit_softcapping else 0  # the soft-capped copy
    at_forward_end = a * setup.tokens + (a + 2 * FP32) * labelled
    return vocab * (max(at_forward_end, LOSS_FP32_BUFFERS * FP32 * labelled) + softcap)


# ------------------------------------------------------------------------ calibration


def _calibration(calibration: dict | None) -> dict:
    values = {
        "weights_scale": 1.0,
        "state_scale": 1.0,
        "activation_scale": 1.0,
        "logits_scale": 1.0,
        "cuda_context_bytes": CUDA_CONTEXT_BYTES,
        "allocator_headroom_fraction": ALLOCATOR_HEADROOM_FRACTION,
    }
    for key, value in (calibration or {}).items():
        if key not in values:
            raise ValueError(f"unknown calibration key {key!r}; known: {', '.join(CALIBRATION_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"calibration {key!r} must be a non-negative number, not {value!r}")
        values[key] = float(value)
    return values

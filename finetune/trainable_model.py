"""The base model made ready to train: loaded (4-bit for QLoRA), fused kernels patched in, wrapped for the method
with only its parameters trainable, dtypes settled, in train mode.

    model, tokenizer = load_for_training(spec)
"""
from __future__ import annotations

from . import cpudropout, fastloss, fourbit
from .chat_templates import apply_chat_template_choice
from .errors import TrainingError
from .methods import get_method, wrap_for_training
from .trainspec import TrainSpec


def load_for_training(spec: TrainSpec):
    """Base model (4-bit for QLoRA) wrapped for the method, in train mode, with the method's parameters trainable."""
    import torch

    from .modelstore import load_model_and_tokenizer

    quantize = get_method(spec.method).quantized_base
    if quantize:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TrainingError("QLoRA needs the bitsandbytes package on this worker; install tunedeck[train].") from None
    model, tokenizer = load_model_and_tokenizer(
        spec.base_model_path,
        device=spec.device,
        dtype=spec.dtype,
        quantize_4bit=quantize,
        trust_remote_code=spec.trust_remote_code,
        # issue 36: a 4-bit base FSDP shards is packed in bf16 words (autotune/parallel.py plans it); passed only
        # then, so loaders standing in for this one (the search's reused_base_model) need not know the keyword
        **({"quant_storage": torch.bfloat16} if spec.plan.get("quant_storage") == "bf16" else {}),
    )
    apply_chat_template_choice(tokenizer, spec.plan.get("chat_template"))  # issue 34: for a model without one
    # Lean QLoRA: no prepare_model_for_kbit_training. It upcasts every non-quantised weight to fp32 and was
    # measured 2.2-2.9x slower than NF4 weights with bf16 compute; the LoRA weights follow the compute dtype.
    model.config.use_cache = False
    if spec.plan.get("fused_cross_entropy") is False:
        fastloss.use_full_logits(model)
    spec.plan["kernels"] = apply_fused_kernels(model, spec)
    if spec.gradient_checkpointing and get_method(spec.method).gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs, so no enable_input_require_grads() is needed.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_for_training(model, spec.as_plan())
    if spec.plan.get("cpu_dropout") is not False and cpudropout.use_on(model):
        spec.plan["kernels"].append(cpudropout.KERNEL_NAME)
    if quantize:
        compute = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
        for p in model.parameters():
            if p.requires_grad and p.dtype != compute:
                p.data = p.data.to(compute)
        # An evaluation before training would otherwise repack the 4-bit weights on AVX512-BF16 CPUs into a
        # layout that passes no gradient back (see fourbit.py).
        fourbit.keep_trainable(model)
    if compute_dtype(model) == torch.float16:
        # Master weights in fp32: the gradient scaler unscales fp32 gradients, and fp16 updates round to nothing.
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.float16:
                p.data = p.data.float()
    # from_pretrained returns eval mode, in which gradient checkpointing and dropout silently do nothing.
    model.train()
    return model, tokenizer


def apply_fused_kernels(model, spec: TrainSpec) -> list[str]:
    """Liger's Triton kernels for RMSNorm, SwiGLU and RoPE on a CUDA model, when liger-kernel is installed (the
    `gpu` extra) and the plan does not turn them off. Patched on the base model before the adapter wraps it, so
    LoRA layers inside the MLP keep working. Returns what was applied; the loss is fused separately (fastloss)."""
    if spec.plan.get("liger") is False or device_of(model).type != "cuda":
        return []
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return []
    try:
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception:  # noqa: BLE001 - an unsupported architecture trains on the plain kernels
        return []
    return ["liger-rms-norm", "liger-swiglu", "liger-rope"]


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def compute_dtype(model):
    return getattr(base_of(model), "dtype", None)


def device_of(model):
    return next(model.parameters()).device



def grad_scaler(model, device):
    """fp16 has too little range for small gradients: scale the loss up and the gradients back down (a step with
    an overflow is skipped). bf16 and fp32 need none."""
    import torch

    if compute_dtype(model) != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


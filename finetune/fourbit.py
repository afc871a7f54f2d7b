"""Keeps bitsandbytes' 4-bit layers on the code path that passes gradients back.

bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a `Linear4bit` weight into a CPU inference layout the first
time the layer runs in eval mode on an input that needs no gradient (an evaluation before training, say). From
then on its matmul takes `gemv_4bit`, which returns no gradient to its input, so every LoRA weight upstream of a
4-bit layer stops learning while the loss still prints. CPUs without AVX512-BF16 never repack, so the same
run learns on one machine and silently learns nothing on another. A model being trained never repacks: the
layers are told the CPU has no AVX512-BF16, and any weight already repacked is turned back first.
(Upstream: bitsandbytes/nn/modules.py `Linear4bit.forward`, `packing_format_for_cpu`.)
"""
from __future__ import annotations


def four_bit_layers(model) -> list:
    """Every bitsandbytes Linear4bit in the model (empty when bitsandbytes is absent or nothing is quantised)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def is_repacked_for_cpu_inference(layer) -> bool:
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def unpack_cpu_inference_layout(layer) -> bool:
    """Turns a weight bitsandbytes repacked for its bf16 CPU kernel back into NF4; True if it had been repacked.
    The one place that calls bitsandbytes' private inverse (training and merge both need NF4)."""
    if not is_repacked_for_cpu_inference(layer):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
        layer.weight.data, layer.weight.quant_state)
    layer.quant_state = layer.weight.quant_state
    return True


def keep_trainable(model) -> int:
    """Stops every 4-bit layer from repacking for CPU inference and unpacks any that did. Returns how many
    layers had been repacked (and were restored)."""
    restored = 0
    for layer in four_bit_layers(model):
        layer.support_avx512bf16_for_cpu = False
        restored += unpack_cpu_inference_layout(layer)
    return restored


def cpu_kernel_path() -> str:
    """Which CPU path bitsandbytes would take for 4-bit inference on this machine, for reports and tests."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return "no bitsandbytes"
    return "avx512-bf16 repacking (disabled while training)" if has_avx512bf16() else "dequantise + matmul"

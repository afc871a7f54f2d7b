"""The plan follows the hardware it is made for: measured bf16 speed, paged AdamW when it is what fits, and the
device named in the plan."""
import pytest

from autotune import select
from autotune.estimate import OPTIMIZERS, estimate
from autotune.select import MEMORY_OPTIMIZER

from .helpers import GB, config, cpu_inventory, dataset, gpu_inventory


def with_matmul(inventory, device, name, speedup, size=512):
    return {**inventory, "matmul_speed": [{"device": device, "name": name, "size": size, "fp32_tflops": 1.0,
                                           "bf16_tflops": speedup, "bf16_speedup": speedup}]}


def test_cpu_plans_bf16_when_the_worker_measured_it_faster():
    inventory = with_matmul(cpu_inventory(), "cpu", None, 1.7)
    plan = select(inventory, config("Llama-3.2-1B"), dataset(), {})
    assert plan["device"] == "cpu" and plan["dtype"] == "bf16"
    assert any("measured 1.70x fp32 matmul speed (512x512) on this CPU" in r for r in plan["reasons"])
    assert not any("no fast 16-bit" in r for r in plan["reasons"])


def test_cpu_stays_fp32_when_bf16_was_measured_slower():
    plan = select(with_matmul(cpu_inventory(), "cpu", None, 0.05), config("Llama-3.2-1B"), dataset(), {})
    assert plan["dtype"] == "fp32"
    assert any("measured 0.05x" in r and "below the 1.1x" in r for r in plan["reasons"])


def test_gpu_measurement_is_used_only_for_that_gpu():
    inventory = with_matmul(gpu_inventory(80 * GB), "cuda", "Some other GPU", 0.5)
    plan = select(inventory, config("Llama-3.2-1B"), dataset(), {})
    assert plan["dtype"] == "bf16"  # the measurement was of another card; the compute capability decides
    slow = with_matmul(gpu_inventory(80 * GB), "cuda", "NVIDIA H100 80GB HBM3", 0.5)
    assert select(slow, config("Llama-3.2-1B"), dataset(), {})["dtype"] == "fp32"


def test_plan_names_the_hardware_it_was_made_for():
    plan = select(gpu_inventory(80 * GB), config("Llama-3.2-1B"), dataset(), {})
    assert plan["hardware"] == {"device": "cuda", "name": "NVIDIA H100 80GB HBM3"}
    assert select(cpu_inventory(), config("GPT-2"), dataset(), {})["hardware"]["device"] == "cpu"


def test_default_optimizer_is_fused_adamw_on_cuda_and_plain_on_cpu():
    assert select(gpu_inventory(80 * GB), config("Llama-3.2-1B"), dataset(), {})["optimizer"] == "adamw_fused"
    assert select(cpu_inventory(), config("GPT-2"), dataset(), {})["optimizer"] == "adamw"


def margin_case():
    """A GPU whose usable memory lies between the QLoRA minimum with paged state and without it."""
    model = config("Llama-3.1-8B")
    base = {"method": "qlora", "micro_batch": 1, "gradient_checkpointing": True, "max_seq_len": 64, "rank": 32,
            "fused_cross_entropy": True}
    plain = estimate(model, {**base, "optimizer": "adamw_fused"})["total_bytes"]
    paged = estimate(model, {**base, "optimizer": MEMORY_OPTIMIZER})["total_bytes"]
    assert paged < plain
    free = int((paged + plain) / 2 / 0.95)
    return model, free


def test_paged_adamw_is_chosen_when_it_is_what_makes_the_plan_fit():
    model, free = margin_case()
    plan = select(gpu_inventory(free), model, dataset(rows=200_000, p99=60), {})
    assert plan["fits"] and plan["method"] == "qlora" and plan["optimizer"] == MEMORY_OPTIMIZER
    assert plan["memory"]["evictable_bytes"] > 0 and plan["memory"]["breakdown"]["optimizer"] == 0
    assert any("paged in CUDA unified memory" in r for r in plan["reasons"])


def test_paged_adamw_is_not_offered_without_bitsandbytes_or_when_adamw_fits():
    model, free = margin_case()
    inventory = {**gpu_inventory(free), "packages": {"bitsandbytes": False}}
    plan = select(inventory, model, dataset(rows=200_000, p99=60), {})
    assert plan["optimizer"] == "adamw_fused" and not plan["fits"]
    assert select(gpu_inventory(80 * GB), model, dataset(), {})["optimizer"] == "adamw_fused"


def test_eight_bit_paged_state_is_two_bytes_per_parameter_plus_absmax():
    per_parameter, paged = OPTIMIZERS["paged_adamw_8bit"]
    assert paged and per_parameter == pytest.approx(2 + 2 * 4 / 256)
    plan = {"method": "lora", "optimizer": "paged_adamw_8bit"}
    plain = estimate(config("Llama-3.2-1B"), {"method": "lora", "optimizer": "adamw"})
    result = estimate(config("Llama-3.2-1B"), plan)
    assert result["evictable_bytes"] == pytest.approx(plain["breakdown"]["optimizer"] * per_parameter / 8, rel=1e-6)


def test_paged_optimizer_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a GPU"):
        estimate(config("GPT-2"), {"device": "cpu", "optimizer": "paged_adamw"})
    with pytest.raises(ValueError, match="unknown optimizer"):
        estimate(config("GPT-2"), {"optimizer": "sgd"})

import re

import pytest

from autotune import estimate, select
from autotune.select import modelled_speed, shorter_lengths
from tests.autotune.helpers import GB, config, cpu_inventory, dataset, gpu_inventory

CONTRACT = {"method", "rank", "alpha", "target_modules", "micro_batch", "grad_accum", "max_seq_len",
            "gradient_checkpointing", "learning_rate", "epochs", "memory", "reasons"}
LLAMA_8B = config("Llama-3.1-8B")
H100 = gpu_inventory(int(79.1 * GB))
T4 = gpu_inventory(int(15.6 * GB), name="Tesla T4", capability="7.5", bf16=False)


def plan_for(inventory=H100, model=LLAMA_8B, stats=None, **preferences):
    return select(inventory, model, stats if stats is not None else dataset(), preferences)


def test_plan_has_the_contract_keys_and_fits():
    plan = plan_for()
    assert CONTRACT <= set(plan)
    assert {"fits", "warnings", "device", "dtype"} <= set(plan)
    assert set(plan["memory"]) == {"total_bytes", "breakdown", "capacity_bytes", "evictable_bytes"}
    assert plan["fits"] and plan["memory"]["total_bytes"] <= plan["memory"]["capacity_bytes"]
    assert plan["memory"]["capacity_bytes"] == int(79.1 * GB * 0.95)
    assert (plan["method"], plan["device"], plan["dtype"]) == ("lora", "cuda", "bf16")
    assert plan["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert plan["grad_accum"] * plan["micro_batch"] >= 16


def test_every_reason_carries_a_number():
    for inventory in (H100, T4, cpu_inventory()):
        plan = plan_for(inventory, model=config("Llama-3.2-1B"))
        assert len(plan["reasons"]) >= 8
        for reason in plan["reasons"]:
            assert re.search(r"\d", reason), reason


def test_method_reason_names_the_gpu_and_the_memory():
    reason = plan_for()["reasons"][0]
    assert reason.startswith("LoRA")
    assert "NVIDIA H100 80GB HBM3" in reason and "15.0 GiB" in reason and "73.7 GiB free" in reason


def test_qlora_when_lora_does_not_fit():
    plan = plan_for(T4)
    assert plan["method"] == "qlora" and plan["fits"]
    # A GPU without bf16 trains in fp16, with the loss scaled by a GradScaler.
    assert plan["dtype"] == "fp16"
    assert any("GradScaler" in r for r in plan["reasons"])
    assert "LoRA needs" in plan["reasons"][0]


def test_cpu_inventory_gives_a_cpu_plan():
    plan = plan_for(cpu_inventory(), model=config("GPT-2"))
    assert (plan["device"], plan["dtype"], plan["method"]) == ("cpu", "fp32", "lora")
    assert plan["memory"]["breakdown"]["cuda_context"] == 0
    assert plan["memory"]["capacity_bytes"] == int(24 * GB * 0.8)


def test_cpu_never_falls_back_to_qlora():
    plan = plan_for(cpu_inventory(8 * GB), model=LLAMA_8B)
    assert plan["method"] == "lora" and not plan["fits"]


def test_nothing_fits_returns_the_smallest_plan_with_the_shortfall():
    plan = plan_for(gpu_inventory(3 * GB))
    assert not plan["fits"]
    assert (plan["method"], plan["micro_batch"], plan["gradient_checkpointing"], plan["max_seq_len"]) == \
        ("qlora", 1, True, 64)
    assert plan["warnings"] and "missing" in plan["warnings"][0]
    missing = plan["memory"]["total_bytes"] - plan["memory"]["capacity_bytes"]
    assert f"{missing / 2**30:.1f} GiB is missing" in plan["warnings"][0]


def test_sequence_is_shortened_before_giving_up():
    plan = plan_for(gpu_inventory(9 * GB), stats=dataset(p99=4000, longest=8000))
    assert plan["fits"] and plan["method"] == "qlora" and plan["max_seq_len"] == 1984
    assert any("shortened from 4032" in r for r in plan["reasons"])


@pytest.mark.parametrize("p99,expected", [(1000, 1024), (1024, 1024), (1025, 1088), (3, 64), (0, 1024)])
def test_max_seq_len_from_the_99th_percentile(p99, expected):
    stats = dataset(p99=p99, longest=max(p99, 1) * 2) if p99 else {"rows": 100, "token_stats": {}}
    assert plan_for(model=config("Llama-3.2-1B"), stats=stats)["max_seq_len"] == expected


def test_max_seq_len_never_exceeds_the_context():
    plan = plan_for(model=config("GPT-2"), stats=dataset(p99=5000, longest=9000))
    assert plan["max_seq_len"] == 1024
    assert any("1,024-token context" in r for r in plan["reasons"])


def test_truncation_is_counted_from_token_stats():
    stats = dataset(rows=5000, p99=1000, longest=3000)
    stats["token_stats"]["truncated"] = {"1024": 37}
    reason = next(r for r in plan_for(stats=stats)["reasons"] if r.startswith("Max sequence length"))
    assert "37 examples" in reason and "3,000 tokens" in reason
    stats = dataset(p99=1000, longest=1000)
    reason = next(r for r in plan_for(stats=stats)["reasons"] if r.startswith("Max sequence length"))
    assert "no example is truncated" in reason


@pytest.mark.parametrize("rows,rank,effective,epochs,every", [
    (100, 16, 8, 20, 13),  # 13 steps a pass: 300 steps would be 23 passes, so the 20-pass ceiling
    (400, 16, 8, 6, 38),  # 50 steps a pass: 6 passes reach 300 steps; 8 evaluations at least
    (900, 16, 8, 2.67, 38),  # under 1,000 rows the effective batch is 8: 113 steps a pass
    (1200, 16, 16, 4, 38),  # 75 steps a pass at batch 16
    (5000, 16, 16, 1, None),  # 313 steps in one pass: the trainer's own evaluation schedule
    (200_000, 32, 16, 1, None),
])
def test_rank_batch_and_length_follow_dataset_size(rows, rank, effective, epochs, every):
    plan = plan_for(stats=dataset(rows=rows))
    assert (plan["rank"], plan["alpha"], plan["epochs"]) == (rank, 2 * rank, epochs)
    assert plan["micro_batch"] * plan["grad_accum"] == effective
    assert plan.get("eval_every_steps") == every
    reason = next(r for r in plan["reasons"] if f"{epochs:g} epoch" in r)
    assert "best checkpoint" in reason
    if every:
        assert 2 <= plan["early_stopping_patience"] <= 3
        assert reason.startswith(f"At most {epochs:g} epochs") and f"Validation every {every} steps" in reason
        assert f"and {epochs:g} (still improving)" in reason  # the expected range, up to the ceiling


def test_a_small_dataset_is_evaluated_every_pass_and_may_train_many_passes():
    # Issue 32: 108 training rows of labels the base model had never seen needed ~10 passes at a higher rate.
    plan = plan_for(stats=dataset(rows=108))
    assert plan["epochs"] == 20 and plan["eval_every_steps"] == 14 and plan["early_stopping_patience"] == 2
    reason = next(r for r in plan["reasons"] if r.startswith("At most 20 epochs"))
    assert "about 280 optimizer steps" in reason and "every pass" in reason and "ends between 3 passes" in reason


def test_without_validation_rows_the_length_is_fixed_and_short():
    plan = plan_for(stats={**dataset(rows=108), "validation_rows": 0})
    assert plan["epochs"] == 3 and "eval_every_steps" not in plan and "early_stopping_patience" not in plan
    reason = next(r for r in plan["reasons"] if r.startswith("3 epochs"))
    assert "no validation rows" in reason and "80 optimizer steps" in reason
    assert plan_for(stats={**dataset(rows=108), "validation_rows": 12})["epochs"] == 20


def test_length_overrides_are_kept():
    plan = plan_for(stats=dataset(rows=108), overrides={"epochs": 4, "early_stopping_patience": 0})
    assert plan["epochs"] == 4 and plan["early_stopping_patience"] == 0 and plan["eval_every_steps"] == 7
    assert any(r.startswith("4 epochs (override)") for r in plan["reasons"])
    plan = plan_for(stats=dataset(rows=108), overrides={"eval_every_steps": 5})
    assert plan["eval_every_steps"] == 5 and plan["early_stopping_patience"] == 3
    plan = plan_for(stats=dataset(rows=108), overrides={"max_steps": 10})
    assert plan["max_steps"] == 10 and "eval_every_steps" not in plan
    assert any("max_steps = 10 (override) ends the run first" in r for r in plan["reasons"])


@pytest.mark.parametrize("method,rate", [("lora", 2e-4), ("qlora", 2e-4), ("dora", 2e-4), ("ia3", 3e-3),
                                         ("prefix", 1e-2), ("prompt", 3e-2), ("adapter", 1e-4), ("dpo", 5e-6),
                                         ("kto", 5e-6)])
def test_forced_method_and_its_learning_rate(method, rate):
    plan = plan_for(model=config("Llama-3.2-1B"), method=method)
    assert plan["method"] == method and plan["learning_rate"] == rate and plan["fits"]
    assert plan["memory"]["total_bytes"] == estimate(config("Llama-3.2-1B"), plan)["total_bytes"]


def test_method_specific_settings():
    assert plan_for(method="ia3")["target_modules"] == ["k_proj", "v_proj", "down_proj"]
    assert plan_for(method="prompt")["num_virtual_tokens"] == 20
    assert plan_for(method="adapter")["adapter_bottleneck"] == 64
    assert plan_for(method="dpo")["dpo_beta"] == 0.1
    assert plan_for(method="kto")["kto_beta"] == 0.1 and "dpo_beta" not in plan_for(method="kto")
    assert plan_for(method="prefix")["target_modules"] == []


def test_gradient_checkpointing_only_when_it_pays():
    roomy = plan_for(model=config("Llama-3.2-1B"))
    assert not roomy["gradient_checkpointing"]
    tight = plan_for(gpu_inventory(24 * GB))
    assert tight["gradient_checkpointing"]
    assert any("not even micro-batch 1" in r for r in tight["reasons"])


def test_speed_model():
    assert modelled_speed(4096, False) > modelled_speed(4096, True)
    assert modelled_speed(512, False) < modelled_speed(16384, True)  # tiny batches leave the GPU idle
    assert shorter_lengths(1088) == [1088, 512, 256, 128, 64]


def test_device_index_chooses_the_gpu():
    inventory = gpu_inventory(80 * GB)
    inventory["gpus"].append({**inventory["gpus"][0], "index": 1, "name": "small", "free_bytes": 20 * GB})
    def method_reason(plan):
        return next(r for r in plan["reasons"] if "usable (" in r)

    assert "small" in method_reason(plan_for(inventory, device_index=1))
    assert "H100" in method_reason(plan_for(inventory))
    plan = plan_for(inventory, device_index=5)
    assert "H100" in method_reason(plan) and "GPU 5" in plan["warnings"][0]


# ------------------------------------------------------------------------ overrides


def test_rank_override_recomputes_memory():
    default, bigger = plan_for(), plan_for(overrides={"rank": 256, "micro_batch": 2})
    assert bigger["rank"] == 256 and bigger["alpha"] == 512
    assert bigger["memory"]["breakdown"]["optimizer"] == 16 * default["memory"]["breakdown"]["optimizer"]
    assert any("override" in r and "256" in r for r in bigger["reasons"])


def test_too_large_micro_batch_override_is_kept_with_a_warning():
    plan = plan_for(overrides={"micro_batch": 512})
    assert plan["micro_batch"] == 512 and plan["fits"] is False
    assert plan["memory"]["total_bytes"] > plan["memory"]["capacity_bytes"]
    assert plan["warnings"] and plan["method"] == "lora"
    assert plan["grad_accum"] == 1


def test_overrides_are_respected():
    overrides = {"max_seq_len": 300, "gradient_checkpointing": True, "learning_rate": 1e-3, "epochs": 2.5,
                 "alpha": 8, "target_modules": ["q_proj", "v_proj"], "seed": 7, "warmup_ratio": 0.1,
                 "grad_accum": 3, "dropout": 0.0}
    plan = plan_for(overrides=overrides)
    for key, value in overrides.items():
        assert plan[key] == value, key
    assert plan["memory"]["total_bytes"] == estimate(LLAMA_8B, plan)["total_bytes"]


def test_method_override_and_device_override():
    assert plan_for(overrides={"method": "dora"})["method"] == "dora"
    plan = plan_for(overrides={"device": "cpu"}, model=config("GPT-2"))
    assert plan["device"] == "cpu" and plan["dtype"] == "fp32"
    plan = plan_for(cpu_inventory(), overrides={"device": "cuda"}, model=config("GPT-2"))
    assert not plan["fits"] and plan["warnings"]


def test_unknown_target_modules_and_methods_are_errors():
    with pytest.raises(ValueError, match="target_modules"):
        plan_for(overrides={"target_modules": ["c_attn"]})
    with pytest.raises(ValueError, match="method"):
        plan_for(method="full")


def test_no_dataset_statistics():
    plan = select(H100, config("Llama-3.2-1B"), {"rows": 0, "token_stats": {}}, {"method": "auto", "overrides": {}})
    assert plan["max_seq_len"] == 1024 and plan["rank"] == 16 and plan["epochs"] == 1
    assert plan_for(stats={})["fits"]


def test_max_seq_len_override_beyond_the_context_warns():
    plan = plan_for(cpu_inventory(), model=config("GPT-2"), overrides={"max_seq_len": 2048})
    assert plan["max_seq_len"] == 2048
    assert any("1,024-token context" in w for w in plan["warnings"])


@pytest.mark.parametrize("model,method,fused", [("Llama-3.1-8B", "lora", True), ("Qwen2.5-7B", "qlora", True),
                                                ("Gemma-2-2B", "lora", False), ("Llama-3.1-8B", "dpo", False),
                                                ("Llama-3.1-8B", "kto", False), ("Llama-3.1-8B", "prompt", False)])
def test_plan_predicts_the_fused_loss_that_training_uses(model, method, fused):
    plan = plan_for(model=config(model), overrides={"method": method})
    assert plan["fused_cross_entropy"] is fused
    unfused = estimate(config(model), {**plan, "fused_cross_entropy": False})
    assert (plan["memory"]["breakdown"]["logits"] < unfused["breakdown"]["logits"]) is fused

"""How many GPUs a plan trains on (autotune/parallel.py, issue 36): DDP when the model fits one GPU, the frozen
base sharded (FSDP2) when it fits none, the user's process count on a CPU; the global batch is kept."""
from autotune import select
from autotune.parallel import one_process_equivalent, spread_over_ranks

LLAMA_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 384, "max_position_embeddings": 512}
CPU = {"gpus": [], "cpu": {"cores": 2, "ram_total_bytes": 8 * 2**30, "ram_available_bytes": 4 * 2**30}}
DATA = {"rows": 2000, "token_stats": {"min": 100, "p50": 300, "p95": 500, "p99": 700, "max": 800}}


def _h100s(n):
    return {"gpus": [{"index": i, "name": "NVIDIA H100 80GB HBM3", "total_bytes": 80 * 2**30,
                      "free_bytes": 79 * 2**30, "compute_capability": "9.0", "bf16": True} for i in range(n)],
            "cpu": {"cores": 32, "ram_total_bytes": 512 * 2**30, "ram_available_bytes": 500 * 2**30}}


def _global(plan):
    return plan["micro_batch"] * plan["grad_accum"] * plan["gpus"]


def test_one_gpu_plans_one_rank_and_says_nothing_about_ranks():
    plan = select(_h100s(1), LLAMA_70B, DATA, {"method": "auto"})
    assert plan["gpus"] == 1 and "parallel" not in plan
    assert plan["global_batch"] == _global(plan)


def test_a_model_that_fits_one_gpu_trains_data_parallel_on_all_of_them_at_the_same_global_batch():
    one = select(_h100s(1), LLAMA_70B, DATA, {"method": "qlora"})
    eight = select(_h100s(8), LLAMA_70B, DATA, {"method": "qlora"})
    assert eight["gpus"] == 8 and eight["parallel"] == "ddp" and eight["fits"]
    assert _global(eight) == _global(one) == eight["global_batch"]
    assert eight["micro_batch"] <= one["micro_batch"]  # a smaller share per GPU fits where the larger one did
    assert any("8 GPUs, data parallel (DDP)" in r for r in eight["reasons"])


def test_a_base_that_fits_no_single_gpu_is_sharded_over_the_fewest_that_hold_it():
    one = select(_h100s(1), LLAMA_70B, DATA, {"method": "lora"})
    assert not one["fits"]
    plan = select(_h100s(8), LLAMA_70B, DATA, {"method": "lora"})
    assert plan["fits"] and plan["parallel"] == "fsdp" and 2 <= plan["gpus"] < 8
    assert plan["memory"]["per_gpu_bytes"] <= plan["memory"]["capacity_bytes"]
    assert plan["fused_cross_entropy"] is False
    assert any("sharded across them (FSDP2)" in r for r in plan["reasons"])
    assert not any(w.startswith("This plan needs") for w in plan["warnings"])  # that was about one GPU


def test_more_gpus_asked_than_the_worker_has_is_said_before_training():
    plan = select(_h100s(2), TINY, DATA, {"method": "lora", "overrides": {"gpus": 4}})
    assert not plan["fits"]
    assert any("4 GPUs asked for, but the worker has 2" in w for w in plan["warnings"])


def test_on_a_cpu_the_process_count_is_the_users_and_the_accumulation_divides_by_it():
    default = select(CPU, TINY, DATA, {"method": "lora", "overrides": {"grad_accum": 4}})
    assert default["gpus"] == 1 and default["grad_accum"] == 4
    two = select(CPU, TINY, DATA, {"method": "lora", "overrides": {"grad_accum": 4, "gpus": 2}})
    assert two["gpus"] == 2 and two["parallel"] == "ddp" and two["grad_accum"] == 2
    assert _global(two) == _global(default)
    assert any("2 training processes on the CPU (gloo)" in r for r in two["reasons"])


def test_the_searchs_one_process_trials_keep_the_global_batch_and_the_winner_goes_back_onto_the_ranks():
    plan = select(_h100s(8), LLAMA_70B, DATA, {"method": "qlora"})
    single = one_process_equivalent(plan)
    assert single["gpus"] == 1 and "parallel" not in single and _global(single) == _global(plan)
    winner = {**single, "micro_batch": 4, "grad_accum": 4}  # a searched micro-batch, the same global batch
    back = spread_over_ranks(winner, 8)
    assert back["gpus"] == 8 and _global(back) == 16 == back["global_batch"] and back["micro_batch"] <= 4

"""Properties of select() over random hardware, models, datasets and overrides."""
from hypothesis import given, settings
from hypothesis import strategies as st

from autotune import estimate, select
from autotune.select import modelled_speed
from autotune.shapes import reference_config_names
from tests.autotune.helpers import GB, config, cpu_inventory, dataset, gpu_inventory

MODELS = {name: config(name) for name in reference_config_names()}
MODEL_NAMES = st.sampled_from(sorted(MODELS))
FREE_BYTES = st.integers(min_value=1 * GB, max_value=200 * GB)
STATS = st.builds(lambda rows, p99, extra: dataset(rows=rows, p99=p99, longest=p99 + extra),
                  st.integers(0, 300_000), st.integers(1, 9000), st.integers(0, 9000))
METHODS = st.sampled_from(["auto", "auto", "lora", "qlora", "dora", "ia3", "prompt", "adapter", "dpo"])
ORDER = {"lora": 0, "qlora": 1}


def plan(free, name, stats, method="auto", overrides=None, bf16=True, inventory=None):
    inventory = inventory or gpu_inventory(free, bf16=bf16, capability="9.0" if bf16 else "7.5")
    return select(inventory, MODELS[name], stats, {"method": method, "overrides": overrides or {}})


def speed(p):
    return modelled_speed(p["micro_batch"] * p["max_seq_len"], p["gradient_checkpointing"])


@settings(max_examples=150, deadline=None)
@given(free=FREE_BYTES, name=MODEL_NAMES, stats=STATS, method=METHODS, bf16=st.booleans())
def test_a_plan_that_fits_is_within_capacity(free, name, stats, method, bf16):
    p = plan(free, name, stats, method, bf16=bf16)
    assert p["memory"]["capacity_bytes"] <= free
    if p["fits"]:
        assert p["memory"]["total_bytes"] <= p["memory"]["capacity_bytes"]
        assert not p["warnings"]
    else:
        assert p["warnings"]
    assert p["memory"]["total_bytes"] == estimate(MODELS[name], p)["total_bytes"]
    assert 64 <= p["max_seq_len"] and p["max_seq_len"] % 64 == 0 or p["max_seq_len"] == MODELS[name].get("n_positions")
    assert p["micro_batch"] & (p["micro_batch"] - 1) == 0 and 1 <= p["micro_batch"] <= 64


@settings(max_examples=150, deadline=None)
@given(free=FREE_BYTES, more=st.integers(min_value=0, max_value=100 * GB), name=MODEL_NAMES, stats=STATS,
       method=METHODS)
def test_more_memory_never_makes_the_plan_worse(free, more, name, stats, method):
    small, large = plan(free, name, stats, method), plan(free + more, name, stats, method)
    assert large["fits"] or not small["fits"]
    assert ORDER.get(large["method"], 0) <= ORDER.get(small["method"], 0)  # never LoRA -> QLoRA
    assert large["max_seq_len"] >= small["max_seq_len"]
    if (large["method"], large["max_seq_len"]) == (small["method"], small["max_seq_len"]) and small["fits"]:
        assert speed(large) >= speed(small) - 1e-12
        if large["gradient_checkpointing"] == small["gradient_checkpointing"]:
            assert large["micro_batch"] >= small["micro_batch"]  # monotone micro-batch within a mode


@settings(max_examples=60, deadline=None)
@given(available=FREE_BYTES, name=MODEL_NAMES, stats=STATS)
def test_cpu_plans_use_fp32_and_no_qlora(available, name, stats):
    p = select(cpu_inventory(available), MODELS[name], stats, {"method": "auto"})
    assert (p["device"], p["dtype"], p["method"]) == ("cpu", "fp32", "lora")
    assert p["memory"]["breakdown"]["cuda_context"] == 0


OVERRIDES = st.fixed_dictionaries({}, optional={
    "rank": st.integers(1, 128),
    "alpha": st.floats(1, 256),
    "micro_batch": st.integers(1, 128),
    "grad_accum": st.integers(1, 32),
    "max_seq_len": st.integers(64, 4096),
    "gradient_checkpointing": st.booleans(),
    "learning_rate": st.floats(1e-6, 1e-1),
    "epochs": st.floats(0.5, 10),
    "dropout": st.floats(0, 0.5),
    "seed": st.integers(0, 1000),
    "packing": st.booleans(),
})


@settings(max_examples=150, deadline=None)
@given(free=FREE_BYTES, name=MODEL_NAMES, stats=STATS, overrides=OVERRIDES)
def test_overrides_are_kept_and_memory_follows_them(free, name, stats, overrides):
    p = plan(free, name, stats, "lora", overrides)
    for key, value in overrides.items():
        assert p[key] == value, key
    assert p["memory"]["total_bytes"] == estimate(MODELS[name], p)["total_bytes"]
    assert p["fits"] == (p["memory"]["total_bytes"] <= p["memory"]["capacity_bytes"])

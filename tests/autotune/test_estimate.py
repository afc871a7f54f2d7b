import subprocess
import sys

import pytest

from autotune import estimate
from autotune.estimate import nf4_bytes_per_parameter, trainable_parameters
from autotune.shapes import ModelShape
from tests.autotune.helpers import GB, config

KEYS = {"weights", "trainable", "gradients", "optimizer", "activations", "logits", "cuda_context",
        "allocator_headroom"}
LLAMA_8B = config("Llama-3.1-8B")


def breakdown(model, **plan):
    return estimate(model, plan)["breakdown"]


def test_breakdown_has_every_term_and_sums_to_total():
    result = estimate(LLAMA_8B, {"method": "lora", "micro_batch": 2, "max_seq_len": 1024})
    assert set(result["breakdown"]) == KEYS
    assert result["total_bytes"] == sum(result["breakdown"].values())
    assert all(isinstance(v, int) and v >= 0 for v in result["breakdown"].values())


def test_llama_8b_bf16_weights():
    assert breakdown(LLAMA_8B, method="lora")["weights"] == 8_030_261_248 * 2  # 16.06e9


def test_fp32_weights_are_twice_bf16():
    assert breakdown(LLAMA_8B, dtype="fp32")["weights"] == 2 * breakdown(LLAMA_8B, dtype="bf16")["weights"]


def test_nf4_llama_8b_is_between_5_5_and_6_gb_with_embeddings():
    weights = breakdown(LLAMA_8B, method="qlora")["weights"]
    assert 5.5 * GB <= weights <= 6.0 * GB
    embeddings_and_head = 2 * 128256 * 4096 * 2
    assert weights > embeddings_and_head  # they stay in bf16


def test_double_quantisation_shrinks_the_constants():
    assert nf4_bytes_per_parameter(True) == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))
    assert nf4_bytes_per_parameter(False) == pytest.approx(0.5 + 4 / 64)
    single = breakdown(LLAMA_8B, method="qlora", double_quant=False)["weights"]
    assert single > breakdown(LLAMA_8B, method="qlora")["weights"]


def test_lora_state_is_fp32_adam():
    trainable = 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert trainable_parameters(LLAMA_8B, {"method": "lora", "rank": 16}) == trainable == 41_943_040
    terms = breakdown(LLAMA_8B, method="lora", rank=16)
    assert terms["trainable"] == terms["gradients"] == 4 * trainable
    assert terms["optimizer"] == 8 * trainable


def test_trainable_parameters_per_method():
    shape = ModelShape.from_config(LLAMA_8B)
    lora = trainable_parameters(shape, {"method": "lora", "rank": 8})
    assert trainable_parameters(shape, {"method": "dora", "rank": 8}) == lora + 32 * (2 * 4096 + 2 * 1024 + 2 * 14336 + 4096)
    assert trainable_parameters(shape, {"method": "ia3"}) == 32 * (1024 + 1024 + 14336)
    assert trainable_parameters(shape, {"method": "prompt", "num_virtual_tokens": 20}) == 20 * 4096
    assert trainable_parameters(shape, {"method": "prefix", "num_virtual_tokens": 20}) == 20 * 32 * 2 * 1024
    assert trainable_parameters(shape, {"method": "adapter", "adapter_bottleneck": 64}) == 32 * 2 * (2 * 4096 * 64 + 64 + 4096)
    assert trainable_parameters(shape, {"method": "lora", "rank": 8, "target_modules": ["q_proj", "v_proj"]}) == \
        32 * 8 * (4096 + 4096 + 4096 + 1024)


def test_logits_term_scales_with_vocabulary():
    # Mistral-7B-v0.3 has Llama-3-8B's block shape with a quarter of the vocabulary
    plan = {"micro_batch": 4, "max_seq_len": 2048}
    llama, mistral = breakdown(LLAMA_8B, **plan)["logits"], breakdown(config("Mistral-7B-v0.3"), **plan)["logits"]
    assert llama / mistral == pytest.approx(128256 / 32768)
    assert llama > 10 * GB  # a 128k vocabulary spends GBs on the loss


def test_logits_term_counts_the_losss_fp32_buffers():
    # the log-softmax, its gradient and its input's gradient; the bf16 logits are gone by the time they exist
    terms = breakdown(LLAMA_8B, micro_batch=1, max_seq_len=1000)
    assert terms["logits"] == 1000 * 128256 * 12


def test_fused_cross_entropy_never_materialises_the_logits():
    plain = breakdown(LLAMA_8B, micro_batch=4, max_seq_len=2048)["logits"]
    fused = breakdown(LLAMA_8B, micro_batch=4, max_seq_len=2048, fused_cross_entropy=True)["logits"]
    assert fused < plain / 5


def test_checkpointing_reduces_activations():
    for name in ("Llama-3.1-8B", "Gemma-2-2B", "Phi-3-mini", "GPT-2"):
        full = breakdown(config(name), micro_batch=4, max_seq_len=1024)["activations"]
        checkpointed = breakdown(config(name), micro_batch=4, max_seq_len=1024, gradient_checkpointing=True)
        assert checkpointed["activations"] < full / 4, name


def test_activations_grow_linearly_with_tokens_under_sdpa():
    one = breakdown(LLAMA_8B, micro_batch=1, max_seq_len=1024, packing=True)["activations"]
    two = breakdown(LLAMA_8B, micro_batch=2, max_seq_len=1024, packing=True)["activations"]
    longer = breakdown(LLAMA_8B, micro_batch=1, max_seq_len=2048, packing=True)["activations"]
    assert two == pytest.approx(2 * one, rel=0.01)
    assert longer == pytest.approx(2 * one, rel=0.01)


def test_eager_attention_adds_a_quadratic_term():
    gemma = config("Gemma-2-2B")
    short = breakdown(gemma, max_seq_len=1024)["activations"]
    long = breakdown(gemma, max_seq_len=4096)["activations"]
    assert long > 4.5 * short
    sdpa = breakdown(gemma, max_seq_len=4096, attn_implementation="flash_attention_2")["activations"]
    assert sdpa < long / 2


def test_lora_dropout_and_wider_targets_cost_activation_memory():
    base = breakdown(LLAMA_8B, max_seq_len=1024, dropout=0.0)["activations"]
    assert breakdown(LLAMA_8B, max_seq_len=1024, dropout=0.1)["activations"] > base
    attention_only = breakdown(LLAMA_8B, max_seq_len=1024, dropout=0.0, target_modules=["q_proj", "v_proj"])
    assert attention_only["activations"] < base


def test_liger_saves_activation_memory():
    plain = breakdown(LLAMA_8B, micro_batch=4, max_seq_len=1024)["activations"]
    assert breakdown(LLAMA_8B, micro_batch=4, max_seq_len=1024, liger=True)["activations"] < plain


def test_dora_costs_more_than_lora():
    # with the fused loss: the full logits' buffers are freed before backward and would hide the temporaries
    plan = {"max_seq_len": 1024, "gradient_checkpointing": True, "fused_cross_entropy": True}
    lora = estimate(LLAMA_8B, {"method": "lora", **plan})
    dora = estimate(LLAMA_8B, {"method": "dora", **plan})
    assert dora["breakdown"]["activations"] > lora["breakdown"]["activations"] + 1 * GB  # weight-sized temporaries


def test_dpo_doubles_sequences_and_its_reference_pass_fits_in_the_policys_loss_buffers():
    lora = breakdown(LLAMA_8B, method="lora", micro_batch=2, max_seq_len=512)
    dpo = breakdown(LLAMA_8B, method="dpo", micro_batch=2, max_seq_len=512)
    assert dpo["activations"] == pytest.approx(2 * lora["activations"], rel=0.15)
    assert dpo["logits"] == 2 * lora["logits"]
    # dpo_loss takes log-probabilities from full logits: the fused loss does not apply
    assert breakdown(LLAMA_8B, method="dpo", micro_batch=2, max_seq_len=512, fused_cross_entropy=True) == dpo


def test_kto_runs_one_sequence_per_example():
    lora = breakdown(LLAMA_8B, method="lora", micro_batch=2, max_seq_len=512)
    kto = breakdown(LLAMA_8B, method="kto", micro_batch=2, max_seq_len=512)
    assert kto["activations"] == pytest.approx(lora["activations"], rel=0.05)  # unpaired: no second answer
    assert kto["logits"] == lora["logits"]  # the reference forward peaks within the policy's loss buffers


def test_prompt_tuning_lengthens_every_sequence_but_not_the_loss():
    plain = breakdown(LLAMA_8B, method="prompt", max_seq_len=512, num_virtual_tokens=1)
    longer = breakdown(LLAMA_8B, method="prompt", max_seq_len=512, num_virtual_tokens=101)
    assert longer["activations"] / plain["activations"] == pytest.approx(613 / 513, rel=0.01)
    # the logits of the virtual positions (2 bytes each) exist until the loss drops them
    assert longer["logits"] - plain["logits"] == pytest.approx(100 * 128256 * 2, abs=128256 * 12)


def test_qlora_adds_a_dequantisation_temporary():
    # a recomputed layer outweighs the fused loss's chunk, so the temporary shows in full
    plan = {"max_seq_len": 4096, "gradient_checkpointing": True, "fused_cross_entropy": True}
    lora = breakdown(LLAMA_8B, method="lora", **plan)["activations"]
    qlora = breakdown(LLAMA_8B, method="qlora", **plan)["activations"]
    assert qlora - lora == 4096 * 14336 * 2


def test_backward_reuses_the_loss_buffers():
    """The full logits' buffers are freed before the first block runs backward: what a block's backward adds
    (its working set, a recomputed layer under checkpointing) counts only beyond them."""
    full = breakdown(LLAMA_8B, max_seq_len=1024, gradient_checkpointing=True)
    fused = breakdown(LLAMA_8B, max_seq_len=1024, gradient_checkpointing=True, fused_cross_entropy=True)
    saved_hidden_states = 32 * 1024 * 4096 * 2
    final_norm = 1024 * 4096 * 4
    assert full["activations"] == saved_hidden_states + final_norm  # the recomputed layer fits in the logits'
    assert fused["activations"] > full["activations"] + 0.1 * GB  # but not in the fused loss's one chunk


def test_cpu_has_no_cuda_context_and_defaults_to_fp32():
    terms = breakdown(config("GPT-2"), device="cpu")
    assert terms["cuda_context"] == 0
    assert terms["weights"] == 124_439_808 * 4
    assert breakdown(config("GPT-2"), device="cuda")["cuda_context"] == 500 * 1024**2


def test_calibration_scales_named_terms():
    plan = {"micro_batch": 2, "max_seq_len": 1024}
    plain = estimate(LLAMA_8B, plan)["breakdown"]
    scaled = estimate(LLAMA_8B, plan, {"activation_scale": 1.5, "cuda_context_bytes": 0})["breakdown"]
    assert scaled["activations"] == pytest.approx(1.5 * plain["activations"], abs=1)
    assert scaled["cuda_context"] == 0
    assert scaled["weights"] == plain["weights"]
    with pytest.raises(ValueError, match="unknown calibration"):
        estimate(LLAMA_8B, plan, {"activation_scael": 1.0})


def test_bad_plans_are_rejected():
    with pytest.raises(ValueError, match="method"):
        estimate(LLAMA_8B, {"method": "full"})
    with pytest.raises(ValueError, match="micro_batch"):
        estimate(LLAMA_8B, {"micro_batch": 0})
    with pytest.raises(ValueError, match="target_modules"):
        estimate(LLAMA_8B, {"target_modules": ["c_attn"]})


def test_estimate_accepts_a_whole_plan_from_select():
    from autotune import select
    from tests.autotune.helpers import dataset, gpu_inventory

    plan = select(gpu_inventory(80 * GB), LLAMA_8B, dataset(), {})
    assert estimate(LLAMA_8B, plan)["total_bytes"] == plan["memory"]["total_bytes"]


def test_autotune_imports_neither_torch_nor_django():
    heavy = "('torch', 'transformers', 'django', 'pynvml', 'psutil')"
    code = ("import sys, autotune; print(sorted(m for m in HEAVY if m in sys.modules)); "
            "autotune.select({'gpus': []}, {'model_type': 'gpt2', 'n_embd': 64, 'n_layer': 2, "
            "'n_head': 2, 'n_positions': 64, 'vocab_size': 100}, {}, {}); autotune.probe(); "
            "print(sorted(m for m in HEAVY[:3] if m in sys.modules))").replace("HEAVY", heavy)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "[]"]  # pynvml and psutil only once probe() runs

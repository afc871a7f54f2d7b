"""The estimate against what the platform's own training code really allocates on the CPU: one forward and
backward through finetune's loss path (the fused loss where training uses it, DPO's pair loss, packing's position
ids) for every method, measured by tests/autotune/allocation.py. The estimate's activations + logits + gradients
is its peak at the start of backward; the measurement is the peak of everything the step allocated.

Bounds are the measured agreement on these tiny shapes, not wishes: a ratio outside them means the code or the
formula changed. The GPU check of whole peaks at real sizes is bench/memory_estimate.py (in bench/gpu_suite.sh)."""
import pytest

from autotune.estimate import estimate, fused_loss_chunk_rows
from autotune.shapes import load_reference_config

from .allocation import peak_bytes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 600, "pad_token_id": 0, "bos_token_id": 1,
         "eos_token_id": 2}
CONFIG = {**load_reference_config("Llama-3.2-1B"), **SMALL}
BATCH, SEQ = 2, 128

# (lowest, highest) estimate / measured, as measured on this CPU (torch 2.13, peft 0.18, transformers 4.5x)
BOUNDS = {
    "lora": (0.88, 1.10),
    "dora": (0.95, 1.10),
    "ia3": (0.65, 1.10),  # under: peft's IA3 multiplies in fp32 and keeps the product (to fix in the formula)
    "prefix": (0.78, 1.10),  # under: the prefix keys/values are concatenated per layer in full
    "prompt": (0.85, 1.10),
    "adapter": (0.80, 1.10),  # under: the residual add's output and GELU's input are both kept
    "dpo": (0.95, 1.15),  # over: the reference pass's logits are counted as overlapping the policy's
}


def _model(method, checkpointing=False):
    from finetune.methods import wrap_for_training

    hf_config = transformers.AutoConfig.for_model(**CONFIG)
    hf_config.use_cache = False
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plan = {"method": method, "rank": 16, "dropout": 0.0, "num_virtual_tokens": 20, "adapter_bottleneck": 64}
    if method != "ia3":
        plan["target_modules"] = "all-linear"
    model = wrap_for_training(model, plan)
    model.train()
    return model, plan


def _step(model, method, packing):
    from finetune import train

    ids = torch.randint(3, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mask, positions = torch.ones_like(ids), None
    if packing:
        mask, positions = None, torch.arange(SEQ).repeat(BATCH, 1)

    def run():
        if method == "dpo":
            rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
            pairs = [{"chosen": r, "rejected": r} for r in rows]
            loss = train.dpo_loss(model, pairs, 0.1, 0, torch.device("cpu"))[0]
        else:
            loss = train.token_loss_sum(model, ids, ids, mask, positions)[0]
        loss.backward()

    return run


def _ratio(method, checkpointing=False, packing=False):
    from finetune.fastloss import loss_path

    model, plan = _model(method, checkpointing)
    measured = peak_bytes(_step(model, method, packing))
    fused = method != "dpo" and loss_path(model) == "fused-linear-cross-entropy"
    breakdown = estimate(CONFIG, {**plan, "micro_batch": BATCH, "max_seq_len": SEQ, "dtype": "bf16",
                                  "device": "cpu", "gradient_checkpointing": checkpointing, "packing": packing,
                                  "fused_cross_entropy": fused})["breakdown"]
    predicted = breakdown["activations"] + breakdown["logits"] + breakdown["gradients"]
    return predicted / measured


@pytest.mark.parametrize("method", sorted(BOUNDS))
def test_every_method_through_the_training_loss_path(method):
    low, high = BOUNDS[method]
    assert low <= _ratio(method) <= high


def test_packing_and_checkpointing():
    assert 0.85 <= _ratio("lora", packing=True) <= 1.15
    assert 0.80 <= _ratio("lora", checkpointing=True) <= 1.25  # under: recomputation keeps more than one layer


def test_fused_loss_chunks_are_what_fastloss_allocates():
    """At least 256 rows per chunk, each alive as fp32 logits beside logsumexp's fp32 temporary, plus the picked
    hidden states and their gradient: the estimate's logits term for this many labelled rows."""
    from autotune.estimate import Setup, logits_bytes
    from autotune.shapes import ModelShape
    from finetune.fastloss import linear_cross_entropy

    rows, hidden, vocab = 1024, 256, 8000
    assert fused_loss_chunk_rows(rows, vocab, hidden) == 256  # Liger's rule alone would give 32 rows
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(rows, hidden, generator=generator).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(vocab, hidden, generator=generator).to(torch.bfloat16) / 16
    targets = torch.randint(0, vocab, (rows,), generator=generator)

    def run():
        picked = states * 1  # the fused path picks the labelled rows out of the body's output: a copy
        linear_cross_entropy(picked, weight, targets).backward()

    measured = peak_bytes(run)
    shape = ModelShape.from_config({**CONFIG, "hidden_size": hidden, "vocab_size": vocab})
    predicted = logits_bytes(shape, Setup.from_plan({"micro_batch": 1, "max_seq_len": rows, "dtype": "bf16",
                                                    "device": "cpu", "fused_cross_entropy": True}))
    assert 0.95 <= predicted / measured <= 1.10


def test_bottleneck_adapters_are_estimated_in_the_base_dtype():
    from autotune.estimate import trainable_parameters

    model, plan = _model("adapter")
    params = [p for p in model.parameters() if p.requires_grad]
    actual = sum(p.numel() * p.element_size() for p in params)
    assert {p.dtype for p in params} == {torch.bfloat16}
    predicted = estimate(CONFIG, {**plan, "dtype": "bf16", "device": "cpu"})["breakdown"]["trainable"]
    assert predicted == actual == trainable_parameters(CONFIG, plan) * 2

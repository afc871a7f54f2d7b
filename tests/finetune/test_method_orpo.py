"""ORPO, added as one file (finetune/methods/orpo.py): registered, planned only when asked for, estimated, trained
on the tiny model without a reference forward, saved, reloaded and merged like DPO (issue 33's worked example).
Its loss against TRL's is tests/finetune/test_losses_vs_trl.py; through the REST API, a worker and the inference
server, tests/web/test_orpo_version.py."""
import json

import pytest
from tinymodel import learnable_chat_rows, write_jsonl

from autotune.estimate import estimate
from autotune.select import select
from autotune.shapes import load_reference_config
from finetune.errors import TrainingError
from finetune.merge import merge_adapter
from finetune.methods import auto_method_for_schema, auto_methods, get_method, method_names, schema_problem
from finetune.methods.orpo import orpo_loss
from finetune.modelstore import load_model_and_tokenizer
from finetune.train import TrainSpec, train

GPU = {"gpus": [{"index": 0, "name": "Test GPU", "free_bytes": 80 * 2**30, "bf16": True,
                 "compute_capability": "9.0"}]}
PAIRS = [("ping", "pong", "no"), ("cat", "chat", "dog"), ("hello", "bonjour", "bye")]


def preference_rows(repeat=8):
    return [{"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": r} for q, a, r in PAIRS * repeat]


def spec_for(tiny_model_dir, tmp_path, files, **plan):
    base = {"method": "orpo", "rank": 8, "alpha": 16, "micro_batch": 8, "grad_accum": 1, "max_seq_len": 64,
            "learning_rate": 3e-2, "max_steps": 15, "warmup_ratio": 0.0, "max_new_tokens": 4,
            "max_eval_generations": 3, "early_stopping_patience": 0, "device": "cpu"}
    return TrainSpec.from_plan({**base, **plan}, base_model_path=str(tiny_model_dir), train_file=str(files[0]),
                               eval_file=str(files[1]), output_dir=str(tmp_path / "adapter"))


def test_orpo_is_registered_from_its_own_file_with_its_traits():
    orpo = get_method("orpo")
    assert method_names()[-1] == "orpo", "found by the package scan, after the built-in families"
    assert orpo.lora_family and orpo.paired and orpo.preference and orpo.can_merge and orpo.serves_as_lora
    assert not orpo.reference_model and get_method("dpo").reference_model
    assert not orpo.can_pack and not orpo.quantized_base
    assert orpo.plan_fields() == {"orpo_beta": float}


def test_auto_never_picks_orpo_but_a_preference_dataset_plans_it_when_asked():
    assert "orpo" not in [m.name for m in auto_methods()]
    assert auto_method_for_schema("preference") == "dpo"
    assert schema_problem("orpo", "preference", "preference") is None
    assert "ORPO needs a preference dataset" in schema_problem("orpo", "chat", "messages")
    assert "dpo or orpo" in schema_problem("lora", "preference", "preference")

    plan = select(GPU, load_reference_config("Llama-3.2-1B"), {"rows": 2000}, {"method": "orpo"})
    assert plan["method"] == "orpo" and plan["orpo_beta"] == 0.1 and plan["learning_rate"] == 8e-6
    assert plan["fused_cross_entropy"] is False, "ORPO takes log-probabilities from full logits"
    assert any(r.startswith("ORPO (LoRA), as requested") for r in plan["reasons"])
    assert any("TRL" in r and "LLaMA-Factory" in r for r in plan["reasons"]), "its defaults cite their sources"
    unasked = select(GPU, load_reference_config("Llama-3.2-1B"), {"rows": 2000}, {})
    assert unasked["method"] != "orpo"


def test_the_estimate_is_dpos_full_logit_pairs():
    """Two sequences per pair on full logits like DPO; DPO's reference forward (no gradients) peaks within the
    policy's own buffers, so dropping it leaves the peak where DPO's is."""
    shape = load_reference_config("Llama-3.2-1B")
    plan = {"micro_batch": 2, "max_seq_len": 256}
    orpo, dpo, lora = (estimate(shape, {**plan, "method": m}) for m in ("orpo", "dpo", "lora"))
    assert orpo["total_bytes"] == dpo["total_bytes"] > lora["total_bytes"]
    assert orpo["breakdown"]["logits"] == dpo["breakdown"]["logits"]


def test_orpo_trains_saves_reloads_and_merges(tiny_model_dir, tmp_path):
    rows = preference_rows()
    files = (write_jsonl(tmp_path / "p.jsonl", rows), write_jsonl(tmp_path / "pe.jsonl", rows[:6]))
    progress = []
    result = train(spec_for(tiny_model_dir, tmp_path, files), on_progress=progress.append)
    assert result.status == "succeeded"
    assert result.metrics["eval_loss"] < result.metrics["initial_eval_loss"]
    assert result.metrics["reward_accuracy"] == 1.0
    assert any("log_odds_ratio" in p and "nll_loss" in p for p in progress)
    adapter = tmp_path / "adapter"
    meta = json.loads((adapter / "tunedeck.json").read_text())
    assert meta["method"] == "orpo" and meta["plan"]["method"] == "orpo"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert {g["prompt"]: g["output"] for g in result.generations} == {"ping": "pong", "cat": "chat",
                                                                      "hello": "bonjour"}

    report = merge_adapter(tiny_model_dir, adapter, tmp_path / "merged", device="cpu")
    assert report["method"] == "orpo" and report["merged"] and report["max_abs_diff"] <= report["tolerance"]


def test_orpo_needs_no_reference_a_plain_model_without_an_adapter_trains(tiny_model_dir):
    """DPO's loss switches the adapter off for its reference; ORPO's never does, so it runs on a bare model (one
    forward per micro-batch, with gradients)."""
    import torch

    from finetune.tokenize import encode_preference

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, device="cpu", dtype="fp32")
    batch = [encode_preference(row, tokenizer, 64) for row in preference_rows(1)]
    loss, pairs, tokens, metrics = orpo_loss(model, batch, 0.1, tokenizer.pad_token_id or 0, torch.device("cpu"))
    loss.backward()
    assert pairs == 3 and tokens > 0 and torch.isfinite(loss)
    assert 0.0 <= metrics["reward_accuracy"] <= 1.0 and metrics["nll_loss"] > 0
    assert any(p.grad is not None for p in model.parameters())


def test_wrong_data_and_overrides_get_clear_errors(tiny_model_dir, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", learnable_chat_rows(8))
    with pytest.raises(TrainingError, match="ORPO needs a preference dataset"):
        train(spec_for(tiny_model_dir, tmp_path, (chat, chat), max_steps=2))
    beta = spec_for(tiny_model_dir, tmp_path, (chat, chat), orpo_beta=0.25)
    assert get_method("orpo").beta(beta) == 0.25, "the plan's own field, no TrainSpec field needed"


@pytest.mark.parametrize("method", ["dpo", "kto", "orpo"])
def test_a_beta_override_reaches_the_plan(method):
    """The method's own plan fields (plan_fields) as the user gave them, not the default (DPO's and KTO's overrides
    were dropped before ORPO's test found it)."""
    field = f"{method}_beta"
    plan = select(GPU, load_reference_config("Llama-3.2-1B"), {"rows": 2000},
                  {"method": method, "overrides": {field: 0.3}})
    assert plan[field] == 0.3 and f"{field} = 0.3 (override)." in plan["reasons"]

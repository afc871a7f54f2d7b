"""The training engine on a tiny random model: every method trains, loss falls, adapters reload, resume works."""
import json
import os

import pytest
from tinymodel import learnable_chat_rows, write_jsonl

from finetune import checkpoint as ckpt
from finetune.errors import OutOfMemory, TrainingError
from finetune.fitcheck import shrink_after_oom
from finetune.tokenize import IGNORE, encode_example, preview_segments
from finetune.train import TrainSpec, train


@pytest.fixture
def chat_files(tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", learnable_chat_rows(64))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", learnable_chat_rows(8))
    return train_file, eval_file


def _spec(tiny_model_dir, files, tmp_path, **plan):
    base = {"method": "lora", "rank": 8, "alpha": 16, "micro_batch": 8, "grad_accum": 1, "max_seq_len": 64,
            "learning_rate": 1e-2, "max_steps": 40, "warmup_ratio": 0.0, "max_new_tokens": 4,
            "max_eval_generations": 2}
    base.update(plan)
    return TrainSpec.from_plan(
        base,
        base_model_path=str(tiny_model_dir),
        train_file=str(files[0]),
        eval_file=str(files[1]),
        output_dir=str(tmp_path / "adapter"),
        checkpoint_dir=str(tmp_path / "checkpoints"),
    )


def test_assistant_only_labels_include_end_of_turn(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ping"},
                            {"role": "assistant", "content": "pong"}, {"role": "user", "content": "cat"},
                            {"role": "assistant", "content": "chat"}]}
    enc = encode_example(example, tok, 256)
    learned = tok.decode([i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE])
    assert learned == "pong<|im_end|>chat<|im_end|>"
    segments = preview_segments(example, tok)
    assert [s["text"] for s in segments if s["trained"]] == ["pong<|im_end|>", "chat<|im_end|>"]
    assert "ping" in "".join(s["text"] for s in segments if not s["trained"])


def test_truncation_is_reported(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = encode_example({"text": "word " * 200}, tok, 16)
    assert enc.truncated and len(enc.input_ids) == 16


def test_lora_learns_and_reports_every_step(tiny_model_dir, chat_files, tmp_path):
    progress, events = [], []
    # No early stopping: every answer is right long before step 40 (tests/finetune/test_early_stopping.py).
    spec = _spec(tiny_model_dir, chat_files, tmp_path, early_stopping_patience=0)
    result = train(spec, on_progress=progress.append, on_event=lambda k, m, d: events.append(k))
    assert result.status == "succeeded"
    assert [p["step"] for p in progress] == list(range(0, 41))  # step 0: the base model's eval loss
    assert progress[-1]["train_loss"] < progress[1]["train_loss"] * 0.5
    assert result.metrics["eval_loss"] < result.metrics["initial_eval_loss"] * 0.1
    assert result.metrics["eval_loss"] < 1.0
    assert "started" in events and "evaluated" in events
    assert "cpu-dropout-16-bit" in result.metrics["kernels"]  # LoRA dropout 0.05 on the CPU: the cheaper masks
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    meta = json.loads((adapter / "tunedeck.json").read_text())
    assert meta["method"] == "lora"
    assert len(result.generations) == 2 and {"prompt", "output", "reference"} <= set(result.generations[0])
    # The model learned the answers and to stop: greedy outputs equal the references.
    assert all(g["output"] == g["reference"] for g in result.generations), result.generations


def test_a_plan_can_keep_torchs_own_cpu_dropout(tiny_model_dir, chat_files, tmp_path):
    spec = _spec(tiny_model_dir, chat_files, tmp_path, max_steps=2, cpu_dropout=False, max_eval_generations=0)
    result = train(spec)
    assert result.status == "succeeded"
    assert "cpu-dropout-16-bit" not in result.metrics["kernels"]


def test_model_is_in_train_mode_with_checkpointing(tiny_model_dir, chat_files, tmp_path):
    from finetune.train import load_for_training

    spec = _spec(tiny_model_dir, chat_files, tmp_path, gradient_checkpointing=True)
    model, _ = load_for_training(spec)
    assert model.training
    base = model.get_base_model()
    assert base.is_gradient_checkpointing and base.model.layers[0].training


@pytest.mark.parametrize("method", ["dora", "ia3", "prefix", "prompt", "adapter", "qlora"])
def test_every_method_trains_and_saves(tiny_model_dir, chat_files, tmp_path, method):
    lr = {"ia3": 5e-2, "prompt": 5e-2, "prefix": 1e-2}.get(method, 1e-2)
    spec = _spec(tiny_model_dir, chat_files, tmp_path, method=method, max_steps=12, learning_rate=lr,
                 num_virtual_tokens=4, adapter_bottleneck=16)
    result = train(spec)
    assert result.status == "succeeded"
    assert result.metrics["eval_loss"] < result.metrics["initial_eval_loss"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert result.metrics["trainable_parameters"] > 0


def test_dpo_prefers_chosen(tiny_model_dir, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": r}
            for q, a, r in [("ping", "pong", "no"), ("cat", "chat", "dog"), ("hello", "bonjour", "bye")] * 8]
    files = (write_jsonl(tmp_path / "p.jsonl", rows), write_jsonl(tmp_path / "pe.jsonl", rows[:6]))
    spec = _spec(tiny_model_dir, files, tmp_path, method="dpo", max_steps=15, dpo_beta=0.5)
    progress = []
    result = train(spec, on_progress=progress.append)
    assert result.status == "succeeded"
    assert result.metrics["reward_accuracy"] == 1.0
    assert result.metrics["eval_loss"] < result.metrics["initial_eval_loss"]


def _kto_rows():
    """Unpaired feedback: each question once with a desirable answer and once with an undesirable one."""
    rows = []
    for q, good, bad in [("ping", "pong", "no"), ("cat", "chat", "dog"), ("hello", "bonjour", "bye")] * 8:
        for answer, label in ((good, True), (bad, False)):
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}],
                         "label": label})
    return rows


def test_kto_learns_desirable_over_undesirable(tiny_model_dir, tmp_path):
    rows = _kto_rows()
    files = (write_jsonl(tmp_path / "k.jsonl", rows), write_jsonl(tmp_path / "ke.jsonl", rows[:6]))
    spec = _spec(tiny_model_dir, files, tmp_path, method="kto", max_steps=15, kto_beta=0.5)
    progress = []
    result = train(spec, on_progress=progress.append)
    assert result.status == "succeeded"
    assert result.metrics["eval_loss"] < result.metrics["initial_eval_loss"]
    assert result.metrics["reward_accuracy"] > 0.5  # at step 0 the adapter is off: every log-ratio is 0, none right
    assert any("reward_margin" in p for p in progress)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_kto_labels_are_never_trained_as_plain_answers(tiny_model_dir, tmp_path):
    files = (write_jsonl(tmp_path / "k.jsonl", _kto_rows()), write_jsonl(tmp_path / "ke.jsonl", _kto_rows()[:4]))
    with pytest.raises(TrainingError, match="method kto"):
        train(_spec(tiny_model_dir, files, tmp_path, method="lora", max_steps=2))
    chat = write_jsonl(tmp_path / "chat.jsonl", learnable_chat_rows(8))
    with pytest.raises(TrainingError, match="desirable"):
        train(_spec(tiny_model_dir, (chat, chat), tmp_path, method="kto", max_steps=2))


def test_dpo_refuses_chat_data(tiny_model_dir, chat_files, tmp_path):
    with pytest.raises(TrainingError, match="preference"):
        train(_spec(tiny_model_dir, chat_files, tmp_path, method="dpo", max_steps=2))


def test_cancel_checkpoints_and_resume_continues(tiny_model_dir, chat_files, tmp_path):
    steps = []

    def stop_after_8():
        return len(steps) >= 8

    spec = _spec(tiny_model_dir, chat_files, tmp_path, max_steps=20, checkpoint_every_steps=5)
    result = train(spec, on_progress=lambda p: p["step"] and steps.append(p["step"]), should_stop=stop_after_8)
    assert result.status == "cancelled"
    saved = ckpt.latest(tmp_path / "checkpoints")
    assert saved is not None and saved.name == "step-8"
    events, more = [], []
    spec = _spec(tiny_model_dir, chat_files, tmp_path, max_steps=20, checkpoint_every_steps=5)
    result = train(spec, on_progress=lambda p: more.append(p["step"]), on_event=lambda k, m, d: events.append(k))
    assert result.status == "succeeded"
    assert "resumed" in events
    assert more == list(range(9, 21))  # no step-0 evaluation on resume
    assert not (tmp_path / "checkpoints").exists()  # cleared once the adapter is saved


def test_resume_matches_uninterrupted_run(tiny_model_dir, chat_files, tmp_path):
    straight = train(_spec(tiny_model_dir, chat_files, tmp_path / "a", max_steps=10, dropout=0.0))
    calls = []
    spec = _spec(tiny_model_dir, chat_files, tmp_path / "b", max_steps=10, dropout=0.0)
    train(spec, on_progress=lambda p: p["step"] and calls.append(p), should_stop=lambda: len(calls) >= 4)
    resumed = train(_spec(tiny_model_dir, chat_files, tmp_path / "b", max_steps=10, dropout=0.0))
    assert resumed.metrics["final_step_loss"] == pytest.approx(straight.metrics["final_step_loss"], rel=1e-3)


def test_oom_shrinks_micro_batch_keeping_effective_batch(tiny_model_dir, chat_files, tmp_path):
    spec = _spec(tiny_model_dir, chat_files, tmp_path, micro_batch=8, grad_accum=2)
    assert "micro-batch 4 x 4" in shrink_after_oom(spec)
    assert spec.micro_batch * spec.grad_accum == 16
    spec.micro_batch, spec.grad_accum = 1, 16
    assert shrink_after_oom(spec) == "gradient checkpointing on"
    assert shrink_after_oom(spec) is None


def test_oom_during_training_is_recovered(tiny_model_dir, chat_files, tmp_path, monkeypatch):
    import finetune.train as t

    real = t.token_loss_sum
    state = {"raised": False}

    def flaky(model, ids, labels, mask, position_ids=None):
        if ids.shape[0] > 4 and not state["raised"]:
            state["raised"] = True
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, ids, labels, mask, position_ids)

    monkeypatch.setattr(t, "token_loss_sum", flaky)
    events = []
    result = train(_spec(tiny_model_dir, chat_files, tmp_path, max_steps=3),
                   on_event=lambda k, m, d: events.append((k, d)))
    assert result.status == "succeeded"
    assert result.plan["micro_batch"] == 4 and result.plan["grad_accum"] == 2
    assert result.metrics["oom_recoveries"] == 1
    assert [k for k, _ in events].count("oom_recovered") == 1


def test_oom_at_the_floor_is_a_clear_error(tiny_model_dir, chat_files, tmp_path, monkeypatch):
    import finetune.train as t

    def always(*a, **k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(t, "token_loss_sum", always)
    with pytest.raises(OutOfMemory, match="micro-batch 1"):
        train(_spec(tiny_model_dir, chat_files, tmp_path, micro_batch=1, max_steps=2))


def test_examples_with_nothing_to_learn_are_a_clear_error(tiny_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "x"}]}] * 4
    files = (write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "e.jsonl", rows))
    with pytest.raises(TrainingError, match="max_seq_len"):
        train(_spec(tiny_model_dir, files, tmp_path, max_seq_len=16, max_steps=2))


def test_packing_trains(tiny_model_dir, chat_files, tmp_path):
    events = []
    result = train(_spec(tiny_model_dir, chat_files, tmp_path, packing=True, max_steps=5),
                   on_event=lambda kind, message, data: events.append(kind))
    assert result.status == "succeeded"
    assert result.metrics["train_examples"] < 64
    assert result.plan["packing"] is True and "packing_off" not in events
    assert result.metrics["loss_path"] == "fused-linear-cross-entropy"


def test_unknown_method_is_rejected(tiny_model_dir, chat_files, tmp_path):
    with pytest.raises(TrainingError, match="Unknown method"):
        _spec(tiny_model_dir, chat_files, tmp_path, method="magic")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_smollm2_lora_few_steps(tmp_path, method):
    path = os.environ.get("TUNEDECK_SMOLLM_DIR")
    if not path or not os.path.isdir(path):
        pytest.skip("TUNEDECK_SMOLLM_DIR not prepared (scripts/test.sh prepares it)")
    files = (write_jsonl(tmp_path / "t.jsonl", learnable_chat_rows(16)), write_jsonl(tmp_path / "e.jsonl",
                                                                                      learnable_chat_rows(4)))
    spec = TrainSpec.from_plan(
        {"method": method, "rank": 8, "alpha": 16, "micro_batch": 4, "max_seq_len": 64, "learning_rate": 1e-3,
         "max_steps": 6, "max_eval_generations": 1, "max_new_tokens": 8, "target_modules": ["q_proj", "v_proj"]},
        base_model_path=path, train_file=str(files[0]), eval_file=str(files[1]),
        output_dir=str(tmp_path / "adapter"), checkpoint_dir=str(tmp_path / "ck"))
    result = train(spec)
    assert result.status == "succeeded"
    assert result.metrics["eval_loss"] < result.metrics["initial_eval_loss"]


def test_fit_check_replans_a_batch_that_does_not_fit(tiny_model_dir, tmp_path):
    """The estimate says it fits, the longest batch does not: corrected before the first real step."""
    import torch

    from finetune.train import load_encoded, load_for_training, measure_step_peak, worst_case_batch

    rows = learnable_chat_rows(56) + [
        {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "long " * 40}]}
    ] * 8
    files = (write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "e.jsonl", learnable_chat_rows(4)))
    probe = _spec(tiny_model_dir, files, tmp_path, max_seq_len=128)
    model, tok = load_for_training(probe)
    train_rows, _ = load_encoded(files[0], tok, probe)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    peak = {mb: measure_step_peak(model, probe, worst_case_batch(train_rows, mb), opt, tok.pad_token_id,
                                  torch.device("cpu")) for mb in (8, 4, 2)}
    assert peak[8] > peak[4] > peak[2]
    # A budget between the 2- and the 4-example batch: the estimate claimed micro-batch 8 fits.
    capacity = (peak[2] + peak[4]) // 2
    memory = {"total_bytes": capacity // 2, "capacity_bytes": capacity, "breakdown": {}}
    spec = _spec(tiny_model_dir, files, tmp_path, max_seq_len=128, micro_batch=8, grad_accum=2, max_steps=3,
                 memory=memory)
    spec.plan["memory"] = memory
    events = []
    result = train(spec, on_event=lambda k, m, d: events.append((k, m, d)))
    assert result.status == "succeeded"
    assert result.plan["micro_batch"] == 2 and result.plan["grad_accum"] == 8  # same effective batch
    fits = [d for k, m, d in events if k == "fit_check"]
    assert [f["fits"] for f in fits] == [False, False, True]
    assert result.metrics["fit_check"]["measured_bytes"] <= capacity
    started = [i for i, (k, _, _) in enumerate(events) if k == "started"]
    assert started and started[0] > max(i for i, (k, _, _) in enumerate(events) if k == "fit_check")


def test_fit_check_with_nothing_left_is_a_clear_error(tiny_model_dir, chat_files, tmp_path):
    memory = {"total_bytes": 1, "capacity_bytes": 1, "breakdown": {}}
    spec = _spec(tiny_model_dir, chat_files, tmp_path, micro_batch=1, gradient_checkpointing=True, max_steps=2)
    spec.plan["memory"] = memory
    with pytest.raises(OutOfMemory, match="Fit check"):
        train(spec)

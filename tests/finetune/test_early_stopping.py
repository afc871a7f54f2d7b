"""Early stopping on validation loss, or on the exact match of greedy answers when the answers are short, and the
adapter saved is the best evaluation's, not the last step's."""
import random

import pytest
from tinymodel import write_jsonl

from finetune.train import TrainSpec, evaluate, train

WORDS = ["cat", "dog", "red", "blue", "one", "two", "sky", "sea", "sun", "hat", "map", "cup"]


def _random_pairs(n, seed):
    """Answers that have nothing to do with their questions: all a model can do is memorise them, so the loss on
    other such rows falls while it learns the answer format and then rises as it memorises (it overfits)."""
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": f"{rng.choice(WORDS)} {rng.choice(WORDS)} {i}"},
                          {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(4))}]}
            for i in range(n)]


def _spec(tiny_model_dir, tmp_path, **plan):
    base = {"method": "lora", "rank": 16, "alpha": 32, "micro_batch": 8, "grad_accum": 1, "max_seq_len": 64,
            "learning_rate": 2e-2, "max_steps": 150, "warmup_ratio": 0.0, "eval_every_steps": 3,
            "early_stopping_patience": 3, "early_stopping_metric": "eval_loss", "max_eval_generations": 0,
            "dropout": 0.0}
    base.update(plan)
    return TrainSpec.from_plan(
        base, base_model_path=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp_path / "train.jsonl", _random_pairs(16, 1))),
        eval_file=str(write_jsonl(tmp_path / "eval.jsonl", _random_pairs(16, 2))),
        output_dir=str(tmp_path / "adapter"))


def _eval_loss_of_saved_adapter(spec):
    from finetune.merge import attach_adapter
    from finetune.modelstore import load_model_and_tokenizer
    from finetune.train import load_encoded

    base, tokenizer = load_model_and_tokenizer(spec.base_model_path, device="cpu")
    model = attach_adapter(base, spec.output_dir)
    rows, _ = load_encoded(spec.eval_file, tokenizer, spec)
    return evaluate(model, rows, spec, tokenizer.pad_token_id)["eval_loss"]


def test_training_stops_early_on_an_overfitting_task_and_keeps_the_best_adapter(tiny_model_dir, tmp_path):
    events = []
    spec = _spec(tiny_model_dir, tmp_path)
    result = train(spec, on_event=lambda kind, message, data: events.append((kind, data)))
    m = result.metrics
    assert result.status == "succeeded"
    assert m["stopped_early"] is True
    assert m["steps"] < 150
    # Patience 3 at an evaluation every 3 steps: it stopped 9 steps after the best, whose loss beat the last.
    assert m["steps"] - m["best_step"] == 9
    assert m["best_eval_loss"] < m["last_eval_loss"]
    assert m["eval_loss"] == m["best_eval_loss"]
    assert [d["best_step"] for kind, d in events if kind == "stopped_early"] == [m["best_step"]]
    # The folder holds the best step's weights: its validation loss is the recorded best, not the last one.
    assert _eval_loss_of_saved_adapter(spec) == pytest.approx(m["best_eval_loss"], rel=1e-5)


def test_patience_zero_trains_to_the_end_and_still_keeps_the_best(tiny_model_dir, tmp_path):
    spec = _spec(tiny_model_dir, tmp_path, early_stopping_patience=0, max_steps=24)
    m = train(spec).metrics
    assert m["stopped_early"] is False and m["steps"] == 24
    assert m["best_step"] <= 24 and m["eval_loss"] == m["best_eval_loss"] <= m["last_eval_loss"]
    assert _eval_loss_of_saved_adapter(spec) == pytest.approx(m["best_eval_loss"], rel=1e-5)


def test_validation_costs_a_bounded_share_of_a_short_run():
    """8 evaluations of 40 validation rows on a 45-step pass of 360 rows were a third of the run's compute; a
    short run now evaluates twice (the middle and the end), a long one 8 times, and a set interval is kept."""
    from types import SimpleNamespace

    from finetune.train import _eval_every

    def every(total_steps, eval_rows, **spec):
        fields = {"eval_every_steps": None, "early_stopping_patience": 3, "micro_batch": 8, "grad_accum": 1, **spec}
        return _eval_every(SimpleNamespace(spec=SimpleNamespace(**fields), total_steps=total_steps,
                                           eval_rows=[None] * eval_rows))

    assert every(45, 40) == 23  # steps 23 and 45
    assert every(1875, 200) == 235  # 15,000 rows: 8 evaluations
    assert every(135, 40) == 20  # three passes of 360 rows: 7 evaluations, about 10 % of the compute
    assert every(45, 40, eval_every_steps=5) == 5
    assert every(100, 0, early_stopping_patience=0) == 25  # no validation rows: 4 progress points, as before


def _chat_rows(pairs):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


def test_short_answers_make_early_stopping_watch_exact_match_and_long_ones_the_loss(tmp_path):
    from finetune.errors import TrainingError
    from finetune.validation import stopping_metric

    labels = write_jsonl(tmp_path / "labels.jsonl", _chat_rows([("ticket 1", "billing"), ("ticket 2", "Bug")]))
    prose = write_jsonl(tmp_path / "prose.jsonl", _chat_rows([("q", "a long answer of many words")] * 3))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": [{"role": "user", "content": "q"}], "chosen": "yes",
                                                     "rejected": "no"}])

    def metric(eval_file, **spec):
        fields = {"early_stopping_metric": "auto", "method": "lora", "eval_file": str(eval_file), **spec}
        return stopping_metric(TrainSpec(base_model_path="m", train_file="t", output_dir="o", **fields))

    assert metric(labels) == "exact_match"
    assert metric(prose) == "eval_loss"
    assert metric(prose, early_stopping_metric="exact_match") == "exact_match"  # asked for: any reference answer
    assert metric(labels, early_stopping_metric="eval_loss") == "eval_loss"
    assert metric(pairs, method="dpo") == "eval_loss"  # two answers a row: the loss (reward margin) decides
    with pytest.raises(TrainingError, match="early_stopping_metric must be one of auto, eval_loss, exact_match"):
        metric(labels, early_stopping_metric="accuracy")


def test_the_best_evaluation_is_the_one_with_most_answers_right_not_the_lowest_loss():
    """Issue 32: on 12 validation rows of new labels the loss was lowest two passes before most labels were right.
    Ties in exact match (common on a dozen rows) keep the lower loss's weights but do not put off the stop."""
    from types import SimpleNamespace

    import torch

    from finetune.train import RunClock, track_best

    def run_through(history, patience=2):
        weight = torch.zeros(1)
        run = SimpleNamespace(state={"step": 0}, params=[weight], total_steps=100,
                              spec=SimpleNamespace(early_stopping_patience=patience))
        clock, events = RunClock(), []
        for step, (match, loss) in enumerate(history, start=1):
            run.state["step"] = step
            weight.fill_(step)
            clock.last_eval = {"eval_loss": loss, "val_exact_match": match}
            track_best(run, clock, lambda kind, message, data: events.append((kind, message)))
            if clock.stopped_early:
                break
        return clock, events

    # (exact match, loss) per evaluation: the loss falls to 0.7 while the answers are past their best
    clock, events = run_through([(0.25, 1.0), (0.5, 1.3), (0.5, 1.2), (0.42, 0.9), (0.33, 0.7)])
    assert clock.best["step"] == 3 and clock.best["weights"][0].item() == 3  # 0.5 right at loss 1.2
    assert events == [("stopped_early", ("Stopped early at step 4 of 100: no more validation answers right in 2 "
                                         "evaluations; keeping step 3 (eval loss 1.2000, validation exact match "
                                         "0.5)."))]
    # Answers all right early, the loss still creeping down: the lower-loss tie is kept, and the run stops.
    clock, events = run_through([(0.5, 1.0), (1.0, 0.6), (1.0, 0.5), (1.0, 0.45), (1.0, 0.4)])
    assert clock.stopped_early and clock.best["step"] == 4 and clock.best["eval"]["eval_loss"] == 0.45
    # More answers right resets the count however the loss moves.
    clock, _ = run_through([(0.1, 1.0), (0.1, 1.1), (0.2, 1.5), (0.2, 1.6), (0.3, 2.0)])
    assert not clock.stopped_early and clock.best["step"] == 5
    # Before any answer is right (new labels, first passes) a falling loss is the progress there is.
    clock, _ = run_through([(0.0, 3.0), (0.0, 2.0), (0.0, 1.5), (0.0, 1.2), (0.1, 1.1)])
    assert not clock.stopped_early and clock.best["step"] == 5


def test_a_run_on_short_answers_keeps_the_checkpoint_with_the_answers_right(tiny_model_dir, tmp_path):
    from tinymodel import learnable_chat_rows

    from finetune.validation import answer_exact_match, reference_prompts

    events = []
    spec = _spec(tiny_model_dir, tmp_path, early_stopping_metric="auto", learning_rate=1e-2, max_steps=40,
                 eval_every_steps=5, early_stopping_patience=3)
    spec.train_file = str(write_jsonl(tmp_path / "train.jsonl", learnable_chat_rows(64)))
    spec.eval_file = str(write_jsonl(tmp_path / "eval.jsonl", learnable_chat_rows(8)))
    result = train(spec, on_event=lambda kind, message, data: events.append((kind, message, data)))
    m = result.metrics
    assert result.status == "succeeded"
    started = next(message for kind, message, _ in events if kind == "started")
    assert "early stopping watches the exact match of 8 validation answers" in started
    scored = [data["val_exact_match"] for kind, _, data in events if kind == "evaluated"]
    assert scored[0] == 0.0 and m["val_exact_match"] == max(scored) == 1.0  # the base model got none right
    # The folder holds the best evaluation's weights: its greedy answers are the ones that scored.
    from finetune.merge import attach_adapter
    from finetune.modelstore import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(spec.base_model_path, device="cpu")
    model = attach_adapter(base, spec.output_dir)
    assert answer_exact_match(model, tokenizer, reference_prompts(spec.eval_file, 64), spec) == 1.0

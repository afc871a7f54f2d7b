"""Early stopping on validation loss, and the adapter saved is the best evaluation's, not the last step's."""
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
            "early_stopping_patience": 3, "max_eval_generations": 0, "dropout": 0.0}
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

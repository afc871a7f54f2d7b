"""The search stage on the tiny model: trials run and report curves, a bad learning rate is pruned, a candidate
over the memory cap never runs, and the winner's parameters become the final plan."""
import json

import pytest
from tinymodel import learnable_chat_rows, write_jsonl

from autotune import estimate, search

pytest.importorskip("optuna")


class Recorder(search.Observer):
    def __init__(self):
        self.started_numbers, self.finished_records = [], []

    def started(self, record):
        self.started_numbers.append(record.number)

    def finished(self, record):
        self.finished_records.append(record)


def _setup(tiny_model_dir, tmp_path, capacity=None):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    plan = {"method": "lora", "rank": 8, "alpha": 16, "target_modules": "all-linear", "micro_batch": 16,
            "grad_accum": 1, "max_seq_len": 64, "learning_rate": 2e-4, "epochs": 1, "device": "cpu",
            "dtype": "fp32", "warmup_ratio": 0.0, "gradient_checkpointing": False, "reasons": ["rules"]}
    if capacity is not None:
        plan["memory"] = {"total_bytes": 0, "capacity_bytes": capacity}
    return search.SearchSetup(
        plan=plan, model_config=config, base_model_path=str(tiny_model_dir),
        train_file=str(write_jsonl(tmp_path / "train.jsonl", learnable_chat_rows(64))),
        eval_file=str(write_jsonl(tmp_path / "eval.jsonl", learnable_chat_rows(8))),
        work_dir=str(tmp_path / "trials"), trial_steps=6, eval_every=2, score_examples=4, max_new_tokens=4,
        learning_rates=(1e-3, 5e-2))


def test_study_prunes_a_bad_learning_rate_skips_what_does_not_fit_and_uses_the_winner(tiny_model_dir, tmp_path):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    # room for micro-batch 8 at the largest rank, not for 16
    largest = {"method": "dora", "rank": 32, "target_modules": "all-linear", "max_seq_len": 64, "device": "cpu",
               "dtype": "fp32", "gradient_checkpointing": False}
    capacity = estimate(config, {**largest, "micro_batch": 8})["total_bytes"]
    assert estimate(config, {**largest, "method": "lora", "rank": 4, "micro_batch": 16})["total_bytes"] > capacity
    setup = _setup(tiny_model_dir, tmp_path, capacity)
    assert search.choose_metric(setup.eval_file) == "exact_match"

    study = search.open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "job-1", "exact_match", eval_every=2)
    common = {"rank": 8, "alpha_ratio": 2.0, "target_set": "all-linear", "method": "lora"}
    study.enqueue_trial({**common, "learning_rate": 3e-2, "micro_batch": 4})  # learns the pairs in a few steps
    study.enqueue_trial({**common, "learning_rate": 1e-3 * 1.0001, "micro_batch": 4, "rank": 4,
                         "alpha_ratio": 1.0})  # a rate far too small to move in 6 steps
    study.enqueue_trial({**common, "learning_rate": 3e-2, "micro_batch": 16})  # over the memory cap
    observer = Recorder()
    ran = search.run_trials(study, setup, search.Budget(max_trials=4), observer)

    assert ran == 4
    records = {r.number: r for r in search.trial_records(study)}
    assert records[0].state == search.STATE_COMPLETE and records[0].score is not None
    assert [step for step, _ in records[0].curve] == [2, 4, 6]
    assert records[1].state == search.STATE_PRUNED and len(records[1].curve) < 3
    assert records[2].state == search.STATE_PRUNED and "not run" in records[2].reason
    assert 2 not in observer.started_numbers and records[2].curve == []  # never trained
    assert {r.number for r in observer.finished_records} == {0, 1, 2, 3}

    assert records[0].tokens_per_second > 0  # its training steps timed, for the cost check below
    affordable, _ = search.affordable_records(list(records.values()), setup.plan)
    winner = search.best_record(affordable)
    final = search.apply_winner(setup.plan, list(records.values()), config)
    assert final["learning_rate"] == pytest.approx(winner.params["learning_rate"])
    assert final["rank"] == winner.params["rank"] and final["micro_batch"] == winner.params["micro_batch"]
    assert final["alpha"] == winner.params["rank"] * winner.params["alpha_ratio"]
    assert final["memory"]["total_bytes"] <= capacity
    assert any(r.startswith("Learning rate") and "best of 4 trials, validation exact match" in r
               for r in final["reasons"])
    assert final["reasons"][-1] == "rules"


def test_the_rules_own_settings_are_the_first_trial(tiny_model_dir, tmp_path):
    setup = _setup(tiny_model_dir, tmp_path)
    setup.plan.update(micro_batch=8, learning_rate=2e-3)
    space = {**search.search_space(setup.plan, setup.model_config), "learning_rates": setup.learning_rates}
    planned = search.planned_params(setup.plan, space, setup.model_config)
    assert planned == {"learning_rate": 2e-3, "rank": 8, "alpha_ratio": 2.0, "target_set": "all-linear",
                       "method": "lora", "micro_batch": 8}
    assert search.planned_params({**setup.plan, "alpha": 24}, space, setup.model_config) is None  # ratio 3
    assert search.planned_params({**setup.plan, "grad_accum": 2}, space, setup.model_config) is None

    study = search.open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "job-2", "exact_match", eval_every=2)
    assert search.run_trials(study, setup, search.Budget(max_trials=1)) == 1
    [first] = search.trial_records(study)
    assert first.params == pytest.approx(planned) and first.tokens_per_second > 0
    assert search.run_trials(study, setup, search.Budget(max_trials=2)) == 1  # not enqueued a second time
    assert search.trial_records(study)[1].params != first.params


def test_a_winner_that_trains_much_slower_than_the_plan_is_left_out():
    # Measured: 8-step trials on a 400-row task crowned DoRA at micro-batch 4, whose final run took 2.7x the rules'.
    plan = {"method": "lora", "micro_batch": 8}
    def trial(number, method, micro_batch, score, speed, state=search.STATE_COMPLETE):
        return search.TrialRecord(number, {"method": method, "micro_batch": micro_batch, "learning_rate": 2e-4},
                                  state, score, "exact_match", [[8, 0.5]], 10.0, "", speed)
    records = [trial(0, "lora", 8, 0.80, 250.0), trial(1, "dora", 4, 0.90, 95.0), trial(2, "lora", 4, 0.85, 220.0),
               trial(3, "lora", 8, None, 260.0, search.STATE_PRUNED)]
    kept, notes = search.affordable_records(records, plan)
    assert [r.number for r in kept] == [0, 2, 3]
    assert search.best_record(kept).number == 2  # 220 tokens/s is within 1.3x of the plan's 260
    assert len(notes) == 1 and notes[0].startswith("Trial 1 was left out: it trained at 95 tokens/s, 2.7x slower "
                                                   "than the planned settings")
    untimed = [trial(0, "lora", 8, 0.8, None), trial(1, "dora", 4, 0.9, None)]
    assert search.affordable_records(untimed, plan) == (untimed, [])  # nothing measured: nothing left out
    lost = [trial(0, "lora", 8, None, 300.0, search.STATE_PRUNED), trial(1, "dora", 4, 0.9, 95.0),
            trial(2, "lora", 4, 0.8, 200.0)]  # the planned settings were pruned: the quickest that learned counts
    kept, notes = search.affordable_records(lost, plan)
    assert search.best_record(kept).number == 2 and "slower than the fastest completed trial" in notes[0]
    unlike = [trial(0, "lora", 4, 0.8, 250.0), trial(1, "dora", 2, 0.9, 60.0)]
    assert search.affordable_records(unlike, plan) == (unlike, [])  # no trial at the plan's settings to compare


def test_budget_reads_in_words_and_skips_when_too_small():
    plan = {"method": "lora", "micro_batch": 8, "grad_accum": 1, "epochs": 1}
    budget = search.plan_budget(plan, rows=4000, mean_tokens=60, tokens_per_second=400, source="measured")
    assert budget["enabled"] and budget["seconds"] == pytest.approx(0.3 * 4000 * 60 / 400, rel=0.01)
    assert "Search first" in budget["summary"] and "30% of the final training's longest time" in budget["summary"]
    small = search.plan_budget(plan, rows=40, mean_tokens=60, tokens_per_second=400, source="measured")
    assert not small["enabled"] and "fewer than" in small["summary"]
    forced = search.plan_budget(plan, rows=40, mean_tokens=60, tokens_per_second=400, source="measured", trials=6)
    assert forced["enabled"] and forced["max_trials"] == 6
    skipped = search.plan_budget(plan, rows=4000, mean_tokens=60, tokens_per_second=400, source="x", enabled=False)
    assert not skipped["enabled"] and "skipped as asked" in skipped["summary"]


def test_a_chosen_method_searches_only_when_asked():
    plan = {"method": "lora", "micro_batch": 8, "grad_accum": 1, "epochs": 1}
    chosen = search.plan_budget(plan, rows=4000, mean_tokens=60, tokens_per_second=400, source="m",
                                on_by_default=False)
    assert not chosen["enabled"] and "a method was chosen" in chosen["summary"]
    asked = search.plan_budget(plan, rows=4000, mean_tokens=60, tokens_per_second=400, source="m",
                               on_by_default=False, minutes=2)
    assert asked["enabled"] and asked["seconds"] == 120
    ia3 = search.plan_budget({**plan, "method": "ia3"}, rows=4000, mean_tokens=60, tokens_per_second=400, source="m")
    assert not ia3["enabled"] and "not searched" in ia3["summary"]


def test_a_small_dataset_is_searched_by_default_for_its_learning_rate():
    # Issue 32: 108 training rows of new labels; the rules' plan now has a 20-pass ceiling (validation stops it),
    # and 30 % of that fits the learning-rate ladder, so the search is on and its budget reads in minutes.
    from autotune import select
    from tests.autotune.helpers import config, cpu_inventory, dataset

    plan = select(cpu_inventory(), config("GPT-2"), dataset(rows=108, p99=128, longest=160), {"method": "auto"})
    assert plan["epochs"] == 20
    budget = search.plan_budget(plan, rows=108, mean_tokens=80, tokens_per_second=150, source="measured")
    assert budget["enabled"] and budget["searched"] == "learning_rate" and budget["expected_trials"] >= 3
    assert budget["final_steps"] == 270 and budget["seconds"] == pytest.approx(0.3 * 270 * 8 * 80 / 150, rel=0.01)
    summary = budget["summary"]
    assert summary.startswith("Final training about 19 min at most") and "Search first: at most 6 min" in summary
    assert "the learning rate (0.0002, 0.0006, 0.002 first)" in summary
    large = search.plan_budget({**plan, "epochs": 1}, rows=200_000, mean_tokens=60, tokens_per_second=400,
                               source="measured")
    assert large["enabled"] and large["searched"] == "all" and large["trial_steps"] == search.MAX_TRIAL_STEPS


def test_the_ladder_runs_first_only_the_rate_varies_and_the_model_is_loaded_once(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    from finetune import modelstore

    setup = _setup(tiny_model_dir, tmp_path)
    setup.plan.update(learning_rate=2e-3, micro_batch=8, epochs=5, early_stopping_patience=2)
    setup.plan["memory"] = {**estimate(setup.model_config, setup.plan), "capacity_bytes": 10**12}
    loads = []
    real = modelstore.load_model_and_tokenizer

    def counted(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(modelstore, "load_model_and_tokenizer", counted)
    study = search.open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "job-3", "exact_match", eval_every=2)
    budget = search.Budget(max_trials=3, searched="learning_rate", final_steps=40)
    assert search.run_trials(study, setup, budget) == 3
    records = search.trial_records(study)
    assert [r.params["learning_rate"] for r in records] == pytest.approx([2e-3, 6e-3, 2e-2])
    assert all({k: v for k, v in r.params.items() if k != "learning_rate"} ==
               {"rank": 8, "alpha_ratio": 2.0, "target_set": "all-linear", "method": "lora", "micro_batch": 8}
               for r in records)
    assert all(r.state != search.STATE_PRUNED for r in records)  # the ladder runs to the end, never pruned
    assert study.user_attrs["ladder_trials"] == 3
    assert len(loads) == 1  # three trials, one load from disk
    assert modelstore.load_model_and_tokenizer is counted  # the loader is put back
    final = search.apply_winner(setup.plan, records, setup.model_config)
    winner = final["search_result"]["winner"]
    assert final["learning_rate"] == pytest.approx(records[winner].params["learning_rate"])
    assert final["epochs"] == 5 and final["early_stopping_patience"] == 2  # the rules' length: a ceiling
    assert any(r.startswith("Learning rate") and "best of 3 trials" in r for r in final["reasons"])
    assert "Not varied by the search, so the rules' (or your) values: rank, alpha/rank, target modules, method, " \
           "micro-batch." in final["reasons"]
    assert any(r.startswith("Length: up to 5 epochs; trial ") for r in final["reasons"])


def test_the_ladder_runs_whole_even_when_its_trials_outrun_the_time_budget(tiny_model_dir, tmp_path):
    setup = _setup(tiny_model_dir, tmp_path)
    setup.plan.update(learning_rate=2e-3, micro_batch=8, epochs=5, early_stopping_patience=2)
    setup.plan["memory"] = {**estimate(setup.model_config, setup.plan), "capacity_bytes": 10**12}
    study = search.open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "job-4", "exact_match", eval_every=2)
    # A budget the first trial alone overruns: the three rates the plan named still run, and nothing after them.
    budget = search.Budget(seconds=0.01, trial_seconds=1.0, searched="learning_rate", final_steps=40)
    assert search.run_trials(study, setup, budget) == 3
    assert [r.params["learning_rate"] for r in search.trial_records(study)] == pytest.approx([2e-3, 6e-3, 2e-2])


def test_a_trial_warms_up_as_long_as_the_final_run_will():
    assert search.trial_warmup_ratio({"warmup_ratio": 0.03}, 10, 280) == pytest.approx(0.85)
    assert int(0.85 * 10) == int(0.03 * 280) == 8
    assert search.trial_warmup_ratio({}, 8, 300) == pytest.approx(9.5 / 8)  # longer than the trial: all warmup
    assert search.trial_warmup_ratio({"warmup_ratio": 0.03}, 10, None) == 0.03
    assert search.trial_warmup_ratio({"warmup_ratio": 0.0}, 10, 280) == 0.0


def test_only_a_cpu_plan_with_room_for_a_second_copy_keeps_the_model():
    plan = {"device": "cpu", "method": "lora",
            "memory": {"total_bytes": 3 * 10**9, "capacity_bytes": 8 * 10**9, "breakdown": {"weights": 10**9}}}
    assert search.keeps_a_copy(plan)
    assert not search.keeps_a_copy({**plan, "device": "cuda"})
    assert not search.keeps_a_copy({**plan, "method": "qlora"})
    assert not search.keeps_a_copy({**plan, "memory": {**plan["memory"], "capacity_bytes": 35 * 10**8}})
    assert not search.keeps_a_copy({"device": "cpu", "method": "lora"})  # no estimate: no second copy


def test_a_trial_watched_by_exact_match_is_scored_by_it_without_generating_again():
    """The trial's early stopping already answered the validation prompts at each evaluation and kept the best
    (finetune/validation.py); greedy answers at its end are needed only for token F1 or when nothing watched."""
    assert not search.scored_by_generations({}, "exact_match")
    assert search.scored_by_generations({"early_stopping_metric": "eval_loss"}, "exact_match")
    assert search.scored_by_generations({}, "token_f1")
    assert not search.scored_by_generations({}, "eval_loss")
    result = type("Result", (), {"metrics": {"val_exact_match": 0.75, "eval_loss": 1.0}, "generations": []})()
    assert search.score(result, "exact_match") == 0.75

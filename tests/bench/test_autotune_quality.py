"""bench/autotune_quality.py and its task family (issue 32): every generator gives valid rows of its kind, the
tuning and held-out halves are disjoint and fixed by the printed seed and rule, and a smoke run on the tiny model
prints both halves, the grid, the auto path, the goal, and the trainer-gap arms at identical settings."""
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# By its path: "bench" is also this test folder's package name.
_spec = importlib.util.spec_from_file_location("task_family", ROOT / "bench" / "task_family.py")
family = sys.modules.setdefault("task_family", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(family)
KINDS = {"classification with arbitrary labels", "classification with ordinary labels", "extraction to JSON",
         "rewriting", "routing with two factors", "short generation", "preference"}


def run_bench(*args, timeout=1800):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "autotune_quality.py"), *args],
                          check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ------------------------------------------------------------------------ the family, without a model


@pytest.mark.parametrize("generator", sorted(family.GENERATORS))
def test_every_generator_produces_valid_rows_of_its_kind(generator):
    train, test = family.make_rows(generator, 300, 40, seed=3)
    assert len(train) == 300 and len(test) == 40
    for row in train + test:
        assert family.problems(generator, row) == [], row
    preference = family.GENERATORS[generator].kind == "preference"
    assert all(("chosen" in row) == preference for row in train + test)
    test_prompts = {family.prompt_of(r) for r in test}
    assert len(test_prompts) == 40 and not test_prompts & {family.prompt_of(r) for r in train}
    assert len({family.answer_of(r) for r in train}) > 1  # more than one answer to learn
    again, _ = family.make_rows(generator, 300, 40, seed=3)
    assert again == train  # the seed fixes the rows


def test_the_checks_catch_rows_of_the_wrong_kind():
    assert family.problems("labels", family.chat_row("Tag this ticket.\nTicket: hi", "billing"))
    assert family.problems("extract", family.chat_row("Message: Ana wants 2 mugs in Oslo",
                                                      '{"name": "Ana", "item": "mug", "qty": 2, "city": "Oslo"}'))
    assert family.problems("extract", family.chat_row("Message: Ana wants 2 mugs in Oslo",
                                                      '{"name":"Ivan","item":"mug","qty":2,"city":"Oslo"}'))
    assert family.problems("route2", family.chat_row("Route this.", "sales"))
    assert family.problems("dates", family.chat_row("Convert 1 May 2020", "May 1, 2020"))
    assert family.problems("prefer", {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "a"})
    assert family.problems("intent", {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"})


def test_the_family_spans_the_kinds_and_sizes_asked_for():
    assert len(family.GENERATORS) >= 8
    assert KINDS <= {g.kind for g in family.GENERATORS.values()}
    sizes = [rows for _, rows in family.TASKS.values()]
    assert min(sizes) == 60 and max(sizes) == 5000
    assert {g for g, _ in family.TASKS.values()} == set(family.GENERATORS)


def test_halves_are_disjoint_fixed_by_the_seed_and_stratified():
    halves = family.split()
    tune, held_out = set(halves["tune"]), set(halves["held-out"])
    assert not tune & held_out and tune | held_out == set(family.TASKS)
    assert abs(len(tune) - len(held_out)) <= 1
    assert family.split() == halves and family.split(seed=family.SPLIT_SEED) == halves  # no randomness but the seed
    shuffled = list(family.TASKS)
    random.Random(1).shuffle(shuffled)
    assert family.split(shuffled) == halves  # the order tasks are listed in does not matter
    assert family.split(seed=7) != halves
    for generator in family.GENERATORS:  # a kind with several sizes is tuned on and judged on
        names = [n for n, (g, _) in family.TASKS.items() if g == generator]
        if len(names) > 1:
            assert set(names) & tune and set(names) & held_out, generator
    assert all(family.half_of(n) == ("tune" if n in tune else "held-out") for n in family.TASKS)


# ------------------------------------------------------------------------ the bench on the tiny model


@pytest.fixture(scope="module")
def smoke(tiny_model_dir, tmp_path_factory):
    """One quick run over a task of each half, with every arm: the grid, the auto path (search forced to 2
    trials), and the trainer-gap arms at identical settings."""
    out = tmp_path_factory.mktemp("autotune-quality") / "report.json"
    tune = next(n for n in family.split()["tune"] if n.startswith("labels"))
    held_out = next(n for n in family.split()["held-out"] if n.startswith("prefer"))
    done = run_bench("--quick", "--tasks", f"{tune},{held_out}", "--arms", "grid,auto,equal", "--search-trials", "2",
                     "--model", str(tiny_model_dir), "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text()), (tune, held_out)


def test_the_smoke_run_prints_both_halves_with_the_seed_and_the_goal(smoke):
    stdout, results, (tune, held_out) = smoke
    halves = family.split()
    assert f"split seed {family.SPLIT_SEED}" in stdout
    assert f"# tune: {halves['tune'][0]} (" in stdout and f"# held-out: {halves['held-out'][0]} (" in stdout
    assert "search.LR_LADDER = (1.0, 3.0, 10.0)" in stdout and "length.CEILING_STEPS = 300" in stdout
    assert "\ntune half:" in stdout and "\nheld-out half:" in stdout
    assert "goal met on" in stdout and f"  {tune}: auto " in stdout and f"  {held_out}: auto " in stdout
    assert [r["half"] for r in results] == ["tune", "held-out"]
    assert f"| tune | {tune} | 24 | auto |" in stdout and f"| held-out | {held_out} | 24 | grid |" in stdout


def test_the_grid_is_timed_point_by_point_and_the_recipe_is_its_first_point(smoke):
    _, results, _ = smoke
    for result in results:
        points = result["grid"]["points"]
        assert {(p["lr"], p["passes"]) for p in points} == {(lr, n) for lr in (2e-4, 3e-3) for n in (1, 2)}
        assert result["grid"]["seconds"] == pytest.approx(sum(p["seconds"] for p in points))
        by_lr = {p["lr"]: {q["passes"]: q["seconds"] for q in points if q["lr"] == p["lr"]} for p in points}
        assert all(cost[2] > cost[1] > 0 for cost in by_lr.values())  # a 2-pass point costs its 2 passes
        assert all(0.0 <= p["exact_match"] <= 1.0 for p in points)
        assert result["grid"]["exact_match"] == max(p["exact_match"] for p in points)
        assert (result["recipe"]["lr"], result["recipe"]["passes"]) == (2e-4, 1)
        assert set(result["goal"]) >= {"quality", "time", "recipe", "met", "time_share"}


def test_the_auto_path_searches_then_trains_and_a_preference_task_plans_dpo(smoke):
    _, results, _ = smoke
    labels, prefer = results
    assert labels["auto"]["trials"] == 2 and labels["auto"]["metric"] == "exact_match"
    assert "Search first" in labels["auto"]["budget"] and labels["auto"]["plan"].startswith("lora")
    assert labels["auto"]["seconds"] == pytest.approx(labels["auto"]["search_seconds"] +
                                                      labels["auto"]["final_seconds"], abs=0.2)
    assert prefer["auto"]["plan"].startswith("dpo") and "not searched" in prefer["auto"]["budget"]
    assert 0.0 <= prefer["auto"]["pair_accuracy"] <= 1.0 and "pair_accuracy" in prefer["recipe"]


def test_the_plain_loop_and_the_product_get_identical_clipping_warmup_and_dtype(smoke):
    _, results, _ = smoke
    for result in results:
        loop, plain = result["loop"]["settings"], result["plain"]["settings"]
        weights = loop.pop("weights")
        assert loop == plain and loop["max_grad_norm"] == 1.0 and loop["warmup_ratio"] == 0.03
        assert weights == {"fp32": "float32", "bf16": "bfloat16"}[plain["dtype"]]
        assert result["loop"]["steps"] == result["plain"]["steps"]
        if plain["dtype"] == "fp32":
            assert "loop-fp32" not in result
        else:  # a plain loop in fp32 beside the one in the product's dtype
            assert result["loop-fp32"]["settings"]["dtype"] == "fp32"


def test_a_task_file_of_your_own_runs_in_neither_half(tiny_model_dir, tmp_path):
    rows = tmp_path / "colours.jsonl"
    colours = ["red", "green", "blue", "amber"]
    rows.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Ticket {i}: which colour is item {i}?"},
        {"role": "assistant", "content": colours[i % 4]}]}) + "\n" for i in range(60)))
    out = tmp_path / "report.json"
    done = run_bench("--tasks", str(rows), "--arms", "loop,rules", "--max-rows", "40", "--test-rows", "8",
                     "--max-steps", "6", "--model", str(tiny_model_dir), "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = json.loads(out.read_text())
    assert result["task"] == "colours" and result["half"] == "own" and result["test_rows"] == 8
    assert result["train_rows"] == 40 - 8  # a tenth, at least 8 rows, held out for validation
    for arm in ("loop", "rules"):
        assert 0.0 <= result[arm]["exact_match"] <= 1.0 and result[arm]["seconds"] > 0
    assert "| own | colours | 40 | rules |" in done.stdout


def test_a_task_file_without_answers_is_named_with_its_line(tiny_model_dir, tmp_path):
    rows = tmp_path / "broken.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    done = run_bench("--tasks", str(rows), "--arms", "loop", "--model", str(tiny_model_dir), timeout=120)
    assert done.returncode != 0
    assert f"{rows}, line 1: needs a user turn and an assistant answer" in done.stderr

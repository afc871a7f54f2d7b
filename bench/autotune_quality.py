"""Auto LLM quality (issue 32): the auto path against the best of a grid of the plain script, on a family of
generated tasks (bench/task_family.py) split by a fixed rule into a tuning half and a held-out half.

    .venv/bin/python bench/autotune_quality.py                          # every task of both halves
    .venv/bin/python bench/autotune_quality.py --half held-out          # the half the goal is judged on
    .venv/bin/python bench/autotune_quality.py --tasks route2-120,labels-60 --grid-lrs 2e-4,1e-3
    .venv/bin/python bench/autotune_quality.py --tasks my_rows.jsonl    # a task of your own (in neither half)

Model: SmolLM2-135M-Instruct (TUNEDECK_SMOLLM_DIR or var/test-models/...), CPU. Every arm trains on the same rows
and is scored by the same code on the same held-out test prompts, never trained on: greedy answers through the
chat template, exact match and token F1 (finetune/evalmetrics.py); a preference task also reports how often the
adapter gives the chosen answer a higher likelihood than the rejected one (pair accuracy).

  grid    the plain script (bench/train_quality.train_plain: transformers + peft, AdamW, gradient clipping at 1.0
          as HF's Trainer, constant lr without warmup, shuffled batches of 8, LoRA r16/a32 all-linear, dropout
          0.05) at every lr of --grid-lrs x passes of --grid-passes, on all the user's rows (validation rows
          included, as such a script trains; preference rows: the chosen answers). One run per lr saves the adapter
          after each pass count (a constant rate without warmup makes the first P passes of a longer run exactly the
          P-pass run); a point's time is its cost as a run of its own: loading, its passes, saving. Pass counts that
          would show the script more than --grid-max-rows rows are left out (one pass never is). Weights in the
          product's dtype (--grid-dtype plan), so the times compare like with like.
  recipe  the grid's point at 2e-4 and one pass: the one-pass plain recipe.
  recipe-fp32  the recipe in fp32, what a plain script does on a CPU, when the product's dtype is not fp32.
  auto    the product's auto path as a job takes it: autotune.select's plan for this machine (its probe and bf16 vs
          fp32 matmul measurement, the validation rows known), the search budget as jobs/search.py attaches it
          (on by default for the auto method; a preference dataset plans DPO, as jobs/services.make_plan does),
          the trials when the budget turns search on, then the final training (early stopping, best checkpoint).
          Its time: search plus final training. The speed the budget assumes is measured once per bench run by a
          short timing run of the product's trainer (a job gets it from earlier jobs); not counted.
  rules   (--arms) the rules' plan trained without search.
  loop, plain, loop-fp32  (--arms equal) the trainer gap at identical settings: the plain loop and the product's
          trainer at the recipe with the product's clipping, warmup and dtype, on the training split, and the plain
          loop in fp32 beside when that dtype is not fp32. Each records the settings its trainer used.

The goal, judged on the held-out half and printed for both halves: on every task, the auto path's exact match >= the
grid's best - 0.02, at <= 1/3 of the grid's total time, and >= the recipe's exact match. The product's constants
(printed first) are to be set on the tuning half only. Arm order alternates per task (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import task_family as family
from finetune.errors import TrainingError

DEFAULT_MODEL = ROOT / "var" / "test-models" / "SmolLM2-135M-Instruct"
MEASUREMENT_CACHE = ROOT / "var" / "bench"  # the matmul measurement, taken once per machine like a worker's
RECIPE = {"rank": 16, "alpha": 32, "dropout": 0.05, "lr": 2e-4, "batch": 8, "epochs": 1, "seed": 42}
GRID = {"max_grad_norm": 1.0, "warmup_ratio": 0.0, "lr_schedule": "constant"}  # the plain script's trainer
GOAL_MARGIN, GOAL_TIME_SHARE = 0.02, 1 / 3
DEFAULT_ARMS = "grid,auto"


# ------------------------------------------------------------------------ tasks


def make_task(name: str, args, folder: Path) -> dict:
    """The task's files: all.jsonl (every row, as a plain script trains them), train/val.jsonl (the product's
    split: a tenth, at least 8 rows, for validation, the jobs' default) and the test prompts."""
    if name.endswith(".jsonl"):
        pairs = rows_from_file(Path(name))
        random.Random(args.seed).shuffle(pairs)
        test, seen = [], set()
        for row in pairs:
            if len(test) < args.test_rows and family.prompt_of(row) not in seen:
                seen.add(family.prompt_of(row))
                test.append(row)
        rows = [r for r in pairs if family.prompt_of(r) not in seen][: args.max_rows or None]
        if len(test) < args.test_rows or len(rows) < 2 * max(8, len(rows) // 10):
            raise SystemExit(f"{name}: {len(pairs)} rows are too few for {args.test_rows} test rows and training")
        return write_task(folder, rows, test, {"task": Path(name).stem, "half": "own", "kind": "your own"})
    if name not in family.TASKS:
        raise SystemExit(f"Unknown task {name!r}; choose from {', '.join(family.TASKS)} or a .jsonl file.")
    generator, size = family.TASKS[name]
    rows, test = family.make_rows(generator, min(size, args.max_rows or size), args.test_rows, args.seed)
    info = {"task": name, "half": family.half_of(name, args.split_seed), "kind": family.GENERATORS[generator].kind}
    return write_task(folder, rows, test, info)


def rows_from_file(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path}, line {number}: not JSON ({exc.msg})") from None
        turns = (record.get("messages") if isinstance(record, dict) else None) or []
        prompt = next((t["content"] for t in turns if t.get("role") == "user"), None)
        answer = next((t["content"] for t in reversed(turns) if t.get("role") == "assistant"), None)
        if prompt is None or answer is None:
            raise SystemExit(f"{path}, line {number}: needs a user turn and an assistant answer in 'messages'")
        rows.append(family.chat_row(prompt, answer))
    return rows


def write_task(folder: Path, rows: list[dict], test: list[dict], info: dict) -> dict:
    n_val = max(8, len(rows) // 10)

    def write(name, part):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        return str(folder / name)

    folder.mkdir(parents=True, exist_ok=True)
    preference = "chosen" in rows[0]
    sft = [family.chat_row(family.prompt_of(r), family.answer_of(r)) for r in rows]
    return {**info, "preference": preference, "rows": len(rows), "train_rows": len(rows) - n_val,
            "validation_rows": n_val, "all": write("all.jsonl", sft), "train": write("train.jsonl", rows[n_val:]),
            "train_sft": write("train-sft.jsonl", sft[n_val:]),
            "validation": write("val.jsonl", rows[:n_val]),
            "test": [{"prompt": family.prompt_of(r), "reference": family.answer_of(r),
                      **({"rejected": r["rejected"]} if "rejected" in r else {})} for r in test]}


def token_stats(model_dir: Path, task: dict) -> dict:
    from transformers import AutoTokenizer

    from finetune.data import iter_examples
    from finetune.tokenize import encode_example, encode_preference

    tok = AutoTokenizer.from_pretrained(model_dir)

    def length(example):
        if "chosen" in example:
            pair = encode_preference(example, tok, 4096)
            return max(len(pair["chosen"]["input_ids"]), len(pair["rejected"]["input_ids"]))
        return len(encode_example(example, tok, 4096).input_ids)

    lengths = sorted(length(e) for e in iter_examples(task["train"]))
    pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]
    return {"min": lengths[0], "p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "max": lengths[-1],
            "mean": sum(lengths) / len(lengths), "count": len(lengths)}


def seq_len_for(stats: dict) -> int:
    """The longest row, rounded up to a multiple of 64 (at least 64): the plain script's max_seq_len."""
    return max(64, -(-stats["max"] // 64) * 64)


# ------------------------------------------------------------------------ the product's side


def rules_plan(model_dir: Path, task: dict, stats: dict, method: str = "auto") -> dict:
    """The plan a CPU training worker here makes: its probe plus its bf16 vs fp32 matmul measurement (as
    jobs.services.worker_inventory reports it); a preference dataset plans DPO, as make_plan does."""
    from autotune import probe, select
    from autotune.precision import matmul_speed

    inventory = probe()
    inventory["gpus"] = []
    inventory["matmul_speed"] = matmul_speed(MEASUREMENT_CACHE, devices=["cpu"])
    config = json.loads((model_dir / "config.json").read_text())
    method = "dpo" if task["preference"] and method == "auto" else method
    stats = {"rows": task["train_rows"], "validation_rows": task["validation_rows"], "token_stats": stats}
    return select(inventory, config, stats, {"method": method})


def train_plan(model_dir: Path, task: dict, plan: dict, out: Path, **extra) -> tuple[dict, float]:
    from finetune.train import TrainSpec, train

    spec = TrainSpec.from_plan({"max_eval_generations": 0, "checkpoint_every_minutes": 1e9, **plan, **extra},
                               base_model_path=str(model_dir), train_file=task["train"],
                               eval_file=task["validation"], output_dir=str(out), checkpoint_dir=None)
    progress, evaluations = {}, []

    def on_event(kind, message, data):
        if kind == "evaluated":  # the validation path early stopping read: [step, loss, exact match or None]
            evaluations.append([data["step"], round(data["eval_loss"], 4),
                                data.get("val_exact_match")])

    started = time.monotonic()
    result = train(spec, on_progress=progress.update, on_event=on_event)
    metrics = {**result.metrics, "train_tokens_per_second": progress.get("train_tokens_per_second"),
               "evaluations": evaluations}
    return {"adapter": result.adapter_dir, "metrics": metrics, "spec": spec}, time.monotonic() - started


def measured_speed(model_dir: Path, task: dict, stats: dict, ctx: dict) -> float | None:
    """Training tokens/s of the product's trainer in the rules' plan, from a 6-step run (once per bench run)."""
    if ctx.get("tps") is None:
        plan = rules_plan(model_dir, task, stats)
        trained, _ = train_plan(model_dir, {**task, "validation": None}, plan, ctx["work"] / "timing", max_steps=6)
        ctx["tps"] = trained["metrics"]["train_tokens_per_second"]
        print(f"# speed for the search budget: {ctx['tps']:.0f} training tokens/s ({plan['dtype']}, 6-step run of the "
              f"product's trainer, not counted in any arm)", flush=True)
    return ctx["tps"]


def arm_auto(model_dir, task, stats, work, ctx) -> dict:
    from autotune import search

    plan = rules_plan(model_dir, task, stats)
    method = "dpo" if task["preference"] else "auto"
    budget = search.plan_budget(plan, rows=task["train_rows"], mean_tokens=stats["mean"],
                                tokens_per_second=measured_speed(model_dir, task, stats, ctx),
                                source="measured by this bench", trials=ctx["force_trials"],
                                on_by_default=method == "auto")
    info = {"rules_plan": describe(plan), "budget": budget["summary"]}
    started = time.monotonic()
    final = plan
    if budget["enabled"]:
        final, found = run_search(model_dir, task, plan, budget, work)
        info.update(found)
    search_seconds = time.monotonic() - started
    try:
        trained, seconds = train_plan(model_dir, task, final, work / "auto", **ctx["cap"])
    except TrainingError as refusal:  # e.g. the learning guard: the job fails, the user keeps the base model
        return refused(refusal, info, plan=describe(final), search_seconds=search_seconds,
                       started=started + search_seconds)
    if not budget["enabled"]:
        ctx["rules_run"] = (trained, seconds)  # the very plan the rules arm would train: not trained twice
    metrics = trained["metrics"]
    info.update(plan=describe(final), search_seconds=round(search_seconds, 1), final_seconds=round(seconds, 1),
                steps=metrics.get("steps"), best_step=metrics.get("best_step"),
                stopped_early=metrics.get("stopped_early"), evaluations=metrics.get("evaluations"),
                reasons=[r for r in final["reasons"][:4]])
    return {"adapter": trained["adapter"], "seconds": search_seconds + seconds, **info}


def refused(refusal, info: dict, *, plan: str, search_seconds: float, started: float) -> dict:
    """A run the product's trainer refused to turn into a version: the user is left with the base model, so it is
    scored as the base model (adapter None), marked refused with the reason, its time counted."""
    seconds = time.monotonic() - started
    info.update(plan=plan, search_seconds=round(search_seconds, 1), final_seconds=round(seconds, 1),
                refused=str(refusal)[:200])
    return {"adapter": None, "seconds": search_seconds + seconds, **info}


def run_search(model_dir, task, plan, budget, work) -> tuple[dict, dict]:
    from autotune import search

    config = json.loads((model_dir / "config.json").read_text())
    setup = search.SearchSetup(plan=plan, model_config=config, base_model_path=str(model_dir),
                               train_file=task["train"], eval_file=task["validation"], work_dir=str(work / "trials"),
                               trial_steps=budget["trial_steps"], eval_every=budget["eval_every"])
    metric = search.choose_metric(task["validation"])
    study = search.open_study(f"sqlite:///{work / 'optuna.db'}", "bench", metric, eval_every=budget["eval_every"])
    search.run_trials(study, setup, search.Budget.from_plan(budget))
    records = search.trial_records(study)
    final = search.apply_winner(plan, records, config)
    done = [r for r in records if r.state == search.STATE_COMPLETE]
    return final, {
        "trials": len(records), "pruned": sum(r.state == search.STATE_PRUNED for r in records),
        "failed": sum(r.state == search.STATE_FAILED for r in records), "metric": metric,
        "winner": (final.get("search_result") or {}).get("params"),
        "trial_seconds": {"estimated": budget["trial_seconds_estimate"],
                          "measured_mean": round(sum(r.duration for r in done) / len(done), 1) if done else None},
        "ooms": sum("out of memory" in r.reason.lower() or "OutOfMemory" in r.reason for r in records)}


def arm_rules(model_dir, task, stats, work, ctx) -> dict:
    plan = rules_plan(model_dir, task, stats)
    if "rules_run" in ctx:
        trained, seconds = ctx["rules_run"]
        return {"adapter": trained["adapter"], "seconds": seconds, "plan": describe(plan),
                "note": "the auto arm's run (its search was off)"}
    trained, seconds = train_plan(model_dir, task, plan, work / "rules", **ctx["cap"])
    ctx["rules_run"] = (trained, seconds)
    return {"adapter": trained["adapter"], "seconds": seconds, "plan": describe(plan)}


def describe(plan: dict) -> str:
    targets = plan.get("target_modules")
    targets = "all-linear" if targets == "all-linear" or (isinstance(targets, list) and len(targets) > 4) else \
        "attention"
    length = f"<= {plan['epochs']:g} pass(es)"
    if plan.get("eval_every_steps"):
        length += f", eval every {plan['eval_every_steps']} steps, patience {plan['early_stopping_patience']}"
    return f"{plan['method']} r{plan['rank']}/a{plan['alpha']:g} {targets} lr {plan['learning_rate']:.2g} " \
           f"batch {plan['micro_batch']}x{plan['grad_accum']} {length} {plan.get('dtype', 'fp32')}"


# ------------------------------------------------------------------------ the plain script's side


def plain_rows(task: dict, part: str = "all") -> list[dict]:
    """The rows as a plain script trains them (chat rows; a preference row's chosen answer)."""
    path = task["all"] if part == "all" else task["train_sft"]
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def grid_passes(args, rows: int) -> list[int]:
    passes = sorted({int(p) for p in args.grid_passes.split(",")})
    return [p for p in passes if p == 1 or p * rows <= args.grid_max_rows] or [1]


def arm_grid(model_dir, task, stats, work, ctx) -> dict:
    """One plain run per learning rate, an adapter saved after each grid pass count; each point timed as a run of
    its own (loading + its passes + saving)."""
    from bench.train_quality import train_plain

    args, rows = ctx["args"], plain_rows(task)
    passes = grid_passes(args, len(rows))
    dtype = ctx["product_dtype"] if args.grid_dtype == "plan" else args.grid_dtype
    points = []
    for lr in [float(x) for x in args.grid_lrs.split(",")]:
        folders = {p: work / f"grid-{lr:g}-{p}" for p in passes}
        settings = {**RECIPE, **GRID, "lr": lr, "epochs": max(passes), "max_seq_len": seq_len_for(stats),
                    "dtype": dtype}
        timing = train_plain(str(model_dir), rows, settings, folders[max(passes)],
                             save_after={p: f for p, f in folders.items() if p != max(passes)})
        for p in passes:
            seconds = timing["load_seconds"] + sum(timing["pass_seconds"][:p]) + timing["save_seconds"]
            points.append({"lr": lr, "passes": p, "adapter": str(folders[p]), "seconds": seconds})
    return {"points": points, "seconds": sum(p["seconds"] for p in points), "dtype": dtype,
            "plan": f"plain script, lr {args.grid_lrs} x passes {','.join(map(str, passes))}, {dtype}, "
                    f"{len(rows)} rows"}


def arm_recipe_fp32(model_dir, task, stats, work, ctx) -> dict:
    from bench.train_quality import train_plain

    rows = plain_rows(task)
    settings = {**RECIPE, **GRID, "max_seq_len": seq_len_for(stats), "dtype": "fp32"}
    timing = train_plain(str(model_dir), rows, settings, work / "recipe-fp32")
    seconds = timing["load_seconds"] + sum(timing["pass_seconds"]) + timing["save_seconds"]
    return {"adapter": str(work / "recipe-fp32"), "seconds": seconds, "plan": f"recipe, fp32, {len(rows)} rows"}


def equal_settings(ctx: dict, stats: dict, dtype: str | None = None) -> dict:
    """The recipe with the product trainer's own clipping, warmup and schedule defaults, in the product's dtype."""
    from finetune.train import TrainSpec

    defaults = {name: TrainSpec.__dataclass_fields__[name].default
                for name in ("max_grad_norm", "warmup_ratio", "lr_schedule")}
    return {**RECIPE, **defaults, "max_seq_len": seq_len_for(stats), "dtype": dtype or ctx["product_dtype"]}


def arm_loop(model_dir, task, stats, work, ctx, dtype: str | None = None) -> dict:
    from bench.train_quality import train_plain, trainer_settings

    settings = equal_settings(ctx, stats, dtype)
    started = time.monotonic()
    timing = train_plain(str(model_dir), plain_rows(task, "train"), settings, work / f"loop-{settings['dtype']}")
    return {"adapter": str(work / f"loop-{settings['dtype']}"), "seconds": time.monotonic() - started,
            "settings": {**trainer_settings(settings), "weights": timing["dtype"]}, "steps": timing["steps"],
            "plan": "plain loop at the recipe, the product's clipping/warmup/dtype, training split"}


def arm_plain(model_dir, task, stats, work, ctx) -> dict:
    from bench.train_quality import trainer_settings

    settings = equal_settings(ctx, stats)
    plan = {"method": "lora", "rank": settings["rank"], "alpha": settings["alpha"], "dropout": settings["dropout"],
            "target_modules": "all-linear", "micro_batch": settings["batch"], "grad_accum": 1,
            "learning_rate": settings["lr"], "epochs": settings["epochs"], "seed": settings["seed"],
            "max_seq_len": settings["max_seq_len"], "device": "cpu", "early_stopping_patience": 0,
            **trainer_settings(settings)}
    trained, seconds = train_plan(model_dir, {**task, "train": task["train_sft"], "validation": None}, plan,
                                  work / "plain")
    spec = trained["spec"]
    used = {name: getattr(spec, name) for name in ("max_grad_norm", "warmup_ratio", "lr_schedule", "dtype")}
    return {"adapter": trained["adapter"], "seconds": seconds, "settings": used,
            "steps": trained["metrics"].get("steps"), "plan": "the product's trainer at the loop's settings"}


def arm_loop_fp32(model_dir, task, stats, work, ctx) -> dict:
    return arm_loop(model_dir, task, stats, work, ctx, dtype="fp32")


ARMS = {"grid": arm_grid, "auto": arm_auto, "rules": arm_rules, "recipe-fp32": arm_recipe_fp32,
        "loop": arm_loop, "plain": arm_plain, "loop-fp32": arm_loop_fp32}
ALIASES = {"equal": ["loop", "plain", "loop-fp32"]}


# ------------------------------------------------------------------------ scoring


def score_all(model_dir: Path, adapters: list[str], task: dict, args) -> list[dict]:
    """Exact match and token F1 of greedy answers (one base load for all the adapters); for preference tasks also
    the pair accuracy."""
    from finetune.evaluate import evaluate_adapters

    test = task["test"]
    longest = max(len(p["reference"].split()) for p in test)
    new_tokens = min(args.max_new_tokens, 2 * longest + 6)
    outcomes = evaluate_adapters(str(model_dir), adapters, test, max_new_tokens=new_tokens, device="cpu",
                                 dtype="fp32")
    scores = []
    for adapter, outcome in zip(adapters, outcomes):
        if "error" in outcome:
            scores.append({"error": outcome["error"]})
            continue
        results = outcome["results"]
        scores.append({"exact_match": sum(r["exact_match"] for r in results) / len(results),
                       "token_f1": sum(r["token_f1"] for r in results) / len(results)})
        if task["preference"]:
            scores[-1]["pair_accuracy"] = pair_accuracy(model_dir, adapter, test)
    return scores


def pair_accuracy(model_dir: Path, adapter: str, test: list[dict]) -> float:
    """How often the adapter gives the chosen answer a higher summed log-likelihood than the rejected one."""
    import torch

    from finetune.merge import attach_adapter
    from finetune.modelstore import load_model_and_tokenizer
    from finetune.tokenize import IGNORE, encode_preference

    base, tokenizer = load_model_and_tokenizer(str(model_dir), device="cpu", dtype="fp32")
    model = attach_adapter(base, adapter) if adapter else base  # None: the base model (a refused run)
    right = 0
    with torch.no_grad():
        for row in test:
            example = {"prompt": [{"role": "user", "content": row["prompt"]}], "chosen": row["reference"],
                       "rejected": row["rejected"]}
            pair = encode_preference(example, tokenizer, 4096)
            total = {}
            for side in ("chosen", "rejected"):
                ids = torch.tensor([pair[side]["input_ids"]])
                labels = torch.tensor([pair[side]["labels"]])[:, 1:]
                logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
                picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                total[side] = float((picked * (labels != IGNORE)).sum())
            right += total["chosen"] > total["rejected"]
    return right / len(test)


# ------------------------------------------------------------------------ one task, the goal, the report


def run_task(name: str, index: int, args, model_dir: Path, root: Path, ctx: dict) -> dict:
    task = make_task(name, args, root / Path(name).stem)
    stats = token_stats(model_dir, task)
    ctx.update(args=args, work=root, product_dtype=rules_plan(model_dir, task, stats)["dtype"])
    ctx.pop("rules_run", None)
    order = expand_arms(args.arms, ctx)
    if "auto" in order:
        measured_speed(model_dir, task, stats, ctx)  # before any arm: it also pays the libraries' first use
    order = order if index % 2 == 0 else order[::-1]
    out = {key: task[key] for key in ("task", "half", "kind", "rows", "train_rows", "validation_rows")}
    out.update(test_rows=len(task["test"]), order=order)
    for arm in order:
        out[arm] = ARMS[arm](model_dir, task, stats, root / Path(name).stem, ctx)
        print(json.dumps({"task": out["task"], "arm": arm, **short(out[arm])}), flush=True)
    score_task(out, model_dir, task, args)
    shutil.rmtree(root / Path(name).stem, ignore_errors=True)  # the adapters are scored: free the disk
    return out


def expand_arms(arms: str, ctx: dict) -> list[str]:
    names = []
    for arm in arms.split(","):
        for name in ALIASES.get(arm, [arm]):
            if name not in ARMS:
                raise SystemExit(f"Unknown arm {name!r}; choose from {', '.join([*ARMS, *ALIASES])}.")
            if name == "loop-fp32" and ctx["product_dtype"] == "fp32":
                continue  # the loop already is fp32
            names.append(name)
    if "grid" in names and ctx["product_dtype"] != "fp32" and ctx["args"].grid_dtype == "plan":
        names.append("recipe-fp32")  # a plain script's CPU default, beside the grid in the product's dtype
    return list(dict.fromkeys(names))


def short(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("adapter", "points", "reasons")}


def score_task(out: dict, model_dir: Path, task: dict, args):
    """Scores every adapter of the task in one pass, then marks the recipe and the grid's best."""
    adapters = [(arm, None, out[arm]["adapter"]) for arm in out["order"] if "adapter" in out.get(arm, {})]
    if "grid" in out:
        adapters += [("grid", i, p["adapter"]) for i, p in enumerate(out["grid"]["points"])]
    scores = score_all(model_dir, [a for _, _, a in adapters], task, args)
    for (arm, point, _), score in zip(adapters, scores):
        (out[arm] if point is None else out[arm]["points"][point]).update(score)
    if "grid" in out:
        points = out["grid"]["points"]
        best = max(points, key=lambda p: (p.get("exact_match", -1), p.get("token_f1", -1)))
        out["grid"].update(best={k: best.get(k) for k in ("lr", "passes", "exact_match", "token_f1")},
                           exact_match=best.get("exact_match"), token_f1=best.get("token_f1"))
        recipe = next((p for p in points if p["lr"] == RECIPE["lr"] and p["passes"] == 1), None)
        if recipe:
            out["recipe"] = {**recipe, "plan": "grid point lr 2e-4, 1 pass"}
    if "auto" in out and "grid" in out:
        out["goal"] = goal(out)


def goal(out: dict) -> dict:
    auto, grid = out["auto"], out["grid"]
    em = auto.get("exact_match", 0.0)
    checks = {"quality": em >= (grid.get("exact_match") or 0.0) - GOAL_MARGIN,
              "time": auto["seconds"] <= GOAL_TIME_SHARE * grid["seconds"]}
    if "recipe" in out:
        checks["recipe"] = em >= out["recipe"].get("exact_match", 0.0)
    return {**checks, "met": all(checks.values()), "time_share": auto["seconds"] / max(grid["seconds"], 1e-9)}


def print_header(args, tasks: list[str]):
    halves = family.split(seed=args.split_seed)
    print(f"# Halves: split seed {args.split_seed}; rule: generators ordered by sha256('<seed>:<generator>'), each "
          "one's tasks by sha256('<seed>:<task>'), dealt alternately to tune and held-out (bench/task_family.py).")
    for half in family.HALVES:
        members = ", ".join(f"{n} ({family.GENERATORS[family.TASKS[n][0]].kind})" for n in halves[half])
        print(f"# {half}: {members}")
    print(f"# running: {', '.join(tasks)}")
    print("# The product's constants (set on the tuning half only): " + ", ".join(
        f"{k} = {v}" for k, v in product_constants().items()))
    print(f"# Goal on each held-out task: auto exact match >= grid best - {GOAL_MARGIN}, auto time <= "
          f"{GOAL_TIME_SHARE:.2g} x the grid's total time, auto exact match >= the recipe's.", flush=True)


def product_constants() -> dict:
    import importlib

    length, select, search = (importlib.import_module(m) for m in ("autotune.length", "autotune.select",
                                                                     "autotune.search"))
    names = {length: ("CEILING_STEPS", "MAX_PASSES", "MIN_EVALUATIONS", "MIN_PATIENCE", "MAX_PATIENCE",
                      "FIXED_STEPS", "FIXED_MAX_PASSES"),
             select: ("SMALL_DATASET_ROWS", "SMALL_EFFECTIVE_BATCH", "DEFAULT_EFFECTIVE_BATCH"),
             search: ("DEFAULT_BUDGET_FRACTION", "LR_LADDER", "MIN_TRIALS", "FULL_TRIALS", "MIN_TRIAL_STEPS",
                      "MAX_TRIAL_STEPS", "FULL_SPACE_TRIALS", "MAX_FINAL_SLOWDOWN", "TRIAL_OVERHEAD_SECONDS",
                      "TRIAL_OVERHEAD_STEPS")}
    return {f"{module.__name__.split('.')[-1]}.{n}": getattr(module, n) for module, ns in names.items() for n in ns}


def report(results: list[dict]):
    print("\n| half | task | rows | arm | exact match | token F1 | seconds | plan |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for arm in [a for a in dict.fromkeys(("auto", "grid", "recipe", *ARMS)) if isinstance(r.get(a), dict)]:
            a = r[arm]
            extra = f" (best: lr {a['best']['lr']:g}, {a['best']['passes']} pass(es))" if arm == "grid" else ""
            pairs = f", pair accuracy {a['pair_accuracy']:.2f}" if "pair_accuracy" in a else ""
            if a.get("refused"):
                extra += f" REFUSED, scored as the base model: {a['refused']}"
            print(f"| {r['half']} | {r['task']} | {r['rows']} | {arm} | {a.get('exact_match', float('nan')):.3f} | "
                  f"{a.get('token_f1', float('nan')):.3f} | {a['seconds']:.0f} | {a.get('plan', '')}{extra}{pairs} |")
    for half in (*family.HALVES, "own"):
        judged = [r for r in results if r["half"] == half and "goal" in r]
        if not judged:
            continue
        print(f"\n{half} half:" if half != "own" else "\nyour own tasks:")
        for r in judged:
            g = r["goal"]
            print(f"  {r['task']}: auto {r['auto'].get('exact_match', 0):.3f} vs grid best "
                  f"{r['grid'].get('exact_match', 0):.3f} ({'ok' if g['quality'] else 'MISSED'}), time "
                  f"{g['time_share']:.2f} of the grid's ({'ok' if g['time'] else 'MISSED'}), vs recipe "
                  f"{r.get('recipe', {}).get('exact_match', float('nan')):.3f} "
                  f"({'ok' if g.get('recipe', True) else 'MISSED'}) -> {'met' if g['met'] else 'NOT MET'}")
        print(f"  goal met on {sum(r['goal']['met'] for r in judged)}/{len(judged)} tasks of the {half} half")


def chosen_tasks(args) -> list[str]:
    if args.tasks:
        return args.tasks.split(",")
    halves = family.split(seed=args.split_seed)
    return [n for half in family.HALVES if args.half in (half, "both") for n in halves[half]]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", help=f"comma-separated, of {', '.join(family.TASKS)}, or .jsonl files of your own "
                                        "chat rows (default: every task of --half)")
    parser.add_argument("--half", choices=(*family.HALVES, "both"), default="both")
    parser.add_argument("--split-seed", type=int, default=family.SPLIT_SEED)
    parser.add_argument("--max-rows", type=int, default=0, help="cap every task's rows (0: the task's own size)")
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="the data seed")
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of {', '.join([*ARMS, *ALIASES])}")
    parser.add_argument("--grid-lrs", default="2e-4,5e-4,1e-3,2e-3")
    parser.add_argument("--grid-passes", default="1,3,10")
    parser.add_argument("--grid-max-rows", type=int, default=6_000,
                        help="leave out grid pass counts that would train on more rows than this (beyond one pass)")
    parser.add_argument("--grid-dtype", choices=("plan", "fp32", "bf16"), default="plan")
    parser.add_argument("--search-trials", type=int, default=None,
                        help="force this many trials (default: the product's default budget decides)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=0,
                        help="cap the product's final runs at this many steps (smoke tests only: 0, no cap)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 24 rows, 4 test rows, grid 2e-4,3e-3 x 1,2 passes, final runs of at most "
                             "6 steps, 8 new tokens")
    parser.add_argument("--model", default=os.environ.get("TUNEDECK_SMOLLM_DIR") or str(DEFAULT_MODEL))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_rows, args.test_rows, args.grid_lrs, args.grid_passes = 24, 4, "2e-4,3e-3", "1,2"
        args.max_new_tokens, args.max_steps = 8, 6
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model_dir = Path(args.model)
    tasks = chosen_tasks(args)
    print_header(args, tasks)
    cap = {"max_steps": args.max_steps} if args.max_steps else {}
    results, ctx = [], {"force_trials": args.search_trials, "cap": cap}
    with tempfile.TemporaryDirectory(prefix="autotune-quality-") as tmp:
        for index, name in enumerate(tasks):
            results.append(run_task(name, index, args, model_dir, Path(tmp), ctx))
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()

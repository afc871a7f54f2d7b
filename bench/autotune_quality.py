"""Auto LLM quality: the rules (autotune.select) vs the search stage (finetune/search.py + final training) vs the
fixed plain recipe, on the same generated tasks, in one run.

    .venv/bin/python bench/autotune_quality.py                                  # 4 tasks, 400 rows each
    .venv/bin/python bench/autotune_quality.py --tasks classify,extract --rows 200 --test-rows 60

Model: SmolLM2-135M-Instruct (TUNEDECK_SMOLLM_DIR or var/test-models/...), CPU, fp32. Every arm trains with
finetune.train.train (the product's trainer) on the same train/validation split and is scored on the same
held-out test prompts (greedy answers, exact match and token F1 from finetune/evalmetrics.py), never seen by
any arm (the search scores its trials on the validation split only).

  loop    the fixed plain recipe of issue 20 as its own 40-line loop (bench/train_quality.train_plain: transformers
          + peft, AdamW, constant lr 2e-4, shuffled batches of 8, LoRA r16/a32 all-linear, dropout 0.05, 1 epoch)
          on every row, validation rows included, as a person with that recipe would train; its wall time is the
          "recipe's training time" the auto path is held to (<= 1.5x)
  plain   the same recipe through the product's trainer (finetune.train at those settings, on the training split)
  rules   autotune.select's plan for this CPU, as a job with "skip search" trains it (the worker's probe and its
          bf16 vs fp32 matmul measurement, so bf16 where this CPU runs it faster)
  search  the auto path with search: budget from plan_budget (tokens/s measured by this run's plain arm),
          trials (TPE + successive halving) on the training split, then the final run with the winner's params;
          its wall time is search + final training. When the budget keeps the search off, the auto path is the
          rules plan, trained once and reported for both arms. --search-trials forces a trial count when the default
          budget (25 % of the final training) fits fewer than the minimum, and says so.

Arm order alternates per task (ABC, CBA, ...), since the machine is shared and slows down and speeds up.
Printed per task: test exact match, token F1, wall seconds per arm, and auto/plain ratios; OOMs (trials that
raised out-of-memory) are counted. Nothing here is asserted: read the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "var" / "test-models" / "SmolLM2-135M-Instruct"
MEASUREMENT_CACHE = ROOT / "var" / "bench"  # the matmul measurement, taken once per machine like a worker's
PLAIN = {"method": "lora", "rank": 16, "alpha": 32, "target_modules": "all-linear", "learning_rate": 2e-4,
         "micro_batch": 8, "grad_accum": 1, "epochs": 1, "warmup_ratio": 0.0, "lr_schedule": "constant"}


# ------------------------------------------------------------------------ tasks (generated, with a seed)

INTENTS = {
    "balance": ["what's my balance", "how much money do i have on {d}", "show my account balance", "balance for {n}",
                "check balance please", "how much is left after paying {a}"],
    "transfer": ["send money to {n}", "transfer {a} to {n}", "pay {n} back {a}", "move funds to {n}'s account"],
    "card_lost": ["i lost my card", "my card was stolen on {d}", "can't find my debit card", "block {n}'s card now",
                  "someone took my card"],
    "hours": ["when are you open", "opening hours on {d}", "are you open on {d}", "what time do you close on {d}",
              "is the branch near {n}'s office open"],
    "loan": ["i want a loan", "can i borrow {a}", "loan rates for {a}", "can {n} get a mortgage",
             "interest on a loan of {a}"],
}
NAMES = ["alice", "bob", "chen", "dana", "emil", "fatima", "goran", "hana", "ivan", "julia", "kofi", "lena"]
DAYS = ["monday", "tuesday", "sunday", "friday", "saturday"]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Perth", "Quito", "Dakar", "Porto", "Hanoi", "Riga"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
COLORS = ["red", "blue", "green", "black", "white", "yellow"]
ITEMS = ["shirt", "lamp", "chair", "mug", "bag", "hat"]


def classify(rng):
    intent = rng.choice(list(INTENTS))
    text = rng.choice(INTENTS[intent]).format(n=rng.choice(NAMES), d=rng.choice(DAYS), a=rng.randint(5, 900))
    return (f"Classify the banking intent of this message as one of {', '.join(INTENTS)}.\nMessage: {text}",
            intent)


def extract(rng):
    a, b = rng.sample(CITIES, 2)
    name = rng.choice(NAMES).capitalize()
    template = rng.choice(["{p} flew from {a} to {b} last week.", "After a stop in {a}, {p} finally reached {b}.",
                           "{p} left {a} by train and arrived in {b}.", "The parcel for {p} went from {a} to {b}."])
    return f"Which city is the destination? Answer with the city only.\n{template.format(p=name, a=a, b=b)}", b


def convert(rng):
    y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return f"Convert the date {y:04d}-{m:02d}-{d:02d} to the format 'D Month YYYY'.", f"{d} {MONTHS[m - 1]} {y}"


def generate(rng):
    color, item, name = rng.choice(COLORS), rng.choice(ITEMS), rng.choice(NAMES).capitalize()
    qty = rng.randint(2, 9)
    return (f"Write a one-sentence order confirmation for {name}: {qty} {color} {item}s.",
            f"Thanks {name}, your order of {qty} {color} {item}s is confirmed.")


TASKS = {"classify": classify, "extract": extract, "convert": convert, "generate": generate}


def make_task(name: str, rows: int, test_rows: int, seed: int, folder: Path) -> dict:
    """Held-out test prompts first (unique), then training rows that never repeat a test prompt (they may repeat
    each other once the generator's variety runs out, as real intent data does). A name that is a .jsonl file is
    a task of your own (kept outside the repo, so the rules were never tuned on it): see task_from_file."""
    if name.endswith(".jsonl"):
        return task_from_file(Path(name), rows, test_rows, seed, folder)
    rng = random.Random(f"{name}-{seed}")
    test, seen = [], set()
    for _ in range(50 * test_rows):
        prompt, answer = TASKS[name](rng)
        if prompt not in seen:
            seen.add(prompt)
            test.append((prompt, answer))
        if len(test) == test_rows:
            break
    data, fresh = [], set()
    for _ in range(200 * rows):
        prompt, answer = TASKS[name](rng)
        if prompt in seen or (prompt in fresh and len(fresh) < rows):
            continue
        fresh.add(prompt)
        data.append((prompt, answer))
        if len(data) == rows:
            break
    return write_task(folder, data, test)


def task_from_file(path: Path, rows: int, test_rows: int, seed: int, folder: Path) -> dict:
    """A JSONL file of chat rows (a user turn, then the assistant's answer): shuffled with the seed, the first
    test_rows distinct prompts are held out and up to `rows` rows whose prompt is not among them are trained on."""
    pairs = []
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
        pairs.append((prompt, answer))
    random.Random(seed).shuffle(pairs)
    test, seen = [], set()
    for prompt, answer in pairs:
        if len(test) < test_rows and prompt not in seen:
            seen.add(prompt)
            test.append((prompt, answer))
    data = [(p, a) for p, a in pairs if p not in seen][:rows]
    if len(test) < test_rows or len(data) < 2 * max(8, rows // 10):
        raise SystemExit(f"{path}: {len(pairs)} rows are too few for {test_rows} test and {rows} training rows")
    return write_task(folder, data, test)


def write_task(folder: Path, data: list[tuple], test: list[tuple]) -> dict:
    """Training and validation files (a tenth, at least 8 rows, held out for validation) and the test prompts."""
    n_val = max(8, len(data) // 10)

    def write(path, pairs):
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                         {"role": "assistant", "content": a}]}) + "\n"
                                for p, a in pairs))
        return str(path)

    folder.mkdir(parents=True, exist_ok=True)
    return {"train": write(folder / "train.jsonl", data[n_val:]), "validation": write(folder / "val.jsonl", data[:n_val]),
            "test": [{"prompt": p, "reference": a} for p, a in test], "train_rows": len(data) - n_val}


# ------------------------------------------------------------------------ arms


def seq_len_for(stats: dict) -> int:
    """The longest row, rounded up to a multiple of 64 (at least 64): every arm's max_seq_len."""
    return max(64, -(-stats["max"] // 64) * 64)


def train_plan(model_dir: Path, task: dict, plan: dict, out: Path) -> tuple[dict, float]:
    from finetune.train import TrainSpec, train

    spec = TrainSpec.from_plan({"max_eval_generations": 0, "checkpoint_every_minutes": 1e9, **plan},
                               base_model_path=str(model_dir), train_file=task["train"], eval_file=task["validation"],
                               output_dir=str(out), checkpoint_dir=None)
    started = time.monotonic()
    result = train(spec)
    return {"adapter": result.adapter_dir, "metrics": result.metrics}, time.monotonic() - started


def token_stats(model_dir: Path, task: dict) -> dict:
    from transformers import AutoTokenizer

    from finetune.data import iter_examples
    from finetune.tokenize import encode_example

    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = sorted(len(encode_example(e, tok, 4096).input_ids) for e in iter_examples(task["train"]))
    pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]
    return {"min": lengths[0], "p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "max": lengths[-1],
            "mean": sum(lengths) / len(lengths), "count": len(lengths)}


def rules_plan(model_dir: Path, task: dict, stats: dict) -> dict:
    """The plan a CPU training worker here makes: its probe plus its bf16 vs fp32 matmul measurement (as
    jobs.services.worker_inventory reports it), so the dtype is this machine's, not an assumption."""
    from autotune import probe, select
    from finetune.precision import matmul_speed

    inventory = probe()
    inventory["gpus"] = []
    inventory["matmul_speed"] = matmul_speed(MEASUREMENT_CACHE, devices=["cpu"])
    config = json.loads((model_dir / "config.json").read_text())
    return select(inventory, config, {"rows": task["train_rows"], "token_stats": stats}, {"method": "auto"})


def arm_loop(model_dir, task, stats, work, ctx, parts=("train", "validation")):
    from bench.train_quality import train_plain

    rows = [json.loads(line) for name in parts for line in Path(task[name]).read_text().splitlines()]
    settings = {"seed": 42, "rank": PLAIN["rank"], "alpha": PLAIN["alpha"], "dropout": 0.05, "lr": PLAIN["learning_rate"],
                "epochs": PLAIN["epochs"], "batch": PLAIN["micro_batch"],
                "max_seq_len": seq_len_for(stats)}
    started = time.monotonic()
    out = work / ("loop-" + "-".join(parts))
    train_plain(str(model_dir), rows, settings, out)
    return {"adapter": str(out)}, time.monotonic() - started, {
        "plan": f"plain loop r16/a32 all-linear lr 2e-4 batch 8 1 epoch, {len(rows)} rows"}


def arm_plain(model_dir, task, stats, work, ctx):
    plan = {**PLAIN, "max_seq_len": seq_len_for(stats), "device": "cpu", "dtype": "fp32"}
    trained, seconds = train_plan(model_dir, task, plan, work / "plain")
    ctx["plain_tps"] = trained["metrics"].get("tokens_per_second")
    return trained, seconds, {"plan": "r16/a32 all-linear lr 2e-4 batch 8 1 epoch"}


def arm_rules(model_dir, task, stats, work, ctx):
    plan = rules_plan(model_dir, task, stats)
    if "rules_run" in ctx:  # the search arm ran first, stayed off and trained this very plan
        trained, seconds = ctx["rules_run"]
        return trained, seconds, {"plan": describe(plan), "note": "the search arm's run (search off)"}
    trained, seconds = train_plan(model_dir, task, plan, work / "rules")
    ctx["rules_run"] = (trained, seconds)
    return trained, seconds, {"plan": describe(plan)}


def arm_search(model_dir, task, stats, work, ctx):
    from finetune import search

    rules = rules_plan(model_dir, task, stats)
    tps = ctx.get("plain_tps") or ctx.get("measured_tps")
    budget = search.plan_budget(rules, rows=task["train_rows"], mean_tokens=stats["mean"], tokens_per_second=tps,
                                source="measured by this bench's first training run", trials=ctx["force_trials"])
    if not budget["enabled"] and ctx["force_trials"] is None:
        note = f"search off by default: {budget['summary']}"
        if "rules_run" in ctx:  # the very plan the rules arm trained (same seed, same rows): not trained twice
            trained, seconds = ctx["rules_run"]
            return trained, seconds, {"plan": describe(rules), "note": note + "; the rules arm's run"}
        trained, seconds = train_plan(model_dir, task, rules, work / "search-final")
        ctx["rules_run"] = (trained, seconds)
        return trained, seconds, {"plan": describe(rules), "note": note}
    config = json.loads((model_dir / "config.json").read_text())
    setup = search.SearchSetup(plan=rules, model_config=config, base_model_path=str(model_dir),
                               train_file=task["train"], eval_file=task["validation"], work_dir=str(work / "trials"),
                               trial_steps=budget["trial_steps"], eval_every=budget["eval_every"])
    metric = search.choose_metric(task["validation"])
    study = search.open_study(f"sqlite:///{work / 'optuna.db'}", "bench", metric, eval_every=budget["eval_every"])
    started = time.monotonic()
    search.run_trials(study, setup, search.Budget.from_plan(budget))
    records = search.trial_records(study)
    final = search.apply_winner(rules, records, config)
    search_seconds = time.monotonic() - started
    trained, seconds = train_plan(model_dir, task, final, work / "search-final")
    ooms = sum("OutOfMemory" in r.reason or "out of memory" in r.reason.lower() for r in records)
    return trained, search_seconds + seconds, {
        "plan": describe(final), "search_seconds": round(search_seconds, 1), "final_seconds": round(seconds, 1),
        "trials": len(records), "pruned": sum(r.state == "pruned" for r in records),
        "failed": sum(r.state == "failed" for r in records), "ooms": ooms, "metric": metric,
        "budget": budget["summary"], "reasons": final["reasons"][:3]}


def describe(plan: dict) -> str:
    targets = plan.get("target_modules")
    targets = "all-linear" if targets == "all-linear" or (isinstance(targets, list) and len(targets) > 4) else \
        "attention"
    return f"{plan['method']} r{plan['rank']}/a{plan['alpha']:g} {targets} lr {plan['learning_rate']:.2g} " \
           f"batch {plan['micro_batch']}x{plan['grad_accum']} {plan['epochs']:g} epoch(s) {plan.get('dtype', 'fp32')}"


def arm_loop_split(model_dir, task, stats, work, ctx):
    return arm_loop(model_dir, task, stats, work, ctx, parts=("train",))


def arm_plain_all(model_dir, task, stats, work, ctx):
    """The recipe through the product's trainer on every row, no validation: the trainer alone against `loop`."""
    merged = work / "all.jsonl"
    merged.write_text(Path(task["train"]).read_text() + Path(task["validation"]).read_text())
    plan = {**PLAIN, "max_seq_len": seq_len_for(stats), "device": "cpu", "dtype": "fp32"}
    trained, seconds = train_plan(model_dir, {**task, "train": str(merged), "validation": None}, plan,
                                  work / "plain-all")
    return trained, seconds, {"plan": "r16/a32 all-linear lr 2e-4 batch 8 1 epoch, every row, no validation"}


# Ablation arms (not run by default): loop-split = the loop on the training split only, plain-all = the product's
# trainer on every row. `--tasks classify --arms loop,loop-split,plain,plain-all` separates trainer from hold-out.
ARMS = {"loop": arm_loop, "plain": arm_plain, "rules": arm_rules, "search": arm_search,
        "loop-split": arm_loop_split, "plain-all": arm_plain_all}


def score(model_dir: Path, adapter: str, test: list[dict]) -> dict:
    from finetune.evaluate import evaluate_adapters

    longest = max(len(p["reference"].split()) for p in test)
    outcome = evaluate_adapters(str(model_dir), [adapter], test, max_new_tokens=min(64, 2 * longest + 6),
                                device="cpu", dtype="fp32")[0]
    if "error" in outcome:
        return {"error": outcome["error"]}
    results = outcome["results"]
    return {"exact_match": sum(r["exact_match"] for r in results) / len(results),
            "token_f1": sum(r["token_f1"] for r in results) / len(results)}


def run_task(name: str, index: int, args, model_dir: Path, root: Path) -> dict:
    label = Path(name).stem if name.endswith(".jsonl") else name  # a file of your own: its name, its own folder
    task = make_task(name, args.rows, args.test_rows, args.seed, root / label)
    stats = token_stats(model_dir, task)
    order = list(args.arms.split(","))
    order = order if index % 2 == 0 else order[::-1]
    ctx = {"force_trials": args.search_trials, "measured_tps": None}
    search_first = "search" in order and ("plain" not in order or order.index("search") < order.index("plain"))
    if search_first:  # the search needs a measured speed before the plain arm runs: a short timing run
        timing = {**PLAIN, "max_steps": 6, "max_seq_len": seq_len_for(stats), "device": "cpu",
                  "dtype": "fp32"}
        trained, _ = train_plan(model_dir, task, timing, root / label / "timing")
        ctx["measured_tps"] = trained["metrics"].get("tokens_per_second")
    out = {"task": label, "train_rows": task["train_rows"], "test_rows": len(task["test"]), "order": order}
    for arm in order:
        trained, seconds, info = ARMS[arm](model_dir, task, stats, root / label, ctx)
        metrics = trained.get("metrics") or {}
        kept = {key: metrics[key] for key in ("steps", "best_step", "best_eval_loss", "stopped_early") if key in metrics}
        out[arm] = {"seconds": round(seconds, 1), **score(model_dir, trained["adapter"], task["test"]), **info, **kept}
        print(json.dumps({"task": label, "arm": arm, **out[arm]}), flush=True)
    return out


def report(results: list[dict]):
    """The auto path (search, else rules) against the recipe: the plain loop when it ran, else the product's
    trainer at the recipe's settings."""
    arms = [a for a in ARMS if a in results[0]]
    baseline = "loop" if "loop" in arms else "plain" if "plain" in arms else arms[0]
    print(f"\n| task | arm | exact match | token F1 | wall s | vs {baseline} time | plan |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for arm in arms:
            a = r[arm]
            ratio = a["seconds"] / r[baseline]["seconds"] if r[baseline]["seconds"] else float("nan")
            print(f"| {r['task']} | {arm} | {a.get('exact_match', float('nan')):.3f} | "
                  f"{a.get('token_f1', float('nan')):.3f} | {a['seconds']:.0f} | {ratio:.2f}x | {a['plan']} |")
    for auto in ("rules", "search"):
        if auto not in arms or auto == baseline:
            continue
        wins = sum(r[auto].get("exact_match", 0) >= r[baseline].get("exact_match", 1) for r in results)
        fast = sum(r[auto]["seconds"] <= 1.5 * r[baseline]["seconds"] for r in results)
        print(f"{auto} >= {baseline} (exact match) on {wins}/{len(results)} tasks; within 1.5x {baseline} time on "
              f"{fast}/{len(results)}")
    if "search" in arms:
        print(f"OOMs in trials: {sum(r['search'].get('ooms', 0) for r in results)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated: {', '.join(TASKS)}, or a .jsonl file of chat rows of your own")
    parser.add_argument("--rows", type=int, default=400, help="train + validation rows per task")
    parser.add_argument("--test-rows", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default="loop,plain,rules,search",
                        help="arms in the order of the first task (the next task runs them reversed)")
    parser.add_argument("--search-trials", type=int, default=None,
                        help="force this many trials (default: the product's default budget)")
    parser.add_argument("--model", default=os.environ.get("TUNEDECK_SMOLLM_DIR") or str(DEFAULT_MODEL))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model_dir = Path(args.model)
    results = []
    with tempfile.TemporaryDirectory(prefix="autotune-quality-") as tmp:
        for index, name in enumerate(args.tasks.split(",")):
            results.append(run_task(name, index, args, model_dir, Path(tmp)))
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

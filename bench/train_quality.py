"""Training quality: the platform's trainer against a plain transformers + peft loop, at identical settings.

    .venv/bin/python bench/train_quality.py                                  # SmolLM2, four tasks, product vs plain
    .venv/bin/python bench/train_quality.py --variants plain,product,legacy,legacy+no-grouping
    .venv/bin/python bench/train_quality.py --quick --model /path/to/tiny     # smoke test: seconds

Four tasks built here by code (no downloads), each with training rows and a held-out test set whose templates or
values the training rows never show:
  classify  the intent of a templated customer message (8 intents; two of each intent's phrasings held out)
  extract   a customer's name and order number from a message, as JSON
  convert   a date written one of several ways -> ISO 8601
  describe  a small record -> one sentence (a reference sentence; exact match and token F1)

Every variant trains the same rows (same tokenisation: the product's chat-template encoder, answers only) with
LoRA at the same rank, alpha, dropout, learning rate, batch size, epochs and seed, then is scored by the same code:
the base model with the saved adapter attached, greedy answers through the chat template
(finetune.evaluate.generate_answers), exact match and token F1 from finetune.evalmetrics, and the mean token loss
on the test answers. Train time is the wall time of the training call (loading included), measured on whatever
else this machine is running: compare times within one run only. Variants run in alternating order per task.

  plain     about 50 lines: AutoModelForCausalLM + peft LoRA, torch AdamW, rows shuffled every epoch, batches
            padded to their longest row, loss = transformers' mean token loss of the batch.
  product   finetune.train.train() with a TrainSpec at today's defaults.
  plain@fp32  the plain loop with fp32 weights whatever --dtype says (added beside plain when --dtype is bf16).

Both sides get the same gradient clipping (--max-grad-norm, 1.0 as the product and HF's Trainer; 0: none), the same
warmup (--warmup-ratio, 0.03 of the steps, linear) and schedule (--lr-schedule, constant after the warmup) and the
same weight dtype (--dtype); each result records the settings its trainer actually used.
  legacy    the trainer's defaults before issue 20 (windowed length sort, cosine to 10 % with 3 % warmup, ...).
  X+Y       a variant with one ablation applied (see ABLATIONS), e.g. legacy+no-grouping, product+holdout.

Defaults (64 rows, 2 epochs, batch 8, lr 5e-4, LoRA r16/a32 all-linear, 16 test rows, one torch thread) are sized
for a shared 2-core CPU, where one run took 10-20 minutes of wall time under other engineers' load; on a free
machine raise --rows/--test and add --seeds 42,43,44, since 16 test rows resolve differences of about 0.1 only.
"""
from __future__ import annotations

import argparse
import calendar
import datetime as dt
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = os.environ.get("TUNEDECK_SMOLLM_DIR", str(ROOT / "var" / "test-models" / "SmolLM2-135M-Instruct"))

# The trainer's choices before issue 20, spelled out so the ablations can start from them.
LEGACY = {"length_group_window": 64, "length_group_min_windows": 1, "lr_schedule": "cosine", "min_lr_ratio": 0.1, "warmup_ratio": 0.03,
          "max_grad_norm": 1.0}
# One change each, applied on top of a variant's TrainSpec fields (or a bench-level switch for holdout/accum).
ABLATIONS = {
    "no-grouping": {"length_group_window": 0},            # pure shuffle: no length grouping at all
    "sorted": {"length_group_window": 64, "length_group_min_windows": 1},  # legacy: small data fully sorted
    "constant-lr": {"lr_schedule": "constant", "warmup_ratio": 0.0},
    "cosine": {"lr_schedule": "cosine", "min_lr_ratio": 0.1, "warmup_ratio": 0.03},
    "no-clip": {"max_grad_norm": None},
    "clip": {"max_grad_norm": 1.0},
    "full-logits": {"plan": {"fused_cross_entropy": False}},
    "torch-dropout": {"plan": {"cpu_dropout": False}},  # torch's own CPU dropout masks (finetune/cpudropout.py)
    "packing": {"packing": True},
    "accum": {"_accum": 2},        # micro-batch halved, 2 accumulation steps: the same effective batch
    "holdout": {"_holdout": 0.1},  # the jobs layer's default validation split taken out of the training rows
}


# ------------------------------------------------------------------------------------------ tasks

INTENTS = {
    "book_flight": ["I need a flight to {city} on {day}.", "Book me a plane ticket to {city} please.",
                    "Can you get me on a flight to {city} {day}?", "Find flights to {city} for {day}.",
                    "I want to fly to {city}.", "Please reserve a seat on a plane to {city} leaving {day}."],
    "cancel_order": ["Cancel my order {order}.", "Please cancel order number {order}, I changed my mind.",
                     "I don't want order {order} anymore, stop it.", "Stop the shipment of order {order}.",
                     "Can you cancel {order}?", "I would like to call off the purchase {order} I made yesterday."],
    "check_balance": ["What's my balance?", "How much money is in my {account} account?",
                      "Show me the balance of my {account} account.", "Tell me how much I have in {account}.",
                      "Balance of {account} please.", "Could you check what is left in my {account} account today?"],
    "weather": ["What's the weather in {city}?", "Will it rain in {city} on {day}?",
                "Is it going to be sunny in {city} {day}?", "Weather forecast for {city} please.",
                "How cold is it in {city} right now?", "Do I need an umbrella in {city} on {day}?"],
    "play_music": ["Play some {genre}.", "Put on {genre} music.", "I want to listen to {genre} songs.",
                   "Start a {genre} playlist.", "Can you play {genre} for me while I cook dinner?",
                   "Music please, something {genre}."],
    "set_alarm": ["Wake me up at {time}.", "Set an alarm for {time}.", "Alarm at {time} on {day} please.",
                  "I need to get up at {time} {day}, set an alarm.", "Ring at {time}.",
                  "Please make sure an alarm goes off at {time} tomorrow morning."],
    "reset_password": ["I forgot my password.", "Reset my password please.", "I can't log in, my password is wrong.",
                       "Help me change the password for {email}.", "Send a password reset link to {email}.",
                       "My login for {email} stopped working, I think I need a new password."],
    "track_package": ["Where is my package {order}?", "Track order {order}.", "When will {order} arrive?",
                      "Has my parcel {order} shipped yet?", "Give me the delivery status of {order}.",
                      "I've been waiting a week for package {order}, where is it now?"],
}
CITIES = ["Oslo", "Lima", "Cairo", "Denver", "Lyon", "Osaka", "Perth", "Quito", "Porto", "Austin", "Bergen", "Delhi",
          "Hanoi", "Dublin", "Tunis", "Seoul", "Boston", "Milan", "Kyiv", "Accra"]
FIRST = ["Maria", "John", "Aiko", "Pedro", "Fatima", "Liam", "Chen", "Olga", "Kwame", "Sara", "Ravi", "Nina", "Tom",
         "Ines", "Yusuf", "Emma", "Hugo", "Lena", "Omar", "Zoe"]
LAST = ["Lopez", "Smith", "Tanaka", "Silva", "Khan", "Murphy", "Wang", "Ivanova", "Mensah", "Berg", "Patel",
        "Novak", "Reed", "Costa", "Demir", "Brown", "Weber", "Fischer", "Haddad", "Clark"]
JOBS = ["baker", "nurse", "pilot", "teacher", "plumber", "chemist", "farmer", "lawyer", "painter", "tailor"]
PETS = ["cat", "dog", "parrot", "rabbit", None, None]


def _classify(rng, held_out: bool) -> dict:
    intent = rng.choice(sorted(INTENTS))
    templates = INTENTS[intent][4:] if held_out else INTENTS[intent][:4]
    message = rng.choice(templates).format(
        city=rng.choice(CITIES), day=rng.choice(["Monday", "Friday", "tomorrow", "next week", "on the 3rd"]),
        order=f"A{rng.randint(1000, 99999)}", account=rng.choice(["savings", "checking", "joint"]),
        genre=rng.choice(["jazz", "rock", "classical", "hip hop", "folk"]),
        time=f"{rng.randint(5, 9)}:{rng.choice(['00', '15', '30', '45'])}",
        email=f"{rng.choice(FIRST).lower()}@example.com")
    prompt = f"Intent of this message: {message}"
    return _row(prompt, intent)


def _extract(rng, held_out: bool) -> dict:
    name, order = f"{rng.choice(FIRST)} {rng.choice(LAST)}", str(rng.randint(10000, 99999))
    city = rng.choice(CITIES)
    train_templates = [
        "Hi, this is {name} from {city}. My order {order} never arrived.",
        "Order {order} is damaged. Regards, {name}",
        "Hello! {name} here, writing about order number {order}; the box was empty.",
        "I am {name} and I want a refund for {order}, thanks.",
    ]
    test_templates = ["Dear support, please look into order {order}. Kind regards, {name} ({city})",
                      "{name} again: still no news about my order {order}!"]
    message = rng.choice(test_templates if held_out else train_templates).format(name=name, city=city, order=order)
    prompt = f"Extract the customer's name and order number as JSON with keys name and order.\nMessage: {message}"
    return _row(prompt, json.dumps({"name": name, "order": order}))


def _convert(rng, held_out: bool) -> dict:
    day = dt.date(1990, 1, 1) + dt.timedelta(days=rng.randint(0, 365 * 40))
    month = calendar.month_name[day.month]
    written = rng.choice([
        f"{month} {day.day}, {day.year}", f"{day.day} {month} {day.year}", f"{month[:3]} {day.day} {day.year}",
        f"{day.day:02d}.{day.month:02d}.{day.year}", f"the {day.day}th of {month}, {day.year}",
    ])
    return _row(f"Convert the date to ISO format (YYYY-MM-DD): {written}", day.isoformat())


def _describe(rng, held_out: bool) -> dict:
    record = {"name": rng.choice(FIRST), "age": rng.randint(19, 80), "job": rng.choice(JOBS),
              "city": rng.choice(CITIES), "pet": rng.choice(PETS)}
    shown = {k: v for k, v in record.items() if v is not None}
    if rng.random() < 0.5:
        written = json.dumps(shown)
    else:
        written = "; ".join(f"{k}={v}" for k, v in shown.items())
    sentence = f"{record['name']} is a {record['age']}-year-old {record['job']} from {record['city']}"
    sentence += f" who has a {record['pet']}." if record["pet"] else "."
    return _row(f"Describe this record in one sentence.\nRecord: {written}", sentence)


def _row(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


TASKS = {"classify": _classify, "extract": _extract, "convert": _convert, "describe": _describe}


def make_task(name: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic rows for a task; test rows never repeat a training row's prompt."""
    make = TASKS[name]
    rng = random.Random(f"{name}-{seed}")
    train = [make(rng, False) for _ in range(n_train)]
    seen = {r["messages"][0]["content"] for r in train}
    test: list[dict] = []
    while len(test) < n_test:
        row = make(rng, True)
        if row["messages"][0]["content"] not in seen:
            seen.add(row["messages"][0]["content"])
            test.append(row)
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ the two trainers


def plain_dtype(s: dict):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[s.get("dtype") or "fp32"]


def plain_lr(step: int, total: int, s: dict) -> float:
    """The learning rate at a step: linear warmup over int(warmup_ratio x total) steps, then constant (or cosine
    down to min_lr_ratio): the same rule as the product's trainer, written out here."""
    import math

    warmup = int((s.get("warmup_ratio") or 0.0) * total)
    if step < warmup:
        return s["lr"] * (step + 1) / warmup
    if (s.get("lr_schedule") or "constant") == "constant":
        return s["lr"]
    floor = s.get("min_lr_ratio", 0.1)
    progress = (step - warmup) / max(1, total - warmup)
    return s["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_plain(model_dir: str, rows: list[dict], s: dict, out_dir: Path, save_after: dict | None = None) -> dict:
    """The plain recipe: LoRA, AdamW, shuffled batches, mean token loss per batch, gradient clipping at
    s["max_grad_norm"] (None: none), s["warmup_ratio"] of linear warmup, s["lr_schedule"], weights in s["dtype"].
    save_after {passes: folder} also saves the adapter after those passes (a constant rate without warmup makes
    the first P passes of a longer run exactly the P-pass run). Returns the seconds spent loading, in each pass
    and saving, so a pass count's cost as a run of its own can be told."""
    import torch

    started = time.monotonic()
    torch.manual_seed(s["seed"])
    model, encoded, pad = load_plain(model_dir, rows, s)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s["lr"], weight_decay=0.0)
    rng = random.Random(s["seed"])
    timing = {"load_seconds": time.monotonic() - started, "pass_seconds": [], "save_seconds": 0.0,
              "tokens": 0, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "steps": 0,
              "total_steps": int(s["epochs"]) * -(-len(encoded) // s["batch"])}
    for epoch in range(int(s["epochs"])):
        began = time.monotonic()
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order), s["batch"]):
            plain_step(model, [encoded[i] for i in order[start : start + s["batch"]]], pad, params, optimizer, s,
                       timing)
        timing["pass_seconds"].append(time.monotonic() - began)
        if (save_after or {}).get(epoch + 1) is not None:
            save_plain(model, save_after[epoch + 1], timing)
    save_plain(model, out_dir, timing)
    return timing


def load_plain(model_dir: str, rows: list[dict], s: dict):
    """The base in s["dtype"] with a fresh LoRA on every linear layer, the rows encoded, and the pad id."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.tokenize import encode_example

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=plain_dtype(s))
    model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    encoded = [encode_example(r, tokenizer, s["max_seq_len"]) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, encoded, pad


def plain_step(model, batch, pad: int, params, optimizer, s: dict, timing: dict) -> None:
    """One batch padded to its longest row, transformers' mean token loss, clipping, this step's rate, a step."""
    import torch

    from finetune.tokenize import IGNORE

    width = max(len(e.input_ids) for e in batch)
    ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch])
    labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in batch])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    if s.get("max_grad_norm"):
        torch.nn.utils.clip_grad_norm_(params, s["max_grad_norm"])
    for group in optimizer.param_groups:
        group["lr"] = plain_lr(timing["steps"], timing["total_steps"], s)
    optimizer.step()
    optimizer.zero_grad()
    timing["steps"] += 1
    timing["tokens"] += int(mask.sum())


def save_plain(model, folder, timing: dict) -> None:
    began = time.monotonic()
    model.save_pretrained(str(folder))
    timing["save_seconds"] = time.monotonic() - began


def trainer_settings(s: dict) -> dict:
    """What both trainers are given beyond the recipe: identical on both sides by construction."""
    return {"max_grad_norm": s.get("max_grad_norm"), "warmup_ratio": s.get("warmup_ratio") or 0.0,
            "lr_schedule": s.get("lr_schedule") or "constant", "dtype": s.get("dtype") or "fp32"}


def train_product(model_dir: str, train_file: Path, s: dict, out_dir: Path, fields: dict) -> dict:
    """finetune.train.train() with the same settings; `fields` are the variant's TrainSpec values."""
    from finetune.train import TrainSpec, train

    fields = dict(fields)
    accum = int(fields.pop("_accum", 1))
    fields.pop("_holdout", None)
    plan = {"method": "lora", "rank": s["rank"], "alpha": s["alpha"], "dropout": s["dropout"],
            "target_modules": "all-linear", "micro_batch": s["batch"] // accum, "grad_accum": accum,
            "max_seq_len": s["max_seq_len"], "learning_rate": s["lr"], "epochs": s["epochs"], "seed": s["seed"],
            "device": "cpu", "max_eval_generations": 0, **trainer_settings(s), **fields.pop("plan", {})}
    spec = TrainSpec.from_plan(plan, base_model_path=model_dir, train_file=str(train_file), output_dir=str(out_dir))
    if trainer_settings(s)["max_grad_norm"] is None:
        spec.max_grad_norm = None  # from_plan skips None values: no clipping must stay no clipping
    for name, value in fields.items():
        setattr(spec, name, value)
    metrics = train(spec).metrics
    metrics["settings"] = {name: getattr(spec, name) for name in ("max_grad_norm", "warmup_ratio", "lr_schedule",
                                                                   "dtype")}
    return metrics


# ------------------------------------------------------------------------------------------ scoring (both sides)


def score_adapter(model_dir: str, adapter_dir: Path, test_rows: list[dict], s: dict) -> dict:
    """Greedy answers through the chat template, exact match / token F1, and mean token loss on the answers."""
    import torch

    from finetune.evaluate import generate_answers, score_answers
    from finetune.merge import attach_adapter
    from finetune.modelstore import load_model_and_tokenizer
    from finetune.tokenize import encode_example

    base, tokenizer = load_model_and_tokenizer(model_dir, device="cpu", dtype="fp32")
    model = attach_adapter(base, adapter_dir)
    prompts = [{"messages": r["messages"][:-1], "reference": r["messages"][-1]["content"]} for r in test_rows]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=s["max_new_tokens"])
    summary = score_answers(prompts, answers)["summary"]
    total, count = 0.0, 0
    with torch.no_grad():
        for row in test_rows:
            enc = encode_example(row, tokenizer, s["max_seq_len"])
            labels = torch.tensor([enc.labels])
            out = model(input_ids=torch.tensor([enc.input_ids]), labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
    return {"exact_match": summary.get("exact_match", 0.0), "token_f1": summary.get("token_f1", 0.0),
            "val_loss": total / max(count, 1), "sample": answers[0] if answers else ""}


# ------------------------------------------------------------------------------------------ variants


def variant_fields(name: str) -> dict:
    """TrainSpec fields (and bench switches) for a variant name: product | legacy, then +ablation ..."""
    base, *changes = name.split("+")
    if base not in ("product", "legacy"):
        raise SystemExit(f"Unknown variant {name!r}: start with plain, product or legacy.")
    fields: dict = dict(LEGACY) if base == "legacy" else {}
    for change in changes:
        if change not in ABLATIONS:
            raise SystemExit(f"Unknown ablation {change!r}; choose from {', '.join(ABLATIONS)}.")
        for key, value in ABLATIONS[change].items():
            if key == "plan":
                fields["plan"] = {**fields.get("plan", {}), **value}
            else:
                fields[key] = value
    return fields


def run_variant(name: str, model_dir: str, train_rows, test_rows, s: dict, work: Path) -> dict:
    out = work / name.replace("+", "_").replace("@", "_")
    started = time.monotonic()
    if name.startswith("plain"):
        plain = {**s, "dtype": name.partition("@")[2] or s.get("dtype") or "fp32"}
        timing = train_plain(model_dir, train_rows, plain, out)
        info = {"rows": len(train_rows), "steps": timing["steps"],
                "settings": {**trainer_settings(plain), "dtype": plain["dtype"]}, "weights_dtype": timing["dtype"]}
    else:
        fields = variant_fields(name)
        rows = train_rows
        if fields.get("_holdout"):
            from finetune.data import split_dataset

            n_train, _ = split_dataset(write_jsonl(work / "all.jsonl", train_rows), work / "split-train.jsonl",
                                       work / "split-val.jsonl", fraction=fields["_holdout"], seed=42)
            train_file = work / "split-train.jsonl"
            info = {"rows": n_train}
        else:
            train_file = write_jsonl(work / "train.jsonl", rows)
            info = {"rows": len(rows)}
        metrics = train_product(model_dir, train_file, s, out, fields)
        info["steps"] = metrics.get("steps")
        info["settings"] = metrics["settings"]
    seconds = time.monotonic() - started
    return {"variant": name, "train_seconds": round(seconds, 1), **info, **score_adapter(model_dir, out, test_rows, s)}


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    s = {"rank": args.rank, "alpha": args.alpha, "dropout": args.dropout, "lr": args.lr, "batch": args.batch,
         "epochs": args.epochs, "max_seq_len": args.max_seq_len, "max_new_tokens": args.max_new_tokens,
         "max_grad_norm": args.max_grad_norm or None, "warmup_ratio": args.warmup_ratio,
         "lr_schedule": args.lr_schedule, "dtype": args.dtype}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.dtype != "fp32" and "plain" in variants and "plain@fp32" not in variants:
        variants.insert(variants.index("plain") + 1, "plain@fp32")  # a plain loop's CPU default, beside
    results = []
    for t, task in enumerate(args.tasks.split(",")):
        train_rows, test_rows = make_task(task, args.rows, args.test)
        for seed in [int(x) for x in str(args.seeds).split(",")]:
            order = variants if t % 2 == 0 else variants[::-1]  # alternate who goes first
            for name in order:
                with tempfile.TemporaryDirectory(prefix="tq-") as tmp:
                    row = run_variant(name, args.model, train_rows, test_rows, {**s, "seed": seed}, Path(tmp))
                row.update({"task": task, "seed": seed})
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return {"settings": {**s, "rows": args.rows, "test": args.test, "model": args.model, "seeds": args.seeds},
            "results": results, "summary": summarise(results, variants)}


def summarise(results: list[dict], variants: list[str]) -> list[dict]:
    """Mean over seeds per task and variant, with the difference to the plain loop."""
    table = []
    for task in dict.fromkeys(r["task"] for r in results):
        plain = [r for r in results if r["task"] == task and r["variant"] == "plain"]
        for name in variants:
            rows = [r for r in results if r["task"] == task and r["variant"] == name]
            entry = {"task": task, "variant": name}
            for key in ("exact_match", "token_f1", "val_loss", "train_seconds"):
                entry[key] = round(statistics.mean(r[key] for r in rows), 4)
            if plain and name != "plain":
                entry["em_vs_plain"] = round(entry["exact_match"] - statistics.mean(r["exact_match"] for r in plain), 4)
            table.append(entry)
    return table


def print_table(report: dict) -> None:
    print("| task | variant | exact match | token F1 | val loss | train s | EM vs plain |")
    print("|---|---|---|---|---|---|---|")
    for e in report["summary"]:
        diff = e.get("em_vs_plain")
        print(f"| {e['task']} | {e['variant']} | {e['exact_match']:.3f} | {e['token_f1']:.3f} | {e['val_loss']:.3f} "
              f"| {e['train_seconds']:.0f} | {'' if diff is None else f'{diff:+.3f}'} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--variants", default="plain,product")
    p.add_argument("--rows", type=int, default=64, help="training rows per task")
    p.add_argument("--test", type=int, default=16, help="held-out test rows per task")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=24)
    # Both trainers get these, so they differ in nothing else (the product's defaults; 0 turns clipping off).
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="both trainers' weights (bf16 adds a plain loop in fp32, variant plain@fp32, beside)")
    p.add_argument("--seeds", default="42")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared CPU, OpenMP threads spin-waiting on each other were "
                        "measured 7x slower than one thread)")
    p.add_argument("--quick", action="store_true", help="smoke test: 16 rows, 4 test rows, 4 new tokens")
    p.add_argument("--json", help="also write the report to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.test, args.max_new_tokens, args.batch, args.epochs = 16, 4, 4, 4, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

"""Plan and job commands: plan, train, watch, jobs, cancel."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

from finetune.methods import AUTO, method_names, method_plan_fields
from finetune.units import format_bytes, format_duration

from .arguments import command, positive_int
from .client import EXIT_CANCELLED, EXIT_INTERRUPTED, Client, CliError
from .output import ProgressBar, number, one_line, print_json, status_line, table, when

ACTIVE_JOB = ("queued", "running")
METHODS = [AUTO, *method_names()]


def parse_setting(text: str):
    """key=value; the value is read as JSON where it parses (numbers, true/false, lists), else kept a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    if isinstance(parsed, dict) or (isinstance(parsed, float) and math.isnan(parsed)):
        parsed = value
    return key, parsed


def overrides_from(settings) -> dict:
    return dict(settings or [])


def print_plan(plan, heading=""):
    if heading:
        print(heading)
    rows = [
        ("method", plan.get("method")),
        ("rank / alpha", f"{number(plan.get('rank'))} / {number(plan.get('alpha'))}"),
        ("target modules", number(plan.get("target_modules"))),
        ("micro batch", (f"{plan.get('micro_batch')} × grad accum {plan.get('grad_accum')} "
                         f"(effective {(plan.get('micro_batch') or 0) * (plan.get('grad_accum') or 0)})")),
        ("max seq len", plan.get("max_seq_len")),
        ("grad checkpointing", number(plan.get("gradient_checkpointing"))),
        ("learning rate", number(plan.get("learning_rate"))),
        ("epochs", number(plan.get("epochs"))),
        ("device / dtype", f"{plan.get('device', '-')} / {plan.get('dtype', '-')}"),
    ]
    for key in ("max_steps", "dropout", "num_virtual_tokens", "adapter_bottleneck", *method_plan_fields()):
        if plan.get(key) is not None:
            rows.append((key.replace("_", " "), number(plan[key])))
    for name, value in rows:
        print(f"  {name:<19} {value}")
    memory = plan.get("memory") or {}
    total, capacity = memory.get("total_bytes") or 0, memory.get("capacity_bytes") or 0
    fits = plan.get("fits", total <= capacity if capacity else True)
    print(f"Memory: {format_bytes(total)} of {format_bytes(capacity)} usable"
          f" ({'fits' if fits else 'does NOT fit'})")
    breakdown = {k: v for k, v in (memory.get("breakdown") or {}).items() if isinstance(v, (int, float)) and v > 0}
    scale = max([capacity, total, *breakdown.values()]) or 1
    for name, value in sorted(breakdown.items(), key=lambda kv: -kv[1]):
        bar = "#" * max(1, round(30 * value / scale))
        print(f"  {name.replace('_', ' '):<22} {bar:<30} {format_bytes(value):>10}")
    if plan.get("reasons"):
        print("Why:")
        for reason in plan["reasons"]:
            print(f"  - {reason}")


def cmd_plan(args):
    client = Client.from_config()
    body = {"dataset": args.dataset, "method": args.method, "overrides": overrides_from(args.set)}
    if args.base_model:
        body["base_model"] = args.base_model
    plan = client.post("/plans", json=body)
    if args.json:
        return print_json(plan)
    print_plan(plan, f"Plan for dataset {args.dataset}" + (f" on base model {args.base_model}" if args.base_model else ""))


def cmd_train(args):
    client = Client.from_config()
    body = {"dataset": args.dataset, "method": args.method, "overrides": overrides_from(args.set)}
    if args.base_model:
        body["base_model"] = args.base_model
    if args.name:
        body["adapter_name"] = args.name
    job = client.post("/jobs", json=body)
    if args.json and not args.watch:
        return print_json(job)
    plan = job.get("plan") or {}
    print(f"Job {job['id']} {job['status']}: adapter {job.get('adapter_name')}, method {plan.get('method')}, "
          f"rank {plan.get('rank')}, micro batch {plan.get('micro_batch')}×{plan.get('grad_accum')}, "
          f"max seq len {plan.get('max_seq_len')}.", file=sys.stderr if args.json else sys.stdout)
    if args.watch:
        return watch_job(client, job["id"], interval=args.interval, as_json=args.json)
    print(f"Follow it with: tunedeck watch {job['id']}")


def job_suffix(job) -> str:
    metrics = job.get("metrics") or {}
    parts = []
    if metrics.get("train_loss") is not None:
        parts.append(f"loss {metrics['train_loss']:.4f}")
    if metrics.get("eval_loss") is not None:
        parts.append(f"eval {metrics['eval_loss']:.4f}")
    if metrics.get("tokens_per_second"):
        parts.append(f"{metrics['tokens_per_second']:.0f} tok/s")
    if metrics.get("eta_seconds") is not None and job["status"] == "running":
        parts.append(f"eta {format_duration(metrics['eta_seconds'])}")
    return " ".join(parts)


def watch_job(client, job_id, interval=1.0, as_json=False) -> int:
    bar, last_status, last_step = None, None, None
    try:
        while True:
            job = client.get(f"/jobs/{job_id}")
            status = job["status"]
            if status == "queued" and status != last_status:
                status_line(f"Job {job_id} queued: waiting for a worker…")
            if status == "running" or (status not in ACTIVE_JOB and bar is not None):
                if bar is None:
                    if last_status == "queued" and sys.stderr.isatty():
                        sys.stderr.write("\n")
                    bar = ProgressBar(job.get("total_steps") or 0, f"Job {job_id}", unit="steps")
                bar.total = job.get("total_steps") or bar.total
                if job.get("step") != last_step or sys.stderr.isatty():
                    bar.update(job.get("step") or 0, job_suffix(job))
                    last_step = job.get("step")
            last_status = status
            if status not in ACTIVE_JOB:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        if bar:
            bar.finish()
        print(f"\nStopped watching job {job_id}; it keeps going (`tunedeck cancel {job_id}` stops it).",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if bar:
        bar.finish(job_suffix(job))
    if as_json:
        print_json(job)
    if status == "succeeded":
        version = job.get("adapter_version")
        label = ""
        if version:
            v = client.get(f"/adapter-versions/{version}")
            label = f": adapter {v['adapter_name']} v{v['version']} (version id {version})"
        metrics = job.get("metrics") or {}
        summary = ", ".join(f"{k} {number(metrics[k])}" for k in ("train_loss", "eval_loss", "perplexity")
                            if metrics.get(k) is not None)
        print(f"Job {job_id} succeeded{label}." + (f" {summary}." if summary else ""),
              file=sys.stderr if as_json else sys.stdout)
        return 0
    if status == "cancelled":
        print(f"Job {job_id} was cancelled.", file=sys.stderr)
        return EXIT_CANCELLED
    raise CliError(f"Job {job_id} failed: {one_line(job.get('error') or 'no error recorded', 400)}")


def cmd_watch(args):
    return watch_job(Client.from_config(), args.job, interval=args.interval, as_json=args.json)


def cmd_jobs(args):
    client = Client.from_config()
    items, _ = client.list("/jobs", params={"status": args.status} if args.status else None)
    if args.json:
        return print_json(items)
    table([[j["id"], j["status"], j.get("adapter_name"), (j.get("plan") or {}).get("method") or j.get("method"),
            f"{j.get('step')}/{j.get('total_steps')}", f"{(j.get('progress') or 0) * 100:.0f}%",
            number((j.get("metrics") or {}).get("train_loss")), j.get("adapter_version"), when(j.get("created_at"))]
           for j in items],
          ["ID", "STATUS", "ADAPTER", "METHOD", "STEP", "DONE", "LOSS", "VERSION", "CREATED"],
          empty="No jobs yet: tunedeck train --dataset ID")


def cmd_cancel(args):
    client = Client.from_config()
    job = client.post(f"/jobs/{args.job}/cancel")
    if args.json:
        return print_json(job)
    if job["status"] == "cancelled":
        print(f"Job {args.job} cancelled.")
    elif job["status"] == "running":
        print(f"Cancel requested: job {args.job} stops at its next step.")
    else:
        print(f"Job {args.job} is already {job['status']}; nothing to cancel.")


def add_commands(sub):
    # plan and train take the same choices; train also names the adapter and can follow the job.
    for name, func, text in (("plan", cmd_plan, "show the training plan, its memory breakdown and the reasons"),
                             ("train", cmd_train, "start a fine-tuning job")):
        p = command(sub, name, func, text, json_flag=True)
        p.add_argument("--dataset", "-d", type=positive_int, required=True)
        p.add_argument("--base-model", type=positive_int, help="default: the server's default model")
        p.add_argument("--method", "-m", default=AUTO, choices=METHODS)
        p.add_argument("--set", "-s", action="append", type=parse_setting, metavar="KEY=VALUE",
                       help="fix a plan field, e.g. --set rank=16 --set max_steps=100 (repeatable)")
        if name == "train":
            p.add_argument("--name", help="adapter name (versions of one name are v1, v2, …)")
            p.add_argument("--watch", "-w", action="store_true", help="follow the job until it ends")
            p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)

    p = command(sub, "watch", cmd_watch, "follow a job: progress bar and live loss; exit 0 if it succeeds",
                 json_flag=True)
    p.add_argument("job", type=positive_int)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    p = command(sub, "jobs", cmd_jobs, "list your jobs", json_flag=True)
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p = command(sub, "cancel", cmd_cancel, "cancel a job", json_flag=True)
    p.add_argument("job", type=positive_int)

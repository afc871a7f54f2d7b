"""Dataset commands: upload (streamed, with a progress bar), datasets, dataset."""
from __future__ import annotations

import time
from pathlib import Path

from finetune.units import format_bytes, format_duration

from .arguments import command, positive_int
from .client import EXIT_USAGE, Client, CliError
from .multipart import MultipartStream
from .output import ProgressBar, one_line, print_json, table, when


def cmd_upload(args):
    client = Client.from_config()
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"No such file: {path}", EXIT_USAGE)
    files = {"file": path}
    if args.validation_file:
        if not Path(args.validation_file).is_file():
            raise CliError(f"No such file: {args.validation_file}", EXIT_USAGE)
        files["validation_file"] = Path(args.validation_file)
    fields = {"name": args.name, "base_model": args.base_model, "validation_fraction": args.validation_fraction,
              "schema": args.schema, "drop_invalid": "true" if args.drop_invalid else None}
    bar = None if args.quiet else ProgressBar(0, f"Uploading {path.name}")
    body = MultipartStream(fields, files, on_progress=(lambda sent, total: bar.update(sent)) if bar else None)
    if bar:
        bar.total = len(body)
    try:
        dataset = client.post("/datasets", data=body, headers={"Content-Type": body.content_type},
                              timeout=(10, 600))
    finally:
        body.close()
        if bar:
            bar.finish()
    if not args.json:
        verb = "Already uploaded with these settings: reusing" if dataset.get("reused") else "Uploaded"
        print(f"{verb} dataset {dataset['id']} ({dataset['name']}): {dataset['status']}.")
    if args.wait:
        dataset = wait_for_dataset(client, dataset["id"], quiet=args.json)
    if args.json:
        print_json(dataset)
    elif args.wait:
        print_dataset(dataset)
    if dataset["status"] == "invalid" and args.wait:
        raise CliError(f"Dataset {dataset['id']} is invalid: {one_line(dataset.get('error'), 300)}")


def wait_for_dataset(client, dataset_id, quiet=False, interval=0.5, timeout=3600):
    deadline = time.monotonic() + timeout
    bar = None if quiet else ProgressBar(100, f"Validating dataset {dataset_id}", unit="%")
    while True:
        dataset = client.get(f"/datasets/{dataset_id}")
        if bar:
            bar.update(int(100 * (dataset.get("progress") or 0)))
        if dataset["status"] != "validating":
            if bar:
                bar.done = 100
                bar.finish(dataset["status"])
            return dataset
        if time.monotonic() > deadline:
            raise CliError(f"Dataset {dataset_id} is still validating after {format_duration(timeout)}.")
        time.sleep(interval)


def cmd_datasets(args):
    client = Client.from_config()
    items, _total = client.list("/datasets")
    if args.json:
        return print_json(items)
    table([[d["id"], d["name"], d["status"], d.get("schema") or "-", d.get("rows"), format_bytes(d.get("size_bytes")),
            when(d.get("created_at"))] for d in items],
          ["ID", "NAME", "STATUS", "SCHEMA", "ROWS", "SIZE", "CREATED"], empty="No datasets yet: tunedeck upload FILE")


def print_dataset(d):
    print(f"Dataset {d['id']}: {d['name']}")
    print(f"  status      {d['status']}" + (f" ({d['progress'] * 100:.0f}%)" if d["status"] == "validating" else ""))
    print(f"  file        {d.get('original_filename') or '-'} ({format_bytes(d.get('size_bytes'))})")
    print(f"  format      {d.get('format') or '-'} / schema {d.get('schema') or '-'}")
    print(f"  rows        {d.get('rows')} ({d.get('train_rows')} train, {d.get('validation_rows')} validation)")
    stats = d.get("token_stats") or {}
    if stats.get("max") is not None:
        print(f"  tokens      min {stats.get('min')}, p50 {stats.get('p50')}, p95 {stats.get('p95')}, "
              f"max {stats.get('max')}" + (f" ({stats['tokenizer']} tokenizer)" if stats.get("tokenizer") else ""))
    elif stats.get("error"):
        print(f"  tokens      {stats['error']}")
    counts = {k: v for k, v in (d.get("problem_counts") or {}).items() if v}
    if counts:
        print("  problems    " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(counts.items())))
    if d.get("error"):
        print(f"  error       {one_line(d['error'], 300)}")
    for e in (d.get("errors") or [])[:10]:
        print(f"    row {e.get('row')}: {one_line(e.get('message'), 100)}")
    if len(d.get("errors") or []) > 10:
        print(f"    … and {len(d['errors']) - 10} more")


def cmd_dataset(args):
    client = Client.from_config()
    if args.delete:
        client.delete(f"/datasets/{args.id}")
        print(f"Deleted dataset {args.id}.")
        return
    dataset = client.get(f"/datasets/{args.id}")
    if args.json:
        return print_json(dataset)
    print_dataset(dataset)


def add_commands(sub):
    p = command(sub, "upload", cmd_upload, "upload a dataset file (JSONL, JSON, CSV, Parquet)", json_flag=True)
    p.add_argument("file")
    p.add_argument("--name")
    p.add_argument("--base-model", type=positive_int, help="base model id for token statistics (default: default)")
    p.add_argument("--validation-file", help="a separate validation file (else a fraction is split off)")
    p.add_argument("--validation-fraction", type=float)
    p.add_argument("--schema", help="force a schema: messages, sharegpt, prompt_completion, alpaca, text, preference, "
                                    "kto")
    p.add_argument("--drop-invalid", action="store_true", help="drop rows that fail validation and use the rest")
    p.add_argument("--wait", action="store_true", help="wait for validation; exit 1 if the dataset is invalid")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    command(sub, "datasets", cmd_datasets, "list your datasets", json_flag=True)
    p = command(sub, "dataset", cmd_dataset, "show a dataset: status, schema, rows, token statistics, problems",
                 json_flag=True)
    p.add_argument("id", type=positive_int)
    p.add_argument("--delete", action="store_true", help="delete it (refused while a job uses it)")

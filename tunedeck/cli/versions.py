"""Adapter version commands: versions, compare, download."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import requests

from finetune.units import format_bytes

from .arguments import command, positive_int
from .client import EXIT_CONNECTION, Client, CliError
from .output import ProgressBar, number, one_line, print_json, table, when


def cmd_versions(args):
    client = Client.from_config()
    items, _ = client.list("/adapter-versions")
    if args.json:
        return print_json(items)
    table([[v["id"], f"{v['adapter_name']} v{v['version']}" + (" *" if v.get("is_champion") else ""), v.get("method"),
            v.get("dataset"), number((v.get("metrics") or {}).get("train_loss")),
            number((v.get("metrics") or {}).get("eval_loss")), when(v.get("created_at"))] for v in items],
          ["ID", "ADAPTER", "METHOD", "DATASET", "TRAIN LOSS", "EVAL LOSS", "CREATED"],
          empty="No adapter versions yet.")


def cmd_compare(args):
    client = Client.from_config()
    data = client.get("/adapter-versions/compare", params={"ids": ",".join(str(i) for i in args.ids)})
    if args.json:
        return print_json(data)
    labels = [f"#{v['id']} {v['label']}" for v in data["versions"]]
    print("Settings (* differs):")
    table([[("* " if row["differs"] else "  ") + row["field"], *[number(x) for x in row["values"]]]
           for row in data["settings"]], ["  FIELD", *labels])
    print("\nMetrics (* best):")
    table([[row["metric"], *[number(x) + (" *" if i == row.get("best") else "") for i, x in enumerate(row["values"])]]
           for row in data["metrics"]], ["METRIC", *labels], empty="(no metrics)")
    if data.get("generations"):
        print("\nGenerations:")
        for gen in data["generations"][: args.generations]:
            print(f"  prompt: {one_line(gen.get('prompt'), 100)}")
            if gen.get("reference") is not None:
                print(f"    reference: {one_line(gen['reference'], 100)}")
            for label, output in zip(labels, gen.get("outputs") or []):
                print(f"    {label}: {one_line(output, 100)}")


def filename_from(response, default):
    header = response.headers.get("Content-Disposition", "")
    match = re.search(r"filename\*=UTF-8''([^;]+)", header) or re.search(r'filename="?([^";]+)"?', header)
    if match:
        from urllib.parse import unquote

        name = Path(unquote(match.group(1))).name
        if name and name not in (".", ".."):
            return name
    return default


def cmd_download(args):
    client = Client.from_config()
    response = client.get(f"/adapter-versions/{args.version}/download", stream=True, timeout=(10, 600))
    out = Path(args.output) if args.output else Path(filename_from(response, f"adapter-version-{args.version}.zip"))
    if out.is_dir():
        out = out / filename_from(response, f"adapter-version-{args.version}.zip")
    total = int(response.headers.get("Content-Length") or 0)
    bar = None if args.quiet else ProgressBar(total, f"Downloading {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-")
    written = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in response.iter_content(256 * 1024):
                handle.write(chunk)
                written += len(chunk)
                if bar:
                    bar.update(written)
        os.replace(tmp, out)
    except requests.exceptions.RequestException as exc:
        raise CliError(f"The download broke off: {exc}", EXIT_CONNECTION) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
        if bar:
            bar.total = bar.total or written
            bar.finish()
    print(f"Saved adapter version {args.version} to {out} ({format_bytes(written)}).")


def add_commands(sub):
    command(sub, "versions", cmd_versions, "list adapter versions", json_flag=True)
    p = command(sub, "compare", cmd_compare, "compare 2 to 4 adapter versions side by side", json_flag=True)
    p.add_argument("ids", type=positive_int, nargs="+", metavar="ID")
    p.add_argument("--generations", type=int, default=5, help="how many prompts' generations to show")
    p = command(sub, "download", cmd_download, "download an adapter version as a zip")
    p.add_argument("version", type=positive_int)
    p.add_argument("-o", "--output", help="file (or folder) to write; default: the server's file name")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

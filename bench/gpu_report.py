"""Collects bench/gpu_suite.sh's parts into one report: <prefix>.json (every part's status, JSON rows and log
tail) and <prefix>.md (a summary per part). Run after every part, so a cut-off suite still leaves its results.

    python bench/gpu_report.py WORK_DIR PREFIX [--dry-run]
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

PARTS = ("gpu_tests", "memory", "select_caps", "train_speed", "serving", "multi_gpu")
LOG_TAIL = 4000


def collect(work: Path) -> dict:
    parts = {}
    for name in PARTS:
        status = work / f"{name}.status"
        if not status.is_file():
            continue
        part = json.loads(status.read_text())
        log = work / f"{name}.log"
        part["log_tail"] = log.read_text(errors="replace")[-LOG_TAIL:] if log.is_file() else ""
        rows = work / f"{name}.json"
        if rows.is_file():
            try:
                part["results"] = json.loads(rows.read_text())
            except ValueError:
                part["results"] = None
        part["outcome"] = outcome(part)
        parts[name] = part
    return parts


def outcome(part: dict) -> str:
    if part["rc"] in (124, 137):
        return f"cut off at its {part['budget']} s budget"
    return "ok" if part["rc"] == 0 else f"failed (exit {part['rc']})"


def memory_summary(results) -> list[str]:
    rows = [r for r in (results or {}).get("estimate", []) if isinstance(r, dict)]
    errors = [r["error"] for r in rows if isinstance(r.get("error"), (int, float))]
    lines = [f"- {len(rows)} configurations, {len(errors)} measured"]
    if errors:
        absolute = sorted(abs(e) for e in errors)
        lines.append(f"- |error| median {statistics.median(absolute):.1%}, worst {absolute[-1]:.1%} "
                     f"(goal: median <= 3 %, worst <= 8 %)")
    return lines


def select_summary(results) -> list[str]:
    rows = [r for r in (results or {}).get("select", []) if isinstance(r, dict)]
    ooms = sum(1 for r in rows if r.get("plan_oom"))
    return [f"- {len(rows)} caps planned and trained, {ooms} out-of-memory (goal: 0)"]


def markdown(parts: dict, dry_run: bool) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# GPU suite {'(dry run on the CPU, tiny shapes)' if dry_run else ''} - {when}", "",
             f"Host: {platform.node()}, Python {platform.python_version()}", ""]
    lines += ["| part | outcome | seconds | budget |", "|---|---|---|---|"]
    for name, part in parts.items():
        lines.append(f"| {name} | {part['outcome']} | {part['seconds']} | {part['budget']} |")
    for name, part in parts.items():
        lines += ["", f"## {name}", ""]
        if name == "memory" and part.get("results"):
            lines += memory_summary(part["results"])
        if name == "select_caps" and part.get("results"):
            lines += select_summary(part["results"])
        lines += ["", "```", part["log_tail"][-2500:].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    work, prefix = Path(argv[1]), Path(argv[2])
    dry_run = "--dry-run" in argv
    parts = collect(work)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps({"dry_run": dry_run, "parts": parts}, indent=1, default=str))
    prefix.with_suffix(".md").write_text(markdown(parts, dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

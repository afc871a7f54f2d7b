"""What the commands print: tables, one-line summaries, numbers, a progress bar and a status line on stderr."""
from __future__ import annotations

import json
import shutil
import sys
import time

from finetune.units import format_bytes


def number(value, digits=4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def when(stamp) -> str:
    return (stamp or "")[:16].replace("T", " ")


def print_json(data):
    print(json.dumps(data, indent=2, sort_keys=False))


def table(rows: list[list], headers: list[str], empty="(none)"):
    if not rows:
        print(empty)
        return
    cells = [[str(c) if c is not None else "-" for c in row] for row in rows]
    widths = [min(40, max(len(h), *(len(r[i]) for r in cells))) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join((v if len(v) <= w else v[: w - 1] + "…").ljust(w) for v, w in zip(values, widths)).rstrip()

    print(line(headers))
    for row in cells:
        print(line(row))


def one_line(text, width=70) -> str:
    text = " ".join(str(text if text is not None else "-").split())
    return text if len(text) <= width else text[: width - 1] + "…"


class ProgressBar:
    """A bar on stderr: redrawn in place on a terminal; elsewhere a line per 25% and at the end."""

    def __init__(self, total, label="", stream=None, unit="bytes"):
        self.total, self.label, self.unit = total or 0, label, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_draw, self.last_bucket, self.done = 0.0, -1, 0
        self.started = time.monotonic()
        self.finished = False

    def _text(self, done, suffix):
        fraction = min(1.0, done / self.total) if self.total else 0.0
        width = 30
        filled = int(fraction * width)
        bar = "#" * filled + "-" * (width - filled)
        if self.unit == "bytes":
            elapsed = max(1e-6, time.monotonic() - self.started)
            amount = f"{format_bytes(done)}/{format_bytes(self.total)} {format_bytes(done / elapsed)}/s"
        else:
            amount = f"{done}/{self.total or '?'} {self.unit}"
        text = f"{self.label} [{bar}] {fraction * 100:5.1f}% {amount}"
        return f"{text} {suffix}".rstrip()

    def update(self, done, suffix="", force=False):
        self.done = done
        now = time.monotonic()
        if self.tty:
            if force or now - self.last_draw >= 0.1:
                columns = shutil.get_terminal_size((100, 20)).columns
                self.stream.write("\r" + self._text(done, suffix)[: columns - 1].ljust(columns - 1))
                self.stream.flush()
                self.last_draw = now
            return
        bucket = int(4 * done / self.total) if self.total else 0
        if bucket > self.last_bucket and done < (self.total or 1):
            self.last_bucket = bucket
            print(self._text(done, suffix), file=self.stream, flush=True)

    def finish(self, suffix=""):
        if self.finished:
            return
        self.finished = True
        if self.tty:
            self.update(self.done, suffix, force=True)
            self.stream.write("\n")
            self.stream.flush()
        else:
            print(self._text(self.done, suffix), file=self.stream, flush=True)


def status_line(text, stream=None):
    """A line redrawn in place on a terminal, or printed when it changes elsewhere."""
    stream = stream or sys.stderr
    if stream.isatty():
        columns = shutil.get_terminal_size((100, 20)).columns
        stream.write("\r" + text[: columns - 1].ljust(columns - 1))
        stream.flush()
    else:
        print(text, file=stream, flush=True)

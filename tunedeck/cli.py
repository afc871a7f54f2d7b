"""`tunedeck`: the command-line client for a Tunedeck server's REST API (/api/v1) and its OpenAI-compatible
inference endpoints (/v1). Standard library and requests only; it never imports torch or the Django project.

Exit codes: 0 done; 1 the server refused (an API error, a failed job or deployment, an invalid dataset);
2 usage (bad arguments, not logged in, a missing local file); 3 the server cannot be reached; 4 the job was
cancelled; 130 interrupted."""
from __future__ import annotations

import argparse
import getpass
import json
import mimetypes
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

from finetune.method_traits import method_names

EXIT_API, EXIT_USAGE, EXIT_CONNECTION, EXIT_CANCELLED, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
API = "/api/v1"
ACTIVE_JOB = ("queued", "running")
METHODS = ["auto", *method_names()]
TIMEOUT = (10, 120)  # connect, read


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_API):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- configuration


def config_path() -> Path:
    if os.environ.get("TUNEDECK_CONFIG"):
        return Path(os.environ["TUNEDECK_CONFIG"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "tunedeck" / "config.json"


def load_config() -> dict:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise CliError(f"Cannot read the config file {path} ({exc}); run `tunedeck login` again.", EXIT_USAGE) from None
    return data if isinstance(data, dict) else {}


def save_config(data: dict) -> Path:
    """Writes the config readable by its owner only (it holds a token): mode 0600, folder 0700."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.chmod(path, 0o600)
    return path


def normalise_url(url: str) -> str:
    url = (url or "").strip().rstrip("/")
    if not url:
        raise CliError("Give the server's URL, e.g. --url http://127.0.0.1:8000", EXIT_USAGE)
    if not re.match(r"^https?://", url):
        url = "http://" + url
    for suffix in ("/api/v1", "/api"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


def connection_settings() -> tuple[str, str]:
    config = load_config()
    url = os.environ.get("TUNEDECK_URL") or config.get("url")
    token = os.environ.get("TUNEDECK_TOKEN") or config.get("token")
    if not url or not token:
        raise CliError("Not logged in: run `tunedeck login --url URL --username NAME` "
                       "(or set TUNEDECK_URL and TUNEDECK_TOKEN).", EXIT_USAGE)
    return normalise_url(url), token


# ---------------------------------------------------------------- HTTP


def error_message(response: requests.Response) -> str:
    """One line from the API's {"error": {"code", "message", "details"}} (or OpenAI's {"error": {"message"}})."""
    message = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message") or error.get("code")
        elif isinstance(error, str):
            message = error
        elif isinstance(body.get("detail"), str):
            message = body["detail"]
    if not message:
        text = re.sub(r"<[^>]+>", " ", response.text or "")
        text = " ".join(text.split())[:200]
        message = f"HTTP {response.status_code} {response.reason or ''}".strip() + (f": {text}" if text else "")
    if response.status_code == 401 and "login" not in message.lower():
        message += " Run `tunedeck login` to get a new token."
    return " ".join(str(message).split())


class Client:
    def __init__(self, url: str, token: str | None = None):
        self.url = url
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "tunedeck-cli"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    @classmethod
    def from_config(cls) -> "Client":
        return cls(*connection_settings())

    def request(self, method: str, path: str, *, expect_json=True, timeout=TIMEOUT, **kwargs):
        url = path if path.startswith("http") else self.url + (path if path.startswith("/v1") else API + path)
        try:
            response = self.session.request(method, url, timeout=timeout, **kwargs)
        except requests.exceptions.Timeout:
            raise CliError(f"{self.url} did not answer in time.", EXIT_CONNECTION) from None
        except requests.exceptions.ConnectionError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else type(exc).__name__
            raise CliError(f"Cannot connect to {self.url} ({reason}). Is the server running?",
                           EXIT_CONNECTION) from None
        except requests.exceptions.RequestException as exc:
            raise CliError(f"Request to {url} failed: {exc}", EXIT_CONNECTION) from None
        if response.status_code >= 400:
            raise CliError(error_message(response), EXIT_API)
        if not expect_json or kwargs.get("stream"):
            return response
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise CliError(f"{url} answered with something that is not JSON (HTTP {response.status_code}); "
                           "is the URL a Tunedeck server?") from None

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.request("POST", path, **kwargs)

    def delete(self, path, **kwargs):
        return self.request("DELETE", path, **kwargs)

    def list(self, path, params=None, limit=1000) -> tuple[list, int]:
        """Every page of a paginated list, up to limit items; returns (items, total)."""
        params = {**(params or {}), "page_size": 200}
        items, total, page = [], 0, 1
        while True:
            body = self.get(path, params={**params, "page": page})
            if not isinstance(body, dict) or "results" not in body:
                return (body or []), len(body or [])
            items += body["results"]
            total = body.get("count", len(items))
            if not body.get("next") or len(items) >= limit:
                return items[:limit], total
            page += 1


# ---------------------------------------------------------------- output helpers


def human_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


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
            amount = f"{human_bytes(done)}/{human_bytes(self.total)} {human_bytes(done / elapsed)}/s"
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


# ---------------------------------------------------------------- streamed multipart upload


class MultipartStream:
    """A multipart/form-data body read in blocks straight from the files, so a large file is never held in
    memory; reports the bytes read (= sent) to on_progress. It has a length, so requests sends Content-Length
    rather than chunked encoding (which many WSGI servers refuse)."""

    BLOCK = 256 * 1024

    def __init__(self, fields: dict, files: dict, on_progress=None):
        self.boundary = f"tunedeck-{uuid.uuid4().hex}"
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self.on_progress = on_progress
        self.parts: list = []
        for name, value in fields.items():
            if value is None:
                continue
            self.parts.append(self._header(name) + b"\r\n" + str(value).encode() + b"\r\n")
        for name, path in files.items():
            path = Path(path)
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            self.parts.append(self._header(name, path.name, kind) + b"\r\n")
            self.parts.append(path)
            self.parts.append(b"\r\n")
        self.parts.append(f"--{self.boundary}--\r\n".encode())
        self.length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in self.parts)
        self.sent = 0
        self._index, self._file, self._buffer = 0, None, b""

    def _header(self, name, filename=None, kind=None) -> bytes:
        quote = lambda s: s.replace("\\", "\\\\").replace('"', "%22").replace("\r", "").replace("\n", "")
        disposition = f'Content-Disposition: form-data; name="{quote(name)}"'
        if filename is not None:
            disposition += f'; filename="{quote(filename)}"'
        header = f"--{self.boundary}\r\n{disposition}\r\n"
        if kind:
            header += f"Content-Type: {kind}\r\n"
        return header.encode()

    def __len__(self):
        return self.length

    def _next_block(self, size) -> bytes:
        while self._index < len(self.parts):
            part = self.parts[self._index]
            if isinstance(part, bytes):
                self._index += 1
                return part
            if self._file is None:
                self._file = open(part, "rb")  # noqa: SIM115 - closed below when exhausted
            block = self._file.read(size)
            if block:
                return block
            self._file.close()
            self._file = None
            self._index += 1
        return b""

    def read(self, size=-1) -> bytes:
        size = self.BLOCK if size is None or size < 0 else max(1, size)
        while len(self._buffer) < size:
            block = self._next_block(max(size, self.BLOCK))
            if not block:
                break
            self._buffer += block
        chunk, self._buffer = self._buffer[:size], self._buffer[size:]
        self.sent += len(chunk)
        if self.on_progress and chunk:
            self.on_progress(self.sent, self.length)
        return chunk

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


# ---------------------------------------------------------------- commands: auth and base models


def cmd_login(args):
    try:
        config = load_config()
    except CliError:
        config = {}  # a broken config file is what logging in again repairs
    url = normalise_url(args.url or os.environ.get("TUNEDECK_URL") or config.get("url") or "")
    username = args.username or os.environ.get("TUNEDECK_USERNAME") or config.get("username")
    if not username:
        if not sys.stdin.isatty():
            raise CliError("Give --username.", EXIT_USAGE)
        username = input("Username: ").strip()
    password = args.password or os.environ.get("TUNEDECK_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            raise CliError("Give --password or set TUNEDECK_PASSWORD (no terminal to prompt on).", EXIT_USAGE)
        password = getpass.getpass(f"Password for {username} at {url}: ")
    body = Client(url).post("/auth/token", json={"username": username, "password": password,
                                                 "name": f"tunedeck-cli@{socket.gethostname()}"[:100]})
    if not isinstance(body, dict) or not body.get("token"):
        raise CliError(f"{url} did not return a token; is it a Tunedeck server?")
    path = save_config({**config, "url": url, "token": body["token"], "username": username})
    until = f"; it expires on {body['expires_at'][:10]}" if body.get("expires_at") else ""
    print(f"Logged in to {url} as {username}; token saved in {path}{until}.")


def cmd_logout(args):
    config = load_config()
    token, url = config.get("token"), config.get("url")
    if token and url:
        client = Client(normalise_url(url), token)
        try:
            tokens, _ = client.list("/tokens")
            for item in tokens:
                if item.get("active") and item.get("prefix") and token.startswith(item["prefix"]):
                    client.delete(f"/tokens/{item['id']}")
                    break
        except CliError as exc:
            print(f"tunedeck: warning: could not revoke the token on the server: {exc}", file=sys.stderr)
    config.pop("token", None)
    save_config(config)
    print("Logged out.")


def cmd_base_models(args):
    client = Client.from_config()
    items, _ = client.list("/base-models")
    if args.json:
        return print_json(items)
    table([[m["id"], m["name"] + (" (default)" if m.get("is_default") else ""), m.get("architecture"),
            f"{m.get('parameters', 0) / 1e6:.1f}M", "shared" if m.get("shared") else "yours"] for m in items],
          ["ID", "NAME", "ARCHITECTURE", "PARAMS", "OWNER"], empty="No base models registered.")


def cmd_register_model(args):
    client = Client.from_config()
    model = client.post("/base-models", json={"name": args.name, "path": args.path, "shared": not args.private})
    if args.json:
        return print_json(model)
    print(f"Registered base model {model['id']}: {model['name']} ({model.get('architecture')}, "
          f"{model.get('parameters', 0) / 1e6:.1f}M parameters, {'shared' if model.get('shared') else 'yours only'}).")


# ---------------------------------------------------------------- datasets


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
            raise CliError(f"Dataset {dataset_id} is still validating after {human_seconds(timeout)}.")
        time.sleep(interval)


def cmd_datasets(args):
    client = Client.from_config()
    items, _total = client.list("/datasets")
    if args.json:
        return print_json(items)
    table([[d["id"], d["name"], d["status"], d.get("schema") or "-", d.get("rows"), human_bytes(d.get("size_bytes")),
            when(d.get("created_at"))] for d in items],
          ["ID", "NAME", "STATUS", "SCHEMA", "ROWS", "SIZE", "CREATED"], empty="No datasets yet: tunedeck upload FILE")


def print_dataset(d):
    print(f"Dataset {d['id']}: {d['name']}")
    print(f"  status      {d['status']}" + (f" ({d['progress'] * 100:.0f}%)" if d["status"] == "validating" else ""))
    print(f"  file        {d.get('original_filename') or '-'} ({human_bytes(d.get('size_bytes'))})")
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


# ---------------------------------------------------------------- plans and jobs


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
    for key in ("max_steps", "dropout", "num_virtual_tokens", "adapter_bottleneck", "dpo_beta", "kto_beta"):
        if plan.get(key) is not None:
            rows.append((key.replace("_", " "), number(plan[key])))
    for name, value in rows:
        print(f"  {name:<19} {value}")
    memory = plan.get("memory") or {}
    total, capacity = memory.get("total_bytes") or 0, memory.get("capacity_bytes") or 0
    fits = plan.get("fits", total <= capacity if capacity else True)
    print(f"Memory: {human_bytes(total)} of {human_bytes(capacity)} usable"
          f" ({'fits' if fits else 'does NOT fit'})")
    breakdown = {k: v for k, v in (memory.get("breakdown") or {}).items() if isinstance(v, (int, float)) and v > 0}
    scale = max([capacity, total, *breakdown.values()]) or 1
    for name, value in sorted(breakdown.items(), key=lambda kv: -kv[1]):
        bar = "#" * max(1, round(30 * value / scale))
        print(f"  {name.replace('_', ' '):<22} {bar:<30} {human_bytes(value):>10}")
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
        parts.append(f"eta {human_seconds(metrics['eta_seconds'])}")
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


# ---------------------------------------------------------------- adapter versions


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
    print(f"Saved adapter version {args.version} to {out} ({human_bytes(written)}).")


# ---------------------------------------------------------------- deployments and chat


def cmd_deploy(args):
    client = Client.from_config()
    body = {"merge": not args.no_merge}
    if args.name:
        body["name"] = args.name
    answer = client.post(f"/adapter-versions/{args.version}/deploy", json=body)
    deployment = answer.get("deployment", answer) if isinstance(answer, dict) else {}
    if not deployment.get("id"):
        raise CliError("The server's deploy answer has no deployment in it.")
    if not args.json:
        print(f"Deployment {deployment.get('name')} (id {deployment['id']}): {deployment.get('status')}.")
    if args.wait:
        deployment = wait_for_deployment(client, deployment, timeout=args.timeout)
    if args.json:
        print_json(deployment)
    if deployment.get("status") in ("failed", "stopped"):
        raise CliError(f"Deployment {deployment.get('name')} {deployment['status']}: "
                       f"{one_line(deployment.get('error') or 'no error recorded', 300)}")
    if not args.json and deployment.get("status") == "live":
        print(f"Live at {deployment.get('endpoint') or client.url + '/v1'} as model {deployment.get('name')!r}. "
              f"Chat: tunedeck chat {deployment.get('name')}")


def wait_for_deployment(client, deployment, timeout=1800, interval=1.0):
    deadline = time.monotonic() + timeout
    last = None
    started = time.monotonic()
    while deployment.get("status") not in ("live", "failed", "stopped"):
        if deployment.get("status") != last or sys.stderr.isatty():
            last = deployment.get("status")
            status_line(f"Deployment {deployment.get('name')}: {last} ({human_seconds(time.monotonic() - started)})")
        if time.monotonic() > deadline:
            raise CliError(f"Deployment {deployment.get('name')} is still {last} after {human_seconds(timeout)}.")
        time.sleep(interval)
        deployment = client.get(f"/deployments/{deployment['id']}")
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    return deployment


def sse_events(response):
    """The `data:` payloads of a server-sent-event stream, as they arrive."""
    raw = response.raw
    buffer = b""
    while True:
        chunk = raw.read1(8192) if hasattr(raw, "read1") else raw.read(1)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                yield line[5:].strip().decode("utf-8", "replace")
    if buffer.strip().startswith(b"data:"):
        yield buffer.strip()[5:].strip().decode("utf-8", "replace")


def complete_chat(client, model, messages, args, out=None) -> str:
    out = out or sys.stdout
    body = {"model": model, "messages": messages, "stream": not args.no_stream}
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    response = client.post("/v1/chat/completions", json=body, stream=True, timeout=(10, 600))
    text = ""
    try:
        if "text/event-stream" not in response.headers.get("Content-Type", ""):
            try:
                data = response.json()
                text = data["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise CliError("The chat answer is not an OpenAI-style chat completion.") from None
            out.write(text)
        else:
            for payload in sse_events(response):
                if payload == "[DONE]":
                    break
                try:
                    event = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(event.get("error"), dict):
                    raise CliError(one_line(event["error"].get("message") or event["error"], 300))
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        text += piece
                        out.write(piece)
                        out.flush()
    except requests.exceptions.RequestException as exc:
        raise CliError(f"The answer stream broke off: {exc}", EXIT_CONNECTION) from None
    finally:
        response.close()
    out.write("\n")
    out.flush()
    return text


def cmd_chat(args):
    client = Client.from_config()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.message is not None:
        messages.append({"role": "user", "content": args.message})
        complete_chat(client, args.deployment, messages, args)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {args.deployment}. /reset clears the conversation, /exit or Ctrl-D quits.",
              file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            print("(conversation cleared)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        if interactive:
            sys.stdout.write(f"{args.deployment}> ")
        reply = complete_chat(client, args.deployment, messages, args)
        messages.append({"role": "assistant", "content": reply})


# ---------------------------------------------------------------- argument parsing


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an id (a whole number), got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive id, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunedeck",
        description="Command-line client for a Tunedeck server. Log in once; the URL and token are kept in "
        "~/.config/tunedeck/config.json (or $TUNEDECK_CONFIG); TUNEDECK_URL and TUNEDECK_TOKEN override them.",
        epilog="Exit codes: 0 ok, 1 API error or failed job, 2 usage, 3 server unreachable, 4 job cancelled.",
    )
    parser.add_argument("--version", action="version", version="tunedeck 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add_commands in (_account_commands, _dataset_commands, _job_commands, _version_commands,
                         _deployment_commands):
        add_commands(sub)
    return parser


def _command(sub, name, func, help_text, json_flag=False) -> argparse.ArgumentParser:
    """One subcommand; --json prints the API's answer as it is instead of a summary."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=func)
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the API's JSON instead of a summary")
    return p


def _account_commands(sub):
    p = _command(sub, "login", cmd_login, "get an API token for a user and store it")
    p.add_argument("--url", help="the server, e.g. http://127.0.0.1:8000 (default: $TUNEDECK_URL or the stored one)")
    p.add_argument("--username", "-u")
    p.add_argument("--password", help="default: $TUNEDECK_PASSWORD, else asked for")
    _command(sub, "logout", cmd_logout, "revoke the stored token and forget it")
    _command(sub, "base-models", cmd_base_models, "list the base models you can fine-tune", json_flag=True)
    p = _command(sub, "register-model", cmd_register_model, "register a model folder on the server as a base "
                 "model (administrators; the folder must be inside the server's TUNEDECK_MODEL_ROOTS)", json_flag=True)
    p.add_argument("name")
    p.add_argument("path", help="absolute path of the Hugging Face model folder on the server")
    p.add_argument("--private", action="store_true", help="only you may use it (default: every user)")


def _dataset_commands(sub):
    p = _command(sub, "upload", cmd_upload, "upload a dataset file (JSONL, JSON, CSV, Parquet)", json_flag=True)
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

    _command(sub, "datasets", cmd_datasets, "list your datasets", json_flag=True)
    p = _command(sub, "dataset", cmd_dataset, "show a dataset: status, schema, rows, token statistics, problems",
                 json_flag=True)
    p.add_argument("id", type=positive_int)
    p.add_argument("--delete", action="store_true", help="delete it (refused while a job uses it)")


def _job_commands(sub):
    # plan and train take the same choices; train also names the adapter and can follow the job.
    for name, func, text in (("plan", cmd_plan, "show the training plan, its memory breakdown and the reasons"),
                             ("train", cmd_train, "start a fine-tuning job")):
        p = _command(sub, name, func, text, json_flag=True)
        p.add_argument("--dataset", "-d", type=positive_int, required=True)
        p.add_argument("--base-model", type=positive_int, help="default: the server's default model")
        p.add_argument("--method", "-m", default="auto", choices=METHODS)
        p.add_argument("--set", "-s", action="append", type=parse_setting, metavar="KEY=VALUE",
                       help="fix a plan field, e.g. --set rank=16 --set max_steps=100 (repeatable)")
        if name == "train":
            p.add_argument("--name", help="adapter name (versions of one name are v1, v2, …)")
            p.add_argument("--watch", "-w", action="store_true", help="follow the job until it ends")
            p.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)

    p = _command(sub, "watch", cmd_watch, "follow a job: progress bar and live loss; exit 0 if it succeeds",
                 json_flag=True)
    p.add_argument("job", type=positive_int)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    p = _command(sub, "jobs", cmd_jobs, "list your jobs", json_flag=True)
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p = _command(sub, "cancel", cmd_cancel, "cancel a job", json_flag=True)
    p.add_argument("job", type=positive_int)


def _version_commands(sub):
    _command(sub, "versions", cmd_versions, "list adapter versions", json_flag=True)
    p = _command(sub, "compare", cmd_compare, "compare 2 to 4 adapter versions side by side", json_flag=True)
    p.add_argument("ids", type=positive_int, nargs="+", metavar="ID")
    p.add_argument("--generations", type=int, default=5, help="how many prompts' generations to show")
    p = _command(sub, "download", cmd_download, "download an adapter version as a zip")
    p.add_argument("version", type=positive_int)
    p.add_argument("-o", "--output", help="file (or folder) to write; default: the server's file name")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _deployment_commands(sub):
    p = _command(sub, "deploy", cmd_deploy, "deploy an adapter version for inference", json_flag=True)
    p.add_argument("version", type=positive_int)
    p.add_argument("--no-merge", action="store_true", help="serve the adapter on the base model instead of merging")
    p.add_argument("--name", help="deployment name (the `model` in API calls); default chosen by the server")
    p.add_argument("--wait", action="store_true", help="wait until it is live; exit 1 if it fails")
    p.add_argument("--timeout", type=float, default=1800, help=argparse.SUPPRESS)

    p = _command(sub, "chat", cmd_chat, "chat with a deployment (interactive without -m)")
    p.add_argument("deployment", metavar="DEPLOYMENT_NAME")
    p.add_argument("-m", "--message", help="send one message, print the answer and exit")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--no-stream", action="store_true", help="wait for the whole answer instead of streaming it")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "compare" and not 2 <= len(args.ids) <= 4:
        parser.error("compare takes 2 to 4 version ids")
    try:
        code = args.func(args)
    except CliError as exc:
        print(f"tunedeck: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    return code or 0


if __name__ == "__main__":
    sys.exit(main())

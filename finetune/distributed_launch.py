"""Starts a training run on several ranks through torchrun and reports it the way finetune.train.train does.

    result = train_on_ranks(spec, nproc_per_node=2, on_progress=..., on_event=..., should_stop=...)

torchrun (`python -m torch.distributed.run`) starts the ranks (finetune/distributed_rank.py) and their rendezvous:
on one machine `--standalone`; across machines `--nnodes N --rdzv-backend c10d --rdzv-endpoint host:port
--rdzv-id <job>`, the same command on every machine (docs/distributed.md). This module is the caller's side:
it relays rank 0's progress and events as they are written, turns a cancel into the ranks' cancel file, turns a
failed rank into an error naming it, and kills whatever is left of the run when it returns, however it returns.
Standard library only: the web process may import it (it never does), torch loads in the ranks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .errors import OutOfMemory, TrainingError
from .processes import signal_group
from .trainspec import TrainResult, TrainSpec, spec_dict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.2
CANCEL_GRACE_SECONDS = 120  # after a cancel, the ranks finish their micro-batch and save; then they are killed
TERM_GRACE_SECONDS = 10  # torchrun stops its ranks on SIGTERM; what is still alive after this is killed


def train_on_ranks(
    spec: TrainSpec,
    nproc_per_node: int,
    on_progress: Callable[[dict], None] | None = None,
    on_event: Callable[[str, str, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "tunedeck",
    run_dir: str | Path | None = None,
    threads_per_rank: int | None = None,
    node_rank: int | None = None,
) -> TrainResult:
    """Trains spec on nproc_per_node ranks here (x nnodes machines when rdzv_endpoint is given). With node_rank,
    this machine's ranks are node_rank x nproc_per_node + local rank (node 0 holds rank 0, which reports);
    without it the rendezvous numbers them."""
    spec.validate()
    if nproc_per_node < 1 or nnodes < 1:
        raise TrainingError(f"A run needs at least one rank per machine (got {nproc_per_node} x {nnodes}).")
    if nnodes > 1 and not rdzv_endpoint:
        raise TrainingError("A run on several machines needs the rendezvous address (host:port) of one of them.")
    run_dir = Path(run_dir) if run_dir else _default_run_dir(spec, nnodes)
    _fresh_run_dir(run_dir, spec, threads_per_rank, node_rank, nproc_per_node)
    command = torchrun_command(run_dir, nproc_per_node, nnodes, rdzv_endpoint, rdzv_id)
    log_path = run_dir / "torchrun.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=PROJECT_ROOT, env=_rank_env(threads_per_rank), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        cancelled = _relay_until_exit(proc, run_dir, on_progress, on_event, should_stop)
    finally:
        stop_run(proc, run_dir)
    return _outcome(proc.returncode, run_dir, spec, cancelled)


def torchrun_command(run_dir: Path, nproc_per_node: int, nnodes: int, rdzv_endpoint: str | None,
                     rdzv_id: str) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
               "--max-restarts=0", "--monitor-interval=0.5"]
    if rdzv_endpoint:
        command += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                    f"--rdzv-id={rdzv_id}"]
    else:
        command += ["--standalone"]
    return command + ["-m", "finetune.distributed_rank", str(run_dir)]


def _default_run_dir(spec: TrainSpec, nnodes: int) -> Path:
    """Next to the checkpoints on one machine; several machines may share the checkpoint folder, so each keeps
    its own run folder in local temporary storage."""
    if spec.checkpoint_dir and nnodes == 1:
        return Path(spec.checkpoint_dir).parent / "ranks"
    return Path(tempfile.mkdtemp(prefix="tunedeck-ranks-"))


def _fresh_run_dir(run_dir: Path, spec: TrainSpec, threads_per_rank: int | None, node_rank: int | None,
                   nproc_per_node: int) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a previous attempt's events, result and cancel file must not be read again
    run_dir.mkdir(parents=True)
    request = {"spec": spec_dict(spec), "threads_per_rank": threads_per_rank, "node_rank": node_rank,
               "nproc_per_node": nproc_per_node,
               "launcher_pid": os.getpid()}  # the ranks end themselves if this process dies (distributed_rank)
    (run_dir / "request.json").write_text(json.dumps(request, default=str))


def _rank_env(threads_per_rank: int | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    if threads_per_rank:
        env["OMP_NUM_THREADS"] = str(threads_per_rank)
    return env


# ------------------------------------------------------------------------------------------ while it runs


def _relay_until_exit(proc, run_dir: Path, on_progress, on_event, should_stop) -> bool:
    """Relays rank 0's lines until torchrun exits. True when a cancel was asked for."""
    events = EventReader(run_dir / "events.jsonl", on_progress, on_event)
    cancel_asked = None
    while proc.poll() is None:
        events.relay()
        if cancel_asked is None and should_stop and should_stop():
            (run_dir / "cancel").touch()
            cancel_asked = time.monotonic()
        if cancel_asked is not None and time.monotonic() - cancel_asked > CANCEL_GRACE_SECONDS:
            break  # the ranks did not stop in time: stop_run kills them
        if cancel_asked is not None and not rank_pids(run_dir):
            break  # still waiting at the rendezvous: no rank to stop, torchrun is stopped by stop_run
        time.sleep(POLL_SECONDS)
    events.relay()
    return cancel_asked is not None


class EventReader:
    """Reads rank 0's events.jsonl as it grows (whole lines only) and calls the caller's callbacks in order."""

    def __init__(self, path: Path, on_progress, on_event):
        self.path, self.offset = path, 0
        self.on_progress, self.on_event = on_progress, on_event

    def relay(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            record = json.loads(line)
            if "progress" in record and self.on_progress:
                self.on_progress(record["progress"])
            elif "event" in record and self.on_event:
                self.on_event(*record["event"])


def stop_run(proc, run_dir: Path) -> None:
    """Leaves no process behind: torchrun's group gets SIGTERM (it stops its ranks), then every rank still alive
    (each runs in a session of its own) and torchrun get SIGKILL."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM, or_process=True)
        try:
            proc.wait(timeout=TERM_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL, or_process=True)
            proc.wait()
    for pid in rank_pids(run_dir).values():
        if _is_our_rank(pid, run_dir):
            signal_group(pid, signal.SIGKILL, or_process=True)


def rank_pids(run_dir: Path) -> dict[int, int]:
    """{rank: pid} of the ranks started on this machine."""
    pids = {}
    for path in Path(run_dir).glob("rank-*.pid"):
        try:
            pids[int(path.stem.split("-")[1])] = int(path.read_text())
        except (OSError, ValueError):
            continue
    return pids


def _is_our_rank(pid: int, run_dir: Path) -> bool:
    """The pid is still one of this run's ranks (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"finetune.distributed_rank" in cmdline and str(run_dir).encode() in cmdline


# ------------------------------------------------------------------------------------------ how it ended


def _outcome(returncode, run_dir: Path, spec: TrainSpec, cancelled: bool) -> TrainResult:
    result_file = run_dir / "result.json"
    if returncode == 0 and result_file.exists():
        result = json.loads(result_file.read_text())
        return TrainResult(**result)
    if returncode == 0:
        # Rank 0 ran on another machine: it reports the run; this machine's ranks finished their part.
        return TrainResult("succeeded", None, {"rank0_elsewhere": True}, [], spec.as_plan())
    if cancelled and not _errors(run_dir):  # stopped by the cancel, or killed after its grace
        return TrainResult("cancelled", None, {}, [], spec.as_plan())
    raise failure_error(run_dir)


def _errors(run_dir: Path) -> list[dict]:
    found = []
    for path in sorted(run_dir.glob("error-rank-*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda e: e["rank"])


SIGTERM_EXIT = -signal.SIGTERM  # what torchrun's own stop of the surviving ranks looks like
# A rank whose fellow died fails inside a collective with one of these: it is not the cause.
_COLLECTIVE_VICTIM = re.compile(r"Connection closed by peer|Connection reset|DistBackendError|NCCL communicator "
                                r"was aborted|Socket Timeout|Broken pipe", re.IGNORECASE)


def failure_error(run_dir: Path) -> TrainingError:
    """The error the job fails with, naming the rank that caused the failure: a rank's own error in the user's
    terms first, then a rank killed by a signal (kill -9, the out-of-memory killer), then a rank's crash."""
    errors = _errors(run_dir)
    for error in errors:
        if error["user_error"]:
            kind = OutOfMemory if error["type"] == "OutOfMemory" else TrainingError
            named = error["message"].startswith(f"Rank {error['rank']} ")
            return kind(error["message"] if named else f"Rank {error['rank']}: {error['message']}")
    log_text = (run_dir / "torchrun.log").read_text(errors="replace") if (run_dir / "torchrun.log").exists() else ""
    failures = _renumbered(torchrun_failures(log_text), log_text, run_dir)
    for rank, exitcode in failures:
        if exitcode < 0 and exitcode != SIGTERM_EXIT:
            return TrainingError(f"Rank {rank} was killed by {_signal_name(-exitcode)} (out of host memory, or "
                                 "stopped from outside); the other ranks were stopped. Retry resumes from the last "
                                 "checkpoint.")
    causes = [e for e in errors if not _COLLECTIVE_VICTIM.search(e["message"] + e["type"])] or errors
    if causes:
        first = causes[0]
        return TrainingError(f"Rank {first['rank']} failed: {first['type']}: {first['message']}")
    if failures:
        rank, exitcode = failures[0]
        return TrainingError(f"Rank {rank} exited with code {exitcode}; the other ranks were stopped.")
    return TrainingError("The ranks' launcher (torchrun) failed before any rank started; see "
                         f"{run_dir / 'torchrun.log'}.")


_FAILURE = re.compile(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)")


def torchrun_failures(log_text: str) -> list[tuple[int, int]]:
    """(rank, exit code) of every failed rank in torchrun's closing report, root cause first."""
    report = log_text[log_text.rfind("Root Cause"):] if "Root Cause" in log_text else log_text
    others = log_text[log_text.rfind("Failures:"):log_text.rfind("Root Cause")] if "Failures:" in log_text else ""
    return [(int(r), int(c)) for r, c in _FAILURE.findall(report) + _FAILURE.findall(others)]


_LOCAL_RANK = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)")


def _renumbered(failures: list[tuple[int, int]], log_text: str, run_dir: Path) -> list[tuple[int, int]]:
    """torchrun's report numbers ranks in the rendezvous' order; a run placed node by node (node_rank, as
    finetune/distributed_rank.py numbers its ranks) names them by the ranks' own numbers."""
    try:
        request = json.loads((run_dir / "request.json").read_text())
    except (OSError, ValueError):
        return failures
    if request.get("node_rank") is None or not request.get("nproc_per_node"):
        return failures
    local = {int(r): int(lr) for r, lr in _LOCAL_RANK.findall(log_text)}
    first = int(request["node_rank"]) * int(request["nproc_per_node"])
    return [(first + local[rank] if rank in local else rank, code) for rank, code in failures]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ------------------------------------------------------------------------------------------ command line


def main(argv=None) -> int:
    """One machine's part of a run, e.g. on each of two hosts (docs/distributed.md):

    python -m finetune.distributed_launch --plan plan.json --base-model /models/llama --train-file train.jsonl \
        --output-dir out --nproc-per-node 8 --nnodes 2 --rdzv-endpoint host0:29400 --rdzv-id run-7
    """
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="a plan as JSON (POST /api/v1/plans answers one)")
    p.add_argument("--base-model", required=True)
    p.add_argument("--train-file", required=True)
    p.add_argument("--eval-file")
    p.add_argument("--output-dir", required=True, help="the adapter folder (written on rank 0's machine)")
    p.add_argument("--checkpoint-dir", help="shared by every machine for resume (a network folder)")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--rdzv-endpoint", help="host:port of the c10d rendezvous, the same on every machine")
    p.add_argument("--rdzv-id", default="tunedeck", help="the run's name, the same on every machine")
    args = p.parse_args(argv)
    plan = json.loads(Path(args.plan).read_text())
    spec = TrainSpec.from_plan(plan, base_model_path=args.base_model, train_file=args.train_file,
                               eval_file=args.eval_file, output_dir=args.output_dir,
                               checkpoint_dir=args.checkpoint_dir)

    def show(kind, message, data):
        print(f"[{kind}] {message}", flush=True)

    def progress(info):
        if "train_loss" in info:
            print(f"step {info['step']}/{info['total_steps']} loss {info['train_loss']:.4f}", flush=True)

    result = train_on_ranks(spec, args.nproc_per_node, progress, show, nnodes=args.nnodes,
                            rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id)
    print(json.dumps({"status": result.status, "adapter_dir": result.adapter_dir, "metrics": result.metrics},
                     default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

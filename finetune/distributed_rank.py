"""What each rank runs under torchrun: `python -m finetune.distributed_rank <run folder>`.

finetune/distributed_launch.py writes the run folder (request.json: the TrainSpec) and starts torchrun, which
sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous in the environment. Each rank joins the process group, runs
finetune.train.train, and talks back through files in the run folder, because torchrun owns the ranks' pipes:

    rank-N.pid          written at start: the launcher kills what is left of a run by these (no orphans)
    events.jsonl        rank 0 only: one line per progress report or event, in order, flushed at once
    result.json         rank 0 only: the TrainResult, written last
    error-rank-N.json   a rank that raised: its error, in the user's terms when it is one (TunedeckError)
    cancel              written by the launcher: every rank stops at the same micro-batch (Ranks.any)
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from .processes import process_alive

LAUNCHER_CHECK_SECONDS = 1.0
LAUNCHER_GONE_EXIT = 143  # as if SIGTERM had reached the rank


def main(run_dir: Path) -> int:
    rank = _numbered_by_node(run_dir)
    (run_dir / f"rank-{rank}.pid").write_text(str(os.getpid()))
    _end_with_the_launcher(json.loads((run_dir / "request.json").read_text()).get("launcher_pid"))
    try:
        result = _train_this_rank(run_dir, rank)
    except BaseException as exc:  # any failure is written down for the launcher, then re-raised
        _write_error(run_dir, rank, exc)
        raise
    if rank == 0:
        _write_atomically(run_dir / "result.json", json.dumps(asdict(result), default=str))
    return 0


def _end_with_the_launcher(pid) -> None:
    """A launcher that is killed outright (SIGKILL, the OOM killer, a timeout's SIGTERM) cannot stop its ranks, and
    torchrun, its child, does not notice. Each rank watches the launcher and ends itself when it is gone, so no run
    trains on unseen (and writes checkpoints a resumed run also writes) after its job's worker died; torchrun then
    sees its ranks fail and exits."""
    if not pid:
        return

    def watch():
        while process_alive(int(pid)):
            time.sleep(LAUNCHER_CHECK_SECONDS)
        os._exit(LAUNCHER_GONE_EXIT)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


    return True


def _numbered_by_node(run_dir: Path) -> int:
    """This rank's number. The c10d rendezvous numbers machines in its own order; a job across workers wants
    node 0's ranks first (rank 0 reports there), so the launcher's node_rank renumbers them. Safe only while the
    ranks use the agent's store (torchrun's default), where the rank plays no part in who hosts it."""
    rank = int(os.environ.get("RANK", "0"))
    node_rank = json.loads((run_dir / "request.json").read_text()).get("node_rank")
    if node_rank is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return rank
    rank = int(node_rank) * int(os.environ["LOCAL_WORLD_SIZE"]) + int(os.environ.get("LOCAL_RANK", "0"))
    os.environ["RANK"] = str(rank)  # what init_process_group reads
    return rank


def _train_this_rank(run_dir: Path, rank: int):
    import torch
    import torch.distributed as dist

    from .train import TrainSpec, train

    request = json.loads((run_dir / "request.json").read_text())
    spec = TrainSpec(**request["spec"])
    use_cuda = spec.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        spec.device = f"cuda:{local_rank}"
    if request.get("threads_per_rank"):
        torch.set_num_threads(int(request["threads_per_rank"]))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        events = EventWriter(run_dir / "events.jsonl") if rank == 0 else None
        cancel_file = run_dir / "cancel"
        return train(
            spec,
            on_progress=events.progress if events else None,
            on_event=events.event if events else None,
            should_stop=cancel_file.exists,
        )
    finally:
        dist.destroy_process_group()


class EventWriter:
    """Rank 0's reports, one JSON line each, flushed so the launcher relays them as they happen."""

    def __init__(self, path: Path):
        self.file = path.open("a", encoding="utf-8")

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record, default=str) + "\n")
        self.file.flush()

    def progress(self, info: dict) -> None:
        self._write({"progress": info})

    def event(self, kind: str, message: str, data: dict | None = None) -> None:
        self._write({"event": [kind, message, data or {}]})


def _write_error(run_dir: Path, rank: int, exc: BaseException) -> None:
    from .errors import TunedeckError

    record = {"rank": rank, "type": type(exc).__name__, "message": str(exc),
              "user_error": isinstance(exc, TunedeckError)}
    try:
        _write_atomically(run_dir / f"error-rank-{rank}.json", json.dumps(record))
    except OSError:
        pass  # the launcher still has torchrun's own account of the failure


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".partial")
    staging.write_text(text)
    os.replace(staging, path)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))

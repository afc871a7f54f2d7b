"""Training on several ranks through torchrun, on the CPU with gloo: the same loop as one process (issue 36).

Each run is the tiny model for a few steps; the ranks are real processes started by torchrun.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import free_port
from tinymodel import learnable_chat_rows, write_jsonl

from finetune.distributed_launch import PROJECT_ROOT, rank_pids, torchrun_failures, train_on_ranks
from finetune.errors import TrainingError
from finetune.processes import process_alive
from finetune.train import TrainSpec, train

# The 2-rank loss curve equals the 1-process one at the same global batch up to float summation order (the
# gradients are summed across ranks in another order); measured differences are ~1e-6, this leaves room.
LOSS_TOLERANCE = 1e-3


@pytest.fixture
def chat_files(tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", learnable_chat_rows(32))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", learnable_chat_rows(4))
    return train_file, eval_file


def _spec(tiny_model_dir, files, folder, **plan):
    base = {"method": "lora", "rank": 4, "alpha": 8, "dropout": 0.0, "micro_batch": 4, "grad_accum": 1,
            "max_seq_len": 32, "learning_rate": 1e-2, "max_steps": 6, "warmup_ratio": 0.0, "max_new_tokens": 2,
            "max_eval_generations": 1, "eval_every_steps": 3, "early_stopping_patience": 0, "device": "cpu"}
    base.update(plan)
    return TrainSpec.from_plan(
        base, base_model_path=str(tiny_model_dir), train_file=str(files[0]), eval_file=str(files[1]),
        output_dir=str(folder / "adapter"), checkpoint_dir=str(folder / "checkpoints"),
    )


def test_two_ranks_match_one_process_at_the_same_global_batch(tiny_model_dir, chat_files, tmp_path):
    one, two = [], []
    single = train(_spec(tiny_model_dir, chat_files, tmp_path / "one", grad_accum=2), on_progress=one.append)
    events = []
    result = train_on_ranks(_spec(tiny_model_dir, chat_files, tmp_path / "two", grad_accum=1), 2,
                            on_progress=two.append, on_event=lambda k, m, d: events.append(k), threads_per_rank=1)
    assert single.status == result.status == "succeeded"
    losses_one = [p["train_loss"] for p in one if "train_loss" in p]
    losses_two = [p["train_loss"] for p in two if "train_loss" in p]
    assert len(losses_two) == len(losses_one) == 6
    assert max(abs(a - b) for a, b in zip(losses_one, losses_two)) < LOSS_TOLERANCE, (losses_one, losses_two)
    assert [p["step"] for p in two] == [p["step"] for p in one]  # step 0 (before training), 1..6
    assert abs(single.metrics["eval_loss"] - result.metrics["eval_loss"]) < LOSS_TOLERANCE
    assert {"started", "evaluated"} <= set(events)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()
    assert result.adapter_dir == str(tmp_path / "two" / "adapter")
    _assert_no_rank_left(tmp_path / "two" / "ranks")


def test_cancel_stops_every_rank_and_keeps_a_checkpoint(tiny_model_dir, chat_files, tmp_path):
    stop = threading.Event()
    progress = []

    def on_progress(info):
        progress.append(info)
        if info.get("step", 0) >= 2:
            stop.set()

    spec = _spec(tiny_model_dir, chat_files, tmp_path, max_steps=2000, eval_every_steps=1000)
    result = train_on_ranks(spec, 2, on_progress=on_progress, should_stop=stop.is_set, threads_per_rank=1)
    assert result.status == "cancelled"
    assert list((tmp_path / "checkpoints").glob("step-*")), "rank 0 saves a checkpoint when cancelled"
    _assert_no_rank_left(tmp_path / "ranks")


def test_a_killed_rank_fails_the_run_naming_it_and_leaves_no_process(tiny_model_dir, chat_files, tmp_path):
    run_dir = tmp_path / "ranks"

    def kill_rank_1(info):
        if info.get("step") == 2:
            os.kill(rank_pids(run_dir)[1], signal.SIGKILL)

    spec = _spec(tiny_model_dir, chat_files, tmp_path, max_steps=2000, eval_every_steps=1000)
    with pytest.raises(TrainingError, match=r"Rank 1 was killed by SIGKILL"):
        train_on_ranks(spec, 2, on_progress=kill_rank_1, run_dir=run_dir, threads_per_rank=1)
    _assert_no_rank_left(run_dir)


LAUNCHER = """
import json, sys
from finetune.distributed_launch import train_on_ranks
from finetune.train import TrainSpec
spec = TrainSpec(**json.loads(sys.argv[1]))
train_on_ranks(spec, 2, run_dir=sys.argv[2], threads_per_rank=1)
"""


def test_ranks_end_when_their_launcher_is_killed_outright(tiny_model_dir, chat_files, tmp_path):
    """A worker killed with SIGKILL runs no clean-up: its ranks notice and end themselves, torchrun with them."""
    from finetune.trainspec import spec_dict

    run_dir = tmp_path / "ranks"
    spec = _spec(tiny_model_dir, chat_files, tmp_path, max_steps=100000, eval_every_steps=100000)
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(spec_dict(spec), default=str),
                                 str(run_dir)], cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        deadline = time.monotonic() + 180
        while '"progress"' not in _read(run_dir / "events.jsonl") and time.monotonic() < deadline:
            assert launcher.poll() is None, "the launcher ended before training"
            time.sleep(0.2)
        assert len(rank_pids(run_dir)) == 2, "both ranks started"
        torchrun = [pid for pid in _pids_with(b"torch.distributed.run") if str(run_dir).encode() in _cmdline(pid)]
        assert torchrun
    finally:
        launcher.kill()
        launcher.wait()
    _assert_no_rank_left(run_dir)
    deadline = time.monotonic() + 20
    while any(process_alive(pid) for pid in torchrun) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(process_alive(pid) for pid in torchrun), "torchrun exits once its ranks are gone"


def _read(path):
    try:
        return path.read_text()
    except OSError:
        return ""


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _pids_with(needle):
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and needle in _cmdline(int(p.name))]


def test_a_ranks_own_error_fails_the_run_in_the_users_terms_naming_the_rank(tiny_model_dir, chat_files, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    spec = _spec(tiny_model_dir, chat_files, tmp_path)
    spec.base_model_path = str(empty)
    with pytest.raises(TrainingError, match=r"^Rank 0: .*not-a-model") as failure:
        train_on_ranks(spec, 2, threads_per_rank=1)
    assert "Traceback" not in str(failure.value)
    _assert_no_rank_left(tmp_path / "ranks")


def test_resume_on_another_world_size(tiny_model_dir, chat_files, tmp_path):
    """Cancelled on 2 ranks (global batch 8) after step 4, resumed in one process with grad_accum 2: the same
    global batch, going on from the step the 2 ranks saved."""
    stop = threading.Event()
    spec = _spec(tiny_model_dir, chat_files, tmp_path, max_steps=400, eval_every_steps=400)

    def on_progress(info):
        if info.get("step", 0) >= 4:
            stop.set()

    first = train_on_ranks(spec, 2, on_progress=on_progress, should_stop=stop.is_set, threads_per_rank=1)
    assert first.status == "cancelled"
    events, progress = [], []
    resumed = train(_spec(tiny_model_dir, chat_files, tmp_path, max_steps=400, eval_every_steps=400, grad_accum=2),
                    on_progress=progress.append, on_event=lambda k, m, d: events.append((k, d)),
                    should_stop=lambda: len(progress) >= 3)
    assert resumed.status == "cancelled"
    saved_at = next(d["step"] for k, d in events if k == "resumed")
    first_step = progress[0]["step"]
    assert saved_at >= 4 and first_step == saved_at + 1


def test_two_nodes_through_a_c10d_rendezvous(tiny_model_dir, chat_files, tmp_path):
    """Two launchers on this machine, one rank each, meeting at a c10d rendezvous on localhost: the 2-"node" run."""
    endpoint = f"127.0.0.1:{free_port()}"
    results = {}

    def node(name):
        spec = _spec(tiny_model_dir, chat_files, tmp_path / name, max_steps=3)
        results[name] = train_on_ranks(spec, 1, nnodes=2, rdzv_endpoint=endpoint, rdzv_id="two-nodes",
                                       run_dir=tmp_path / name / "ranks", threads_per_rank=1)

    threads = [threading.Thread(target=node, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert {r.status for r in results.values()} == {"succeeded"}
    reporting = [r for r in results.values() if r.adapter_dir]
    assert len(reporting) == 1 and reporting[0].metrics["steps"] == 3  # rank 0 is on one "node" only
    assert sum(bool(r.metrics.get("rank0_elsewhere")) for r in results.values()) == 1


def test_torchruns_closing_report_is_read_for_the_failed_rank():
    report = """
Failures:
[1]:
  time      : 2026-12-07_06:00:01
  host      : box
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 11)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-07_06:00:00
  host      : box
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 12)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 12
"""
    assert torchrun_failures(report) == [(1, -9), (0, -15)]


def _assert_no_rank_left(run_dir, timeout=20):
    deadline = time.monotonic() + timeout
    pids = rank_pids(run_dir)
    assert pids, "the ranks wrote their pids"
    while time.monotonic() < deadline:
        alive = [pid for pid in pids.values() if process_alive(pid)]
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"ranks still running: {alive}")


"""The one-command run (scripts/run.sh) supervises its parts (issue 38): the inference server and a worker killed the
way an out-of-memory kill would (SIGKILL) come back, with a line in the log, while the web server keeps answering;
Ctrl-C still stops everything.

The run uses its own data directory, the embedded SQLite database and broker, and free ports; the default model
folder is the one scripts/test.sh converted (TUNEDECK_SMOLLM_DIR), linked in so nothing is converted again.
"""
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests
from helpers import free_port, wait_for

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMOLLM = Path(os.environ.get("TUNEDECK_SMOLLM_DIR", "/nonexistent"))


def part(run: subprocess.Popen, marker: str):
    """The live process of run.sh's tree whose command line holds `marker` (the part itself, not its supervisor)."""
    for proc in psutil.Process(run.pid).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            continue
        if marker in cmdline and "bash" not in proc.name():
            parent = proc.parent()
            if parent is not None and marker not in " ".join(parent.cmdline()):  # the pool's parent, not a child
                return proc
    return None


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).ok
    except requests.RequestException:
        return False


@pytest.fixture
def one_command_run(tmp_path):
    if not (SMOLLM / "config.json").is_file():
        pytest.skip("TUNEDECK_SMOLLM_DIR does not hold the converted SmolLM2 (scripts/test.sh sets it)")
    data_dir = tmp_path / "var"
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / "SmolLM2-135M-Instruct").symlink_to(SMOLLM)
    web_port, inference_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL",
                                                             "TUNEDECK_INFERENCE_URL", "DJANGO_SETTINGS_MODULE")}
    env.update(TUNEDECK_DATA_DIR=str(data_dir), PORT=str(web_port), INFERENCE_PORT=str(inference_port),
               RESTART_DELAY="1", TUNEDECK_VLLM_PYTHON="", PYTHONUNBUFFERED="1")
    out = open(tmp_path / "run.out", "wb")  # noqa: SIM115 - closed below, after the run ends
    run = subprocess.Popen(["scripts/run.sh"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                           start_new_session=True)
    run.urls = (f"http://127.0.0.1:{web_port}/healthz", f"http://127.0.0.1:{inference_port}/health")
    run.out_path = tmp_path / "run.out"
    try:
        yield run
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.wait(30)
        out.close()


def test_a_killed_inference_server_and_worker_come_back_while_the_web_answers(one_command_run):
    run = one_command_run
    web, inference = run.urls
    started = wait_for(lambda: b"Tunedeck is running" in run.out_path.read_bytes() or run.poll() is not None,
                       timeout=600, what="the one-command run to start")
    assert started and run.poll() is None, run.out_path.read_text(errors="replace")[-3000:]
    wait_for(lambda: answers(inference), timeout=300, what="the inference server to answer")
    server = part(run, "serve_inference")
    worker = wait_for(lambda: part(run, "gpu@"), timeout=120, what="the gpu worker")
    server.send_signal(signal.SIGKILL)
    worker.send_signal(signal.SIGKILL)
    server.wait(30)
    worker.wait(30)

    assert answers(web), "the web server went down with the inference server"
    assert run.poll() is None, "run.sh stopped because one part ended"
    wait_for(lambda: answers(inference), timeout=300, what="the inference server to come back")
    new_worker = wait_for(lambda: part(run, "gpu@"), timeout=120, what="the gpu worker to come back")
    assert new_worker.pid != worker.pid and part(run, "serve_inference").pid != server.pid
    assert answers(web)
    said = run.out_path.read_text(errors="replace")
    assert "the inference server (pid" in said and "the gpu worker (pid" in said and "restarting it in" in said

    # Ctrl-C stops everything: no part is left behind.
    tree = psutil.Process(run.pid).children(recursive=True)
    os.kill(run.pid, signal.SIGINT)
    run.wait(120)
    time.sleep(1)
    assert [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert not answers(web)

"""An inference server killed outright (an out-of-memory kill) leaves its vLLM servers running in their own process
groups; the next inference server ends them before it starts any (issue 38), and leaves other processes alone."""
import subprocess
import sys

from serving.vllm_process import (
    EngineSettings,
    VllmSupervisor,
    ledger_path,
    remember_server,
    stop_leftover_servers,
)

SLEEP = "import time; time.sleep(120)"


def started(*argv):
    return subprocess.Popen([sys.executable, "-c", SLEEP, *argv], start_new_session=True)


def test_a_new_supervisor_ends_the_servers_a_killed_one_left(tmp_path):
    settings = EngineSettings(python=sys.executable, log_dir=tmp_path)
    orphan = started("--vllm-stand-in")  # what a killed inference server's vLLM server looks like: its own group
    stranger = started("--not-a-server")  # a recycled pid now naming something else
    try:
        remember_server(settings, orphan.pid)
        remember_server(settings, stranger.pid)
        supervisor = VllmSupervisor(settings)
        supervisor.start()
        supervisor.stop()
        assert orphan.wait(timeout=20) is not None
        assert stranger.poll() is None, "a process that is not a vLLM server is never touched"
        assert ledger_path(settings).read_text() == ""
    finally:
        for process in (orphan, stranger):
            process.kill()
            process.wait()


def test_nothing_left_means_nothing_to_do(tmp_path):
    settings = EngineSettings(python=sys.executable, log_dir=tmp_path)
    assert stop_leftover_servers(settings) == []
    gone = started("--vllm-stand-in")
    gone.kill()
    gone.wait()
    remember_server(settings, gone.pid)
    assert stop_leftover_servers(settings) == []

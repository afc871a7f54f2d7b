"""The install matches requirements/lock.txt, and a lock that misses or misstates a package is refused."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"


def _check(lock_file):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "check_lock.py"), str(lock_file)],
                          capture_output=True, text=True)


def test_this_install_is_the_locked_one():
    result = _check(LOCK)
    assert result.returncode == 0, result.stderr


def test_a_stale_lock_is_refused_with_the_way_out(tmp_path):
    lines = LOCK.read_text().splitlines()
    stale = [line for line in lines if not line.lower().startswith("peft==")]
    stale = [("transformers==0.0.1" if line.lower().startswith("transformers==") else line) for line in stale]
    (tmp_path / "lock.txt").write_text("\n".join(stale) + "\n")
    result = _check(tmp_path / "lock.txt")
    assert result.returncode == 1
    assert "peft" in result.stderr and "not in the lock" in result.stderr
    assert "transformers" in result.stderr and "the lock says 0.0.1" in result.stderr
    assert "scripts/lock.sh" in result.stderr

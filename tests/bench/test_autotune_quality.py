"""bench/autotune_quality.py on a task file of your own (issue 20: tasks kept outside the repo), on the tiny model:
the loop and the rules arms train on its rows, score the held-out prompts, and a file that cannot be read as chat
rows is named with its line."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "autotune_quality.py"), *args],
                          check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_a_task_file_of_your_own_runs_the_loop_and_the_rules(tiny_model_dir, tmp_path):
    rows = tmp_path / "colours.jsonl"
    colours = ["red", "green", "blue", "amber"]
    rows.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Ticket {i}: which colour is item {i}?"},
        {"role": "assistant", "content": colours[i % 4]}]}) + "\n" for i in range(60)))
    out = tmp_path / "report.json"
    done = run_bench("--tasks", str(rows), "--arms", "loop,rules", "--rows", "40", "--test-rows", "8",
                     "--model", str(tiny_model_dir), "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = json.loads(out.read_text())
    assert result["task"] == "colours" and result["test_rows"] == 8
    assert result["train_rows"] == 40 - 8  # a tenth, at least 8 rows, held out for validation
    for arm in ("loop", "rules"):
        assert 0.0 <= result[arm]["exact_match"] <= 1.0 and result[arm]["seconds"] > 0
    assert "| colours | rules |" in done.stdout


def test_a_task_file_without_answers_is_named_with_its_line(tiny_model_dir, tmp_path):
    rows = tmp_path / "broken.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    done = run_bench("--tasks", str(rows), "--arms", "loop", "--model", str(tiny_model_dir), timeout=120)
    assert done.returncode != 0
    assert f"{rows}, line 1: needs a user turn and an assistant answer" in done.stderr

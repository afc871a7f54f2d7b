"""bench/train_quality.py --quick on the tiny model: both trainers run on the four tasks and the report has its shape."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_every_task_for_both_trainers(tiny_model_dir, tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_quality.py"), "--quick", "--model", str(tiny_model_dir),
         "--variants", "plain,product", "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {(e["task"], e["variant"]) for e in report["summary"]} == {
        (t, v) for t in ("classify", "extract", "convert", "describe") for v in ("plain", "product")}
    for entry in report["summary"]:
        assert 0.0 <= entry["exact_match"] <= 1.0 and 0.0 <= entry["token_f1"] <= 1.0
        assert entry["val_loss"] > 0 and entry["train_seconds"] > 0
        if entry["variant"] == "product":
            assert "em_vs_plain" in entry
    assert "| classify | plain |" in done.stdout
    # Each trainer ran over the same rows: one epoch of 16 rows at micro-batch 4 is 4 optimizer steps.
    assert {r["steps"] for r in report["results"] if r["variant"] == "product"} == {4}

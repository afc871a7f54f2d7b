"""bench/gpu_suite.sh --dry-run runs the GPU suite's own code on the CPU with tiny shapes, so the one-command GPU
check cannot rot between the rare hours a GPU is at hand."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["gpu_tests", "memory", "select_caps", "serving"]


def test_dry_run_writes_the_report(tmp_path):
    # Budgets stretched 4x: this test checks that every part's code runs, not how fast a shared CPU is; on an idle
    # machine the dry run takes under 2 minutes with the budgets as written.
    env = {**os.environ, "GPU_SUITE_BUDGET_SCALE": "4"}
    proc = subprocess.run([str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [report] = tmp_path.glob("gpu-*-dry-run.json")
    assert report.with_suffix(".md").is_file()
    parts = json.loads(report.read_text())["parts"]
    assert list(parts) == PARTS
    for name, part in parts.items():
        assert part["rc"] == 0, f"{name} ({part['outcome']}): {part['log_tail'][-1500:]}"
    assert "skipped" in parts["gpu_tests"]["log_tail"]  # no CUDA here: collected, then skipped
    rows = parts["memory"]["results"]["estimate"]
    assert {row["plan"]["method"] for row in rows} >= {"lora", "ia3", "dpo"}
    assert all(not row.get("failure") and row.get("tokens_per_second") for row in rows), rows
    assert parts["select_caps"]["results"]["select"][0]["runs"]
    markdown = report.with_suffix(".md").read_text()
    assert all(f"| {name} |" in markdown for name in PARTS)

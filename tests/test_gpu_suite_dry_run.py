"""bench/gpu_suite.sh --dry-run runs the GPU suite's own code on the CPU with tiny shapes, so the one-command GPU
check cannot rot between the rare hours a GPU is at hand."""
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["gpu_tests", "memory", "select_caps", "serving"]


def test_dry_run_writes_the_report(tmp_path):
    proc = subprocess.run([str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [report] = tmp_path.glob("gpu-*-dry-run.json")
    assert report.with_suffix(".md").is_file()
    parts = json.loads(report.read_text())["parts"]
    assert list(parts) == PARTS
    for name, part in parts.items():
        # a part cut off at its budget on a busy machine is reported as such; any other failure is a bug
        assert part["rc"] in (0, 124), f"{name}: {part['log_tail'][-1500:]}"
    assert "skipped" in parts["gpu_tests"]["log_tail"] or parts["gpu_tests"]["rc"] == 124
    finished = {name: part for name, part in parts.items() if part["rc"] == 0}
    if "memory" in finished:
        rows = finished["memory"]["results"]["estimate"]
        assert {row["plan"]["method"] for row in rows} >= {"lora", "ia3", "dpo"}
        assert all(not row.get("failure") for row in rows), rows
    markdown = report.with_suffix(".md").read_text()
    assert all(f"| {name} |" in markdown for name in PARTS)

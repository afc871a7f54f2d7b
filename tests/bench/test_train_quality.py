"""bench/train_quality.py --quick on the tiny model: both trainers run on the four tasks, the report has its shape, and
the plain loop and the product get identical gradient clipping, warmup and dtype (issue 32)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ("max_grad_norm", "warmup_ratio", "lr_schedule", "dtype")


def run_bench(tmp_path, *args):
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_quality.py"), "--quick", *args, "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done, json.loads(out.read_text())


def test_quick_run_reports_every_task_for_both_trainers(tiny_model_dir, tmp_path):
    done, report = run_bench(tmp_path, "--model", str(tiny_model_dir), "--variants", "plain,product")
    assert {(e["task"], e["variant"]) for e in report["summary"]} == {
        (t, v) for t in ("classify", "extract", "convert", "describe") for v in ("plain", "product")}
    for entry in report["summary"]:
        assert 0.0 <= entry["exact_match"] <= 1.0 and 0.0 <= entry["token_f1"] <= 1.0
        assert entry["val_loss"] > 0 and entry["train_seconds"] > 0
        if entry["variant"] == "product":
            assert "em_vs_plain" in entry
    assert "| classify | plain |" in done.stdout
    # Each trainer ran over the same rows: one epoch of 16 rows at micro-batch 4 is 4 optimizer steps.
    assert {r["steps"] for r in report["results"]} == {4}
    # ... with the same clipping, warmup, schedule and dtype: the product's defaults, on both sides.
    for task in ("classify", "extract", "convert", "describe"):
        plain, product = (next(r for r in report["results"] if r["task"] == task and r["variant"] == v)
                          for v in ("plain", "product"))
        assert {k: plain["settings"][k] for k in SETTINGS} == {k: product["settings"][k] for k in SETTINGS} == {
            "max_grad_norm": 1.0, "warmup_ratio": 0.03, "lr_schedule": "constant", "dtype": "fp32"}
        assert plain["weights_dtype"] == "float32"


def test_bf16_runs_both_trainers_in_bf16_and_a_plain_loop_in_fp32_beside(tiny_model_dir, tmp_path):
    _, report = run_bench(tmp_path, "--model", str(tiny_model_dir), "--tasks", "classify", "--dtype", "bf16",
                          "--max-grad-norm", "0", "--warmup-ratio", "0.25")
    results = {r["variant"]: r for r in report["results"]}
    assert set(results) == {"plain", "plain@fp32", "product"}
    expected = {"max_grad_norm": None, "warmup_ratio": 0.25, "lr_schedule": "constant"}
    for name, dtype, weights in (("plain", "bf16", "bfloat16"), ("product", "bf16", None),
                                 ("plain@fp32", "fp32", "float32")):
        assert results[name]["settings"] == {**expected, "dtype": dtype}, name
        if weights:
            assert results[name]["weights_dtype"] == weights

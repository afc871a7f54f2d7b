"""Dataset throughput: finetune.data (validate + normalise + count tokens) vs Hugging Face `datasets`.

    .venv/bin/python bench/dataset_throughput.py                      # 1M chat rows, the tiny test tokenizer
    .venv/bin/python bench/dataset_throughput.py --rows 200000
    .venv/bin/python bench/dataset_throughput.py --tokenizer PATH     # any Hugging Face tokenizer folder

Generates a multi-turn chat JSONL (seeded, mostly unique rows), then measures, each in its own subprocess so
the peak RSS of one does not hide in the other's:

  ours      finetune.data.process_dataset (sniff, validate every row, normalise, exact and near duplicate checks,
            write normalised JSONL) + token_lengths (chat template + batch tokenisation) + token_stats
  datasets  datasets.load_dataset("json") + .map(batched=True) applying the same chat template and tokenizer
            (no validation), single process, cache in a temporary folder

Ours runs at two file sizes (a quarter of --rows and --rows) to show its peak memory does not follow the file.
Prints rows/s, the ratio, and peak RSS (with the RSS right after imports, so the growth is visible).
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day did "
         "get come made may part dragon count river mountain paris france capital answer question").split()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: the tiny test tokenizer, built here)")
    parser.add_argument("--workdir", help="where to put the generated files (default: a temporary folder)")
    parser.add_argument("--measure", choices=["ours", "datasets"], help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    return parser.parse_args()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def generate_chat_jsonl(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 == 0 else []
            for _ in range(rng.choice((1, 1, 2, 3))):
                messages.append({"role": "user", "content": f"#{i} " + sentence(rng, 5, 30)})
                messages.append({"role": "assistant", "content": sentence(rng, 10, 80)})
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_ours(file: Path, tokenizer_dir: str, workdir: Path) -> dict:
    from transformers import AutoTokenizer

    from finetune.data import iter_examples, process_dataset, token_lengths, token_stats

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    report = process_dataset(file, workdir / f"normalised-{file.stem}.jsonl")
    validated = time.perf_counter()
    stats = token_stats(token_lengths(iter_examples(workdir / f"normalised-{file.stem}.jsonl"), tokenizer))
    end = time.perf_counter()
    return {"rows": report.total_rows, "status": report.status, "seconds": end - start,
            "validate_seconds": validated - start, "tokenize_seconds": end - validated,
            "tokens_p50": stats["p50"], "tokens_max": stats["max"],
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes()}


def measure_datasets(file: Path, tokenizer_dir: str, workdir: Path) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(file), split="train", cache_dir=str(workdir / "hf-cache"))
    loaded = time.perf_counter()

    def lengths(batch):
        texts = tokenizer.apply_chat_template(batch["messages"], tokenize=False)
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return {"length": [len(x) for x in ids]}

    ds = ds.map(lengths, batched=True, batch_size=1000, remove_columns=ds.column_names)
    counted = ds["length"]
    end = time.perf_counter()
    return {"rows": len(counted), "seconds": end - start, "load_seconds": loaded - start,
            "tokenize_seconds": end - loaded, "tokens_max": max(counted),
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak_rss_bytes()}


def in_subprocess(kind: str, file: Path, tokenizer_dir: str, workdir: Path) -> dict:
    command = [sys.executable, __file__, "--measure", kind, "--file", str(file), "--tokenizer", tokenizer_dir,
               "--workdir", str(workdir)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_tokenizer(workdir: Path) -> str:
    sys.path.append(str(ROOT / "tests"))  # appended: tests/finetune must not shadow the finetune package
    from tinymodel import build_tokenizer

    folder = workdir / "tiny-tokenizer"
    build_tokenizer(folder)
    return str(folder)


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def report_line(name: str, result: dict) -> str:
    rate = result["rows"] / result["seconds"]
    return (f"{name:<28} {result['rows']:>9,} rows {result['seconds']:>8.1f} s {rate:>10,.0f} rows/s   "
            f"peak RSS {mib(result['peak_rss_bytes']):>9} (after imports {mib(result['baseline_rss_bytes'])})")


def run_benchmark(args):
    with tempfile.TemporaryDirectory(prefix="tunedeck-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        tokenizer_dir = args.tokenizer or tiny_tokenizer(workdir)
        small_rows = max(1, args.rows // 4)
        started = time.perf_counter()
        big = generate_chat_jsonl(workdir / "chat-big.jsonl", args.rows)
        small = generate_chat_jsonl(workdir / "chat-small.jsonl", small_rows, seed=1)
        print(f"generated {args.rows:,} + {small_rows:,} chat rows ({mib(big.stat().st_size)} + "
              f"{mib(small.stat().st_size)}) in {time.perf_counter() - started:.0f} s; tokenizer {tokenizer_dir}")

        ours_small = in_subprocess("ours", small, tokenizer_dir, workdir)
        ours = in_subprocess("ours", big, tokenizer_dir, workdir)
        theirs = in_subprocess("datasets", big, tokenizer_dir, workdir)
        print(report_line(f"ours ({small_rows:,} rows)", ours_small))
        print(report_line(f"ours ({args.rows:,} rows)", ours))
        print(f"{'':<28} validate+normalise {ours['validate_seconds']:.1f} s, "
              f"tokenize {ours['tokenize_seconds']:.1f} s")
        print(report_line(f"datasets ({args.rows:,} rows)", theirs))
        print(f"{'':<28} load_dataset {theirs['load_seconds']:.1f} s, map {theirs['tokenize_seconds']:.1f} s")
        ratio = (ours["rows"] / ours["seconds"]) / (theirs["rows"] / theirs["seconds"])
        growth = ours["peak_rss_bytes"] - ours_small["peak_rss_bytes"]
        print(f"ours / datasets throughput: {ratio:.2f}x; ours' peak RSS grew {mib(growth)} for "
              f"{args.rows - small_rows:,} more rows")


def main():
    args = parse_args()
    if args.measure:
        measure = measure_ours if args.measure == "ours" else measure_datasets
        print(json.dumps(measure(Path(args.file), args.tokenizer, Path(args.workdir))))
        return
    run_benchmark(args)


if __name__ == "__main__":
    main()

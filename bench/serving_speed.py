"""Serving speed: a merged deployment vs the same adapter unmerged on its base, and multi-LoRA throughput.

    .venv/bin/python bench/serving_speed.py                 # tiny random Llama, CPU (and CUDA if present)
    .venv/bin/python bench/serving_speed.py --model PATH    # e.g. the converted SmolLM2 folder
    .venv/bin/python bench/serving_speed.py --devices cpu --max-tokens 48 --requests 16

Measures, per device, through finetune.serving.ModelServer's streaming API (what the OpenAI endpoint uses):
time to first token (first text delta), decode tokens/s after it, and for 1, 4 and 16 LoRA adapters on one
base the aggregate tokens/s of requests sent round-robin across the adapters (every adapter warmed up first,
so adapter loading is not timed). Adapters are random rank-r LoRA on every linear layer: speed does not depend
on what they learned.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = [{"role": "user", "content": "Write a long story about a dragon who learns to count."}]


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a Hugging Face model folder (default: a tiny random Llama)")
    parser.add_argument(
        "--devices", default="auto", help="comma-separated: cpu,cuda (default: cpu and cuda if present)"
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed requests per single-deployment measurement"
    )
    parser.add_argument("--requests", type=int, default=16, help="timed requests per multi-LoRA measurement")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapter-counts", default="1,4,16")
    return parser.parse_args()


def devices_to_test(spec: str) -> list[str]:
    import torch

    if spec == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [d.strip() for d in spec.split(",") if d.strip()]


def tiny_base(workdir: Path) -> Path:
    sys.path.append(str(ROOT / "tests"))  # appended: tests/finetune must not shadow the finetune package
    from tinymodel import build_tiny_model

    return build_tiny_model(workdir / "tiny", hidden=256, layers=4)


def make_random_lora(base_dir: Path, out_dir: Path, rank: int, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.modelstore import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(base_dir, device="cpu", dtype="fp32")
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.01)
    model.save_pretrained(out_dir)
    return out_dir


def timed_request(server, name: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    final = None
    for item in server.stream_chat(name, QUESTION, max_tokens=max_tokens, temperature=0):
        if isinstance(item, str):
            first = first or time.perf_counter()
        else:
            final = item
    ended = time.perf_counter()
    first = first or ended
    tokens = final["completion_tokens"]
    decode_tps = (tokens - 1) / (ended - first) if tokens > 1 and ended > first else float("nan")
    return {"ttft": first - started, "total": ended - started, "tokens": tokens, "decode_tps": decode_tps}


def summarise(runs: list[dict]) -> dict:
    return {
        "ttft_ms": 1000 * statistics.median(r["ttft"] for r in runs),
        "tps": statistics.median(r["decode_tps"] for r in runs),
        # Requests back to back, prefill included: what a client queue sees.
        "e2e_tps": sum(r["tokens"] for r in runs) / sum(r["total"] for r in runs),
        "tokens": statistics.median(r["tokens"] for r in runs),
    }


def single_deployment(server, name: str, args) -> dict:
    timed_request(server, name, args.max_tokens)  # warm-up: loads the model/adapter, first-call allocations
    return summarise([timed_request(server, name, args.max_tokens) for _ in range(args.repeats)])


def multi_lora(base_dir, adapters, count: int, device: str, args) -> dict:
    from finetune.serving import ModelServer

    server = ModelServer(max_adapters=count, device=device)
    names = [f"lora-{i}" for i in range(count)]
    for name, adapter in zip(names, adapters, strict=False):
        server.add_adapter(name, adapter, base_path=base_dir)
    for name in names:
        timed_request(server, name, 2)
    return summarise([timed_request(server, names[i % count], args.max_tokens) for i in range(args.requests)])


def bench_device(device: str, base_dir: Path, adapters: list[Path], workdir: Path, args) -> list[tuple]:
    from finetune.merge import merge_adapter
    from finetune.serving import ModelServer

    started = time.perf_counter()
    merged_dir = workdir / f"merged-{device}"
    report = merge_adapter(base_dir, adapters[0], merged_dir, device=device)
    merge_seconds = time.perf_counter() - started
    server = ModelServer(device=device)
    server.add_merged("merged", merged_dir)
    server.add_adapter("unmerged", adapters[0], base_path=base_dir)
    merged = single_deployment(server, "merged", args)
    rows = [(device, "merged", merged, merged["tps"])]
    rows.append(
        (device, "base + adapter (unmerged)", single_deployment(server, "unmerged", args), merged["tps"])
    )
    for count in [int(c) for c in args.adapter_counts.split(",")]:
        result = multi_lora(base_dir, adapters, count, device, args)
        rows.append((device, f"multi-LoRA, {count} adapters", result, merged["tps"]))
    diff = report["max_abs_diff"]
    print(f"[{device}] merge took {merge_seconds:.1f}s, max |merged - unmerged| logits {diff:.2e}")
    return rows


def print_table(rows, model_label: str) -> None:
    columns = ["ttft ms", "decode tok/s", "e2e tok/s", "tokens", "decode vs merged"]
    header = f"{'device':<6} {'deployment':<28} " + " ".join(f"{c:>{len(c) + 2}}" for c in columns)
    print(f"\nmodel: {model_label}\n{header}\n{'-' * len(header)}")
    for device, label, result, merged_tps in rows:
        ratio = result["tps"] / merged_tps if merged_tps else float("nan")
        cells = [
            f"{result['ttft_ms']:.1f}",
            f"{result['tps']:.1f}",
            f"{result['e2e_tps']:.1f}",
            f"{result['tokens']:.0f}",
            f"{ratio:.2f}x",
        ]
        print(
            f"{device:<6} {label:<28} "
            + " ".join(f"{v:>{len(c) + 2}}" for v, c in zip(cells, columns, strict=True))
        )


def main() -> None:
    args = parse_args()
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="tunedeck-bench-") as tmp:
        workdir = Path(tmp)
        base_dir = Path(args.model) if args.model else tiny_base(workdir)
        count = max(int(c) for c in args.adapter_counts.split(","))
        adapters = [make_random_lora(base_dir, workdir / f"adapter-{i}", args.rank, i) for i in range(count)]
        rows = []
        for device in devices_to_test(args.devices):
            rows += bench_device(device, base_dir, adapters, workdir, args)
        label = str(base_dir) if args.model else "tiny random Llama (hidden 256, 4 layers)"
        threads = torch.get_num_threads()
        print_table(rows, f"{label}; {args.max_tokens} new tokens, LoRA rank {args.rank}, {threads} threads")


if __name__ == "__main__":
    main()

"""Serving speed: the built-in server vs vLLM under concurrent load; merged vs unmerged; multi-LoRA throughput.

    .venv/bin/python bench/serving_speed.py --model PATH --sections engines,vllm-lora   # built-in vs vLLM
    .venv/bin/python bench/serving_speed.py                 # tiny random Llama, CPU (and CUDA if present)
    .venv/bin/python bench/serving_speed.py --model PATH    # e.g. the converted SmolLM2 folder
    .venv/bin/python bench/serving_speed.py --devices cpu --max-tokens 48 --requests 16

Section "engines" (needs .venv-vllm, scripts/setup-vllm.sh): the same merged model served by the built-in engine
(serving.model_server.ModelServer, called in-process from N threads, so it pays no HTTP) and by a vLLM server started
through serving.vllm_process.VllmSupervisor (streamed over HTTP, as the inference server relays it), at 1/4/16/64
concurrent streaming chat requests, greedy, the same prompt and max tokens: tokens/s, requests/s, p50/p99 latency
and median time to first token. The engine that goes first alternates from one concurrency level to the next.
Section "vllm-lora": 1/4/16 random LoRA adapters loaded at run time onto one vLLM base server, requests sent
round-robin across them at --lora-concurrency; throughput relative to one adapter.
Both engines run --dtype (fp32 by default, the built-in server's CPU dtype); --vllm-cpu-threads picks vLLM's CPU
thread binding (auto: all CPUs on a host of at most 4, vLLM's own binding, which keeps a core for its scheduler,
on larger ones).
Section "restart" (issue 38): how long after the inference server starts each of 1, 3 and 8 merged deployments
(--restart-counts; copies of one merged model, each its own deployment) gives its first answer, through the
serving engines the inference server uses (serving.builtin.BuiltinEngine, serving.vllm.VllmEngine: a vLLM server
per merged deployment), all added at once as a restarting inference server does: the first, median and last
deployment's time to its first answer, printed as a table per engine and count; vLLM rows wait only for the deployments
the host runs vLLM servers for (VllmSupervisor.max_servers: one per 4 CPUs on a CPU host), the column "served" says
how many (the inference server answers the others with the built-in engine).
Section "builtin" (the default without --sections) is the in-process table below.

Measures, per device, through serving.model_server.ModelServer's streaming API (what the OpenAI endpoint uses):
time to first token (first text delta), decode tokens/s after it, and for 1, 4 and 16 LoRA adapters on one
base the aggregate tokens/s of requests sent round-robin across the adapters (every adapter warmed up first,
so adapter loading is not timed). Adapters are random rank-r LoRA on every linear layer: speed does not depend
on what they learned.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
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
    parser.add_argument("--sections", default="builtin",
                        help="comma-separated: builtin, engines, vllm-lora, restart")
    parser.add_argument("--restart-counts", default="1,3,8", help="restart: merged deployments served at once")
    parser.add_argument("--restart-engines", default="builtin,vllm", help="restart: builtin, vllm or both")
    parser.add_argument("--concurrency", default="1,4,16,64", help="engines: concurrent request levels")
    parser.add_argument("--waves", type=int, default=1,
                        help="engines: requests per level = max(4, waves * concurrency)")
    parser.add_argument("--lora-concurrency", type=int, default=16)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="engines/vllm-lora: both engines run this dtype (like with like; the built-in "
                             "server's CPU default is fp32, vLLM's own default on a bf16 CPU is bf16)")
    parser.add_argument("--vllm-cpu-threads", default="auto", choices=["auto", "all", "vllm"],
                        help="vLLM's CPU thread binding (serving/vllm_process.cpu_thread_binding)")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
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
    from serving.model_server import ModelServer

    server = ModelServer(max_adapters=count, device=device)
    names = [f"lora-{i}" for i in range(count)]
    for name, adapter in zip(names, adapters, strict=False):
        server.add_adapter(name, adapter, base_path=base_dir)
    for name in names:
        timed_request(server, name, 2)
    return summarise([timed_request(server, names[i % count], args.max_tokens) for i in range(args.requests)])


def bench_device(device: str, base_dir: Path, adapters: list[Path], workdir: Path, args) -> list[tuple]:
    from finetune.merge import merge_adapter
    from serving.model_server import ModelServer

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
    sections = {s.strip() for s in args.sections.split(",")}
    with tempfile.TemporaryDirectory(prefix="tunedeck-bench-") as tmp:
        workdir = Path(tmp)
        base_dir = Path(args.model) if args.model else tiny_base(workdir)
        count = max(int(c) for c in args.adapter_counts.split(","))
        adapters = [make_random_lora(base_dir, workdir / f"adapter-{i}", args.rank, i) for i in range(count)]
        print(f"load average at start: {os.getloadavg()}", flush=True)
        if "engines" in sections:
            engines_section(base_dir, adapters[0], workdir, args)
        if "vllm-lora" in sections:
            vllm_lora_section(base_dir, adapters, workdir, args)
        if "restart" in sections:
            restart_section(base_dir, adapters[0], workdir, args)
        print(f"load average at end: {os.getloadavg()}", flush=True)
        if "builtin" not in sections:
            return
        rows = []
        for device in devices_to_test(args.devices):
            rows += bench_device(device, base_dir, adapters, workdir, args)
        label = str(base_dir) if args.model else "tiny random Llama (hidden 256, 4 layers)"
        threads = torch.get_num_threads()
        print_table(rows, f"{label}; {args.max_tokens} new tokens, LoRA rank {args.rank}, {threads} threads")


# ---------------------------------------------------------------------------------------------------------
# built-in vs vLLM under concurrent load
# ---------------------------------------------------------------------------------------------------------


def builtin_request(server, name: str, max_tokens: int) -> dict:
    timed = timed_request(server, name, max_tokens)
    return {"ttft": timed["ttft"], "latency": timed["total"], "tokens": timed["tokens"]}


def vllm_request(route, model: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(route.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {route.api_key}"})
    started = time.perf_counter()
    first = None
    tokens = 0
    with urllib.request.urlopen(request, timeout=1800) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if first is None and any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                first = time.perf_counter()
    ended = time.perf_counter()
    return {"ttft": (first or ended) - started, "latency": ended - started, "tokens": tokens}


def under_load(send, requests: int, concurrency: int) -> dict:
    """`requests` calls of send(i) from `concurrency` threads; aggregate throughput and latency percentiles."""
    results: list = []
    lock = threading.Lock()
    next_index = iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            outcome = send(i)
            with lock:
                results.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies = sorted(r["latency"] for r in results)
    return {
        "requests": len(results),
        "tokens": sum(r["tokens"] for r in results),
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "req_s": len(results) / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "ttft": statistics.median(r["ttft"] for r in results),
    }


def start_vllm(model_dir: Path, workdir: Path, args, *, adapters=None):
    from serving.vllm_process import EngineSettings, VllmSupervisor

    ready = threading.Event()
    failed: list = []
    settings = EngineSettings(python=args.vllm_python, log_dir=workdir / "logs", max_adapters=16, max_loras=16,
                              startup_timeout=1200, cpu_threads=args.vllm_cpu_threads,
                              dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dtype])
    supervisor = VllmSupervisor(settings, on_ready=lambda name: ready.set(),
                                on_failed=lambda name, reason: (failed.append(reason), ready.set()))
    started = time.perf_counter()
    if adapters is None:
        supervisor.add_merged("merged", model_dir)
    else:
        for i, adapter in enumerate(adapters):
            supervisor.add_adapter(f"lora-{i}", model_dir, adapter)
    supervisor.start()
    ready.wait()
    if failed:
        supervisor.stop()
        raise SystemExit(f"vLLM did not start: {failed[0]}")
    print(f"vLLM server ready after {time.perf_counter() - started:.0f}s", flush=True)
    return supervisor


def engines_section(base_dir: Path, adapter: Path, workdir: Path, args) -> None:
    from finetune.merge import merge_adapter
    from serving.model_server import ModelServer

    merged_dir = workdir / "merged-engines"
    merge_adapter(base_dir, adapter, merged_dir, device="cpu")
    builtin = ModelServer(device="cpu", dtype=args.dtype)
    builtin.add_merged("merged", merged_dir)
    builtin_request(builtin, "merged", 2)  # loads it
    supervisor = start_vllm(merged_dir, workdir, args)
    try:
        route = supervisor.route("merged")
        vllm_request(route, "merged", 2)  # warm-up
        sends = {
            "built-in": lambda i: builtin_request(builtin, "merged", args.max_tokens),
            "vLLM": lambda i: vllm_request(route, "merged", args.max_tokens),
        }
        rows = []
        for level, concurrency in enumerate(int(c) for c in args.concurrency.split(",")):
            order = ["built-in", "vLLM"] if level % 2 == 0 else ["vLLM", "built-in"]
            requests = max(4, args.waves * concurrency)
            measured = {engine: under_load(sends[engine], requests, concurrency) for engine in order}
            for engine in ("built-in", "vLLM"):
                rows.append((engine, concurrency, measured[engine], measured["built-in"]))
                print_engine_row(*rows[-1])
    finally:
        supervisor.stop()


def print_engine_row(engine, concurrency, result, baseline) -> None:
    ratio = result["tok_s"] / baseline["tok_s"]
    print(f"{engine:<9} c={concurrency:<3} requests={result['requests']:<3} tokens={result['tokens']:<5} "
          f"tok/s={result['tok_s']:7.1f} req/s={result['req_s']:6.2f} p50={result['p50']:6.2f}s "
          f"p99={result['p99']:6.2f}s ttft={result['ttft']:6.2f}s  tok/s vs built-in {ratio:5.2f}x "
          f"p50 vs built-in {result['p50'] / baseline['p50']:5.2f}x", flush=True)


def vllm_lora_section(base_dir: Path, adapters: list, workdir: Path, args) -> None:
    counts = [int(c) for c in args.adapter_counts.split(",")]
    supervisor = start_vllm(base_dir, workdir, args, adapters=adapters[: max(counts)])
    try:
        first = None
        for count in counts:
            routes = [supervisor.route(f"lora-{i}") for i in range(count)]
            for i, route in enumerate(routes):
                vllm_request(route, f"lora-{i}", 2)  # warm-up: every adapter in vLLM's cache
            requests = max(args.requests, args.lora_concurrency)
            def send(i, routes=routes, count=count):
                return vllm_request(routes[i % count], f"lora-{i % count}", args.max_tokens)

            result = under_load(send, requests, args.lora_concurrency)
            first = first or result
            print(f"vLLM multi-LoRA adapters={count:<3} c={args.lora_concurrency} tok/s={result['tok_s']:7.1f} "
                  f"p50={result['p50']:6.2f}s ttft={result['ttft']:6.2f}s vs 1 adapter "
                  f"{result['tok_s'] / first['tok_s']:5.2f}x", flush=True)
    finally:
        supervisor.stop()


# ---------------------------------------------------------------------------------------------------------
# restart: from the inference server's start to each deployment's first answer
# ---------------------------------------------------------------------------------------------------------


def restart_engine(name: str, workdir: Path, args, on_ready):
    from serving.builtin import BuiltinEngine
    from serving.engine import EngineContext
    from serving.vllm import VllmEngine

    context = EngineContext(device="cpu", log_dir=workdir / "logs", on_ready=on_ready,
                            on_failed=lambda deployment, reason: on_ready(deployment, reason))
    if name == "builtin":
        return BuiltinEngine(context)
    return VllmEngine(context, python=args.vllm_python, startup_seconds=1800, cpu_threads=args.vllm_cpu_threads,
                      dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dtype], gpus=[])


def time_to_first_answers(engine_name: str, merged: list[Path], workdir: Path, args) -> tuple[list[float], int]:
    """Seconds from the engine's start to each deployment's first answer, all deployments added at once, and how
    many deployments the engine serves on this host: vLLM runs at most max_servers() servers at once (one per 4
    CPUs on a CPU host); the inference server leaves the rest on the built-in engine, so they never get a vLLM
    answer and are not waited for."""
    answered: dict[str, float] = {}
    failures: dict[str, str] = {}
    done = threading.Condition()

    def answer(deployment: str, failure: str = "") -> None:
        # The answer is asked for in a thread of its own: an engine's callback must not wait on a request.
        def ask():
            if not failure:
                engine.generate("chat", deployment, {"model": deployment, "messages": QUESTION, "max_tokens": 4,
                                                     "temperature": 0})
            with done:
                answered[deployment] = time.perf_counter() - started
                if failure:
                    failures[deployment] = failure
                done.notify_all()

        threading.Thread(target=ask, daemon=True).start()

    engine = restart_engine(engine_name, workdir / f"restart-{engine_name}-{len(merged)}", args, answer)
    started = time.perf_counter()
    engine.start()
    try:
        names = [f"merged-{i}" for i in range(len(merged))]
        for name, folder in zip(names, merged, strict=True):
            engine.add_merged(name, folder)
            if engine.is_ready(name):  # the built-in engine loads at once; vLLM calls back when it answers
                answer(name)
        served = min(len(names), engine.supervisor.max_servers()) if engine_name == "vllm" else len(names)
        with done:
            done.wait_for(lambda: len(answered) == served, timeout=3600)
    finally:
        engine.stop()
    if failures:
        raise SystemExit(f"{engine_name} could not serve {sorted(failures)}: {next(iter(failures.values()))}")
    return sorted(answered.values()), served


def restart_section(base_dir: Path, adapter: Path, workdir: Path, args) -> None:
    from finetune.merge import merge_adapter

    merged_dir = workdir / "merged-restart"
    merge_adapter(base_dir, adapter, merged_dir, device="cpu")
    counts = [int(c) for c in args.restart_counts.split(",")]
    copies = []
    for i in range(max(counts)):  # one folder per deployment, as merged versions are: hard links to the same files
        copy = workdir / f"merged-restart-{i}"  # (not symlinks: a model folder's files must not point outside it)
        copy.mkdir()
        shutil.copytree(merged_dir, copy, copy_function=os.link, dirs_exist_ok=True)
        copies.append(copy)
    print("\nrestart: seconds from the inference server's start to each deployment's first answer", flush=True)
    print("(served: the deployments this engine answers on this host; the inference server answers the others "
          "with the built-in engine)", flush=True)
    print(f"{'engine':<9} {'deployments':>11} {'served':>7} {'first':>8} {'median':>8} {'last':>8}", flush=True)
    for engine_name in [e.strip() for e in args.restart_engines.split(",") if e.strip()]:
        for count in counts:
            times, served = time_to_first_answers(engine_name, copies[:count], workdir, args)
            print(f"{engine_name:<9} {count:>11} {served:>7} {times[0]:8.1f} {statistics.median(times):8.1f} "
                  f"{times[-1]:8.1f}", flush=True)


if __name__ == "__main__":
    main()

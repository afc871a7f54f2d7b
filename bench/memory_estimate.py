"""autotune's memory estimate against real training steps on a CUDA GPU, and select() under capped memory.

    python bench/memory_estimate.py                      # both sections (each about 5-8 minutes on an H100)
    python bench/memory_estimate.py --quick              # fewer rows, steps and alternatives
    python bench/memory_estimate.py --section estimate   # or: select
    python bench/memory_estimate.py --json results.json  # also write every row

Needs torch, transformers, peft and bitsandbytes (for QLoRA); no Django. Without CUDA it prints "needs CUDA" and
exits 0.

Section "estimate": random-initialised models built from autotune/configs (some with fewer layers, so 7-8B
shapes fit the time budget; the estimate gets the same shrunken config) train three steps each, forward, backward
and AdamW, with LoRA, QLoRA (bitsandbytes NF4 with double quantisation, built layer by layer from the random
bf16 weights) and DoRA at several ranks, batch sizes, sequence lengths, checkpointing on and off. Half of each
batch is padded, as real batches are. Each row runs in a fresh process so peaks do not leak. Measured peak =
torch.cuda.max_memory_reserved during training + the CUDA context (NVML's used memory minus reserved right after
CUDA starts). Prints predicted vs measured per row, the median and max absolute error, and how much of the
dynamic part (activations + logits) the estimate would need to scale by to match (a hint for `calibration`).

Section "select": for GPU memory capped at 16, 24, 40 and 80 GB (torch.cuda.set_per_process_memory_fraction),
select() plans Llama-3.1-8B on a 20,000-row dataset with p99 = 1,024 tokens; the plan trains a few steps
(OOMs counted), then a sweep of micro-batch sizes with and without checkpointing runs at the same length, and the
plan's tokens/s is compared with the fastest alternative that ran without OOM.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autotune import estimate, select  # noqa: E402 - after the path fix
from autotune.shapes import load_reference_config  # noqa: E402
from finetune.methods import get_method
from finetune.optim import build_optimizer  # noqa: E402 - the plan's optimizer, as training builds it

GB = 10**9

# (model, config overrides, plan) - Llama 1B and 8B shapes, Qwen2.5, Phi-3 and Gemma-2 as the other families
ESTIMATE_ROWS = [
    ("Llama-3.2-1B", {}, dict(method="lora", rank=16, micro_batch=1, max_seq_len=512)),
    ("Llama-3.2-1B", {}, dict(method="lora", rank=16, micro_batch=4, max_seq_len=1024)),
    ("Llama-3.2-1B", {}, dict(method="lora", rank=16, micro_batch=8, max_seq_len=2048, gradient_checkpointing=True)),
    ("Llama-3.2-1B", {}, dict(method="lora", rank=64, micro_batch=2, max_seq_len=2048)),
    ("Llama-3.2-1B", {}, dict(method="lora", rank=8, micro_batch=16, max_seq_len=512, gradient_checkpointing=True,
                              target_modules=["q_proj", "v_proj"])),
    ("Llama-3.2-1B", {}, dict(method="qlora", rank=16, micro_batch=4, max_seq_len=1024, gradient_checkpointing=True)),
    ("Llama-3.2-1B", {}, dict(method="qlora", rank=16, micro_batch=2, max_seq_len=2048)),
    ("Llama-3.2-1B", {}, dict(method="dora", rank=16, micro_batch=2, max_seq_len=1024, gradient_checkpointing=True)),
    ("Llama-3.1-8B", {"num_hidden_layers": 8}, dict(method="lora", rank=16, micro_batch=1, max_seq_len=1024)),
    ("Llama-3.1-8B", {"num_hidden_layers": 8}, dict(method="lora", rank=16, micro_batch=4, max_seq_len=2048,
                                                    gradient_checkpointing=True)),
    ("Llama-3.1-8B", {"num_hidden_layers": 8}, dict(method="qlora", rank=32, micro_batch=8, max_seq_len=1024,
                                                    gradient_checkpointing=True)),
    ("Llama-3.1-8B", {}, dict(method="qlora", rank=16, micro_batch=2, max_seq_len=2048, gradient_checkpointing=True)),
    ("Llama-3.1-8B", {}, dict(method="lora", rank=16, micro_batch=2, max_seq_len=4096, gradient_checkpointing=True)),
    ("Qwen2.5-7B", {"num_hidden_layers": 6}, dict(method="lora", rank=16, micro_batch=2, max_seq_len=1024)),
    ("Qwen2.5-7B", {"num_hidden_layers": 6}, dict(method="qlora", rank=16, micro_batch=4, max_seq_len=2048,
                                                  gradient_checkpointing=True)),
    ("Phi-3-mini", {"num_hidden_layers": 8}, dict(method="lora", rank=16, micro_batch=4, max_seq_len=1024)),
    ("Phi-3-mini", {"num_hidden_layers": 8}, dict(method="lora", rank=32, micro_batch=8, max_seq_len=2048,
                                                  gradient_checkpointing=True)),
    ("Gemma-2-2B", {"num_hidden_layers": 8}, dict(method="lora", rank=16, micro_batch=2, max_seq_len=1024)),
    # every other method, packing and Liger, on the 1B shape (8B's 8-layer cut for IA3 and DPO)
    ("Llama-3.2-1B", {}, dict(method="ia3", micro_batch=4, max_seq_len=1024)),
    ("Llama-3.1-8B", {"num_hidden_layers": 8}, dict(method="ia3", micro_batch=2, max_seq_len=2048,
                                                    gradient_checkpointing=True)),
    ("Llama-3.2-1B", {}, dict(method="prefix", micro_batch=4, max_seq_len=1024)),
    ("Llama-3.2-1B", {}, dict(method="prompt", micro_batch=4, max_seq_len=1024)),
    ("Llama-3.2-1B", {}, dict(method="adapter", micro_batch=4, max_seq_len=1024)),
    ("Llama-3.2-1B", {}, dict(method="dpo", rank=16, micro_batch=2, max_seq_len=1024)),
    ("Llama-3.1-8B", {"num_hidden_layers": 8}, dict(method="dpo", rank=16, micro_batch=1, max_seq_len=2048,
                                                    gradient_checkpointing=True)),
    ("Llama-3.2-1B", {}, dict(method="lora", rank=16, micro_batch=4, max_seq_len=2048, packing=True)),
    ("Llama-3.2-1B", {}, dict(method="lora", rank=16, micro_batch=4, max_seq_len=2048, liger=True)),
]
# 1B and 8B shapes, LoRA/QLoRA/DoRA/IA3/prefix/DPO, 512-4096 tokens, with and without checkpointing: 16 rows
QUICK_ROWS = (0, 1, 2, 5, 7, 8, 9, 11, 12, 18, 19, 20, 23, 24, 25, 26)
CAPS_GB = (16, 24, 40, 80)
SELECT_STATS = {"rows": 20_000, "token_stats": {"count": 20_000, "min": 40, "p50": 380, "p95": 800, "p99": 1024,
                                                "max": 3000}}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rows, steps and alternatives")
    parser.add_argument("--section", choices=["estimate", "select", "both"], default="both")
    parser.add_argument("--model", default="Llama-3.1-8B", help="reference config for the select section")
    parser.add_argument("--json", help="write all rows to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON job for a child process
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # code-path check, tiny models
    return parser.parse_args()


# ------------------------------------------------------------------------ child process: one measurement


def nvml_used_bytes() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - without NVML, torch.cuda.mem_get_info measures it instead
        return None


def start_cuda(device: str) -> int:
    """Starts CUDA and returns the context's size: device memory in use beyond what the allocator reserved,
    measured by NVML before and after CUDA starts, or (without NVML) by cudaMemGetInfo right after it starts.
    Never the estimate's own constant: that would make the comparison circular."""
    import torch

    if device != "cuda":
        return 0
    before = nvml_used_bytes()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    after = nvml_used_bytes()
    if before is not None and after is not None:
        return max(0, after - before - torch.cuda.memory_reserved())
    free, total = torch.cuda.mem_get_info()  # other processes' memory counts too: run on an idle GPU
    return max(0, total - free - torch.cuda.memory_reserved())


def build_model(config: dict, plan: dict, device: str):
    """A random-weight model of the config, wrapped for the plan's method by the platform's own code
    (finetune.methods.wrap_for_training), in train mode: from_config's eval mode would silently turn gradient
    checkpointing and dropout off."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.methods import wrap_for_training

    dtype = torch.bfloat16 if plan.get("dtype", "bf16") == "bf16" else torch.float32
    hf_config = AutoConfig.for_model(**config)
    hf_config.use_cache = False
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        except TypeError:  # transformers before 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(hf_config, torch_dtype=dtype)
    model.requires_grad_(False)
    method = get_method(plan["method"])
    if method.quantized_base:
        quantise_decoder_linears(model)
    if plan.get("liger") and device == "cuda":
        from finetune.train import TrainSpec, apply_fused_kernels

        spec = TrainSpec(base_model_path="", train_file="", output_dir="", method=plan["method"], device=device)
        spec.plan["liger"] = True
        apply_fused_kernels(model, spec)
    set_checkpointing(model, plan.get("gradient_checkpointing", False) and method.gradient_checkpointing)
    wrapped = {"rank": plan.get("rank", 16), "dropout": plan.get("dropout", 0.05), **plan}
    if not method.lora_family:  # IA3 takes peft's own targets, as the estimate counts them
        wrapped.pop("target_modules", None)
    model = wrap_for_training(model, wrapped)
    model.train()
    return model


def quantise_decoder_linears(model):
    """NF4 with double quantisation, like from_pretrained(quantization_config=...) but from random weights."""
    import bitsandbytes as bnb
    import torch

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or name == "lm_head":
                continue
            quantised = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                          device="meta")
            weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                       quant_type="nf4", module=quantised)
            quantised.weight = weight.to(child.weight.device)
            if child.bias is not None:
                quantised.bias = child.bias
            setattr(parent, name, quantised)
    model.is_loaded_in_4bit = True  # peft dispatches its bitsandbytes LoRA layers on this flag
    torch.cuda.empty_cache()


def set_checkpointing(model, enabled: bool):
    """As training does: non-reentrant checkpointing, which needs no enable_input_require_grads()."""
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def train_steps(model, optimizer, vocab: int, micro_batch: int, seq: int, steps: int, device: str,
                method: str = "lora", packing: bool = False) -> dict:
    """Runs `steps` optimizer steps on random tokens (half the rows padded, unless packed) through the platform's
    own loss path: finetune.train.token_loss_sum (the fused loss where the model allows it) or dpo_loss."""
    import torch

    from finetune import train

    ids = torch.randint(3, vocab, (micro_batch, seq), device=device)
    mask = torch.ones_like(ids)
    positions = None
    if packing:  # packed rows: several examples per row, positions restarting, no padding
        positions = torch.arange(seq, device=device).remainder(max(1, seq // 4)).repeat(micro_batch, 1)
        mask = None
    else:
        mask[::2, seq - seq // 8:] = 0  # padding on every other row, as batches of uneven examples have
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        if get_method(method).paired:
            # micro_batch pairs = 2 x micro_batch sequences, as the estimate counts DPO; the rejected answer is the
            # same tokens with its last quarter unlabelled, so the two differ
            rows = [r.tolist() for r in ids]
            pairs = [{"chosen": {"input_ids": r, "labels": r},
                      "rejected": {"input_ids": r, "labels": r[: seq * 3 // 4] + [-100] * (seq - seq * 3 // 4)}}
                     for r in rows]
            loss = train.dpo_loss(model, pairs, 0.1, 0, torch.device(device))[0]
        else:
            loss_sum, count = train.token_loss_sum(model, ids, labels, mask, positions)
            loss = loss_sum / max(1, count)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = times[1:] or times
    return {"tokens_per_second": micro_batch * seq * len(timed) / sum(timed), "step_seconds": times}


def measure(job: dict) -> dict:
    """One fresh-process measurement: build, reset the peak, train, report the peak."""
    import torch

    device = job["device"]
    context = start_cuda(device)
    model = build_model(job["config"], job["plan"], device)
    optimizer = build_optimizer(model.parameters(), {**job["plan"], "learning_rate": 1e-4}, device)
    result = {"context_bytes": context, "oom": False}
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result["build_reserved_bytes"] = torch.cuda.memory_reserved()
    plan = job["plan"]
    try:
        result.update(train_steps(model, optimizer, job["config"]["vocab_size"], plan["micro_batch"],
                                  plan["max_seq_len"], job["steps"], device, plan["method"],
                                  bool(plan.get("packing"))))
    except torch.cuda.OutOfMemoryError:
        result["oom"] = True
    if device == "cuda":
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["measured_bytes"] = result["peak_reserved_bytes"] + context
    return result


def run_capped(job: dict) -> dict:
    """The select section's child: the plan under a memory cap, then a sweep of alternatives on the same model."""
    import torch

    device, plan = job["device"], job["plan"]
    context = start_cuda(device)
    model = build_model(job["config"], plan, device)
    optimizer = build_optimizer(model.parameters(), {**job["plan"], "learning_rate": 1e-4}, device)
    if device == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        # A GPU of cap_bytes holds the CUDA context too, outside the allocator that the fraction caps.
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(0, job["cap_bytes"] - context) / total))
    vocab = job["config"]["vocab_size"]
    runs = []
    for micro_batch, checkpointing in [(plan["micro_batch"], plan["gradient_checkpointing"])] + job["sweep"]:
        set_checkpointing(model, checkpointing)
        run = {"micro_batch": micro_batch, "gradient_checkpointing": checkpointing, "oom": False}
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            run.update(train_steps(model, optimizer, vocab, micro_batch, plan["max_seq_len"], job["steps"], device,
                                   plan["method"], bool(plan.get("packing"))))
        except torch.cuda.OutOfMemoryError:
            run["oom"] = True
            optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            run["measured_bytes"] = torch.cuda.max_memory_reserved() + context
        runs.append(run)
    return {"runs": runs, "context_bytes": context}


def worker(job_text: str):
    job = json.loads(job_text)
    result = run_capped(job) if job["kind"] == "select" else measure(job)
    print("RESULT " + json.dumps(result), flush=True)


def in_child(job: dict, timeout: int = 600) -> dict:
    if job["device"] == "cpu":  # the CPU smoke run measures no peaks: in-process saves each row a torch import
        return run_capped(job) if job["kind"] == "select" else measure(job)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    last_line = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
    return {"failure": f"child failed (rc {proc.returncode}): {last_line}"}


# ------------------------------------------------------------------------ section: estimate vs measured


def estimate_section(args, device: str) -> list[dict]:
    rows = [ESTIMATE_ROWS[i] for i in QUICK_ROWS] if args.quick else ESTIMATE_ROWS
    if args.cpu_smoke:
        kinds = {}  # one tiny row per method (and packing), QLoRA only with bitsandbytes
        for _, _, plan in ESTIMATE_ROWS:
            if not get_method(plan["method"]).quantized_base or _has("bitsandbytes"):
                kinds.setdefault((plan["method"], bool(plan.get("packing"))), plan)
        if args.quick:  # the dry run's share of two minutes: a LoRA-family, a peft-vector and a pair method
            kinds = {k: v for k, v in kinds.items() if k in (("lora", False), ("ia3", False), ("dpo", False))}
        rows = [("Llama-3.2-1B", TINY, {**plan, "micro_batch": 2, "max_seq_len": 64, "rank": 4,
                                        "liger": False}) for plan in kinds.values()]
    print(f"{'model':<28}{'method':<7}{'r':>4}{'mb':>4}{'seq':>6}{'ckpt':>6}{'predicted':>11}{'measured':>10}"
          f"{'error':>8}")
    results = []
    for name, overrides, plan in rows:
        config = {**load_reference_config(name), **overrides}
        plan = {"dtype": "bf16" if device == "cuda" else "fp32", "device": device, "dropout": 0.05, **plan}
        # the loss path training takes: fused unless DPO or virtual tokens (what select() plans)
        plan.setdefault("fused_cross_entropy", get_method(plan["method"]).can_pack
                        and not config.get("final_logit_softcapping"))
        predicted = estimate(config, plan)
        started = time.perf_counter()
        measured = in_child({"kind": "estimate", "config": config, "plan": plan, "device": device,
                             "steps": 2 if args.quick else 3})
        row = {"model": name, "overrides": overrides, "plan": plan, "predicted": predicted, **measured,
               "seconds": round(time.perf_counter() - started, 1)}
        results.append(row)
        print_estimate_row(row)
    summarise_errors(results)
    return results


def print_estimate_row(row: dict):
    plan = row["plan"]
    label = row["model"] + (f" ({row['overrides']['num_hidden_layers']}L)" if row["overrides"] else "")
    head = f"{label:<28}{plan['method']:<7}{plan['rank']:>4}{plan['micro_batch']:>4}{plan['max_seq_len']:>6}" \
           f"{'on' if plan.get('gradient_checkpointing') else 'off':>6}{row['predicted']['total_bytes'] / GB:>10.2f}G"
    if "measured_bytes" not in row:
        ran = f"ran at {row['tokens_per_second']:.0f} tokens/s, no GPU to measure" if "tokens_per_second" in row \
            else row.get("failure", "not measured")
        print(f"{head}  {'OOM' if row.get('oom') else ran}", flush=True)
        return
    error = row["predicted"]["total_bytes"] / row["measured_bytes"] - 1
    row["relative_error"] = error
    print(f"{head}{row['measured_bytes'] / GB:>9.2f}G{error:>+8.1%}{'  OOM' if row['oom'] else ''}", flush=True)


def summarise_errors(results: list[dict]):
    measured = [r for r in results if "relative_error" in r and not r.get("oom")]
    errors = [abs(r["relative_error"]) for r in measured]
    if not errors:
        print("no measured rows")
        return
    print(f"absolute error: median {statistics.median(errors):.1%}, max {max(errors):.1%} over {len(errors)} rows;"
          f" under-predictions (risk of OOM): {sum(1 for r in measured if r['relative_error'] < 0)}")
    scales = [dynamic_scale(r) for r in measured]
    scales = [s for s in scales if s is not None]
    if scales:
        print(f"calibration hint: activations+logits x{statistics.median(scales):.2f} (median), "
              f"x{max(scales):.2f} (max) would match the measurements")


def dynamic_scale(row: dict) -> float | None:
    """The factor on activations + logits that makes this row's prediction exact."""
    parts = row["predicted"]["breakdown"]
    dynamic = parts["activations"] + parts["logits"]
    static = row["predicted"]["total_bytes"] - dynamic - parts["allocator_headroom"]
    return (row["measured_bytes"] - static) / dynamic if dynamic else None


# ------------------------------------------------------------------------ section: select under capped memory


def select_section(args, device: str) -> list[dict]:
    config = load_reference_config(args.model) if not args.cpu_smoke else {**load_reference_config(args.model), **TINY}
    gpu_name = gpu_description(device)
    caps = CAPS_GB if not args.cpu_smoke else (1,)
    results = []
    for cap in caps:
        inventory = {"gpus": [{"index": 0, "name": f"{gpu_name} capped at {cap} GB", "total_bytes": cap * GB,
                               "free_bytes": cap * GB, "compute_capability": "9.0", "bf16": device == "cuda"}],
                     "cpu": {"cores": 1, "ram_total_bytes": 0, "ram_available_bytes": 0}}
        plan = select(inventory, config, SELECT_STATS, {"method": "auto"})
        if device != "cuda":
            plan = {**plan, "device": "cpu", "dtype": "fp32", "method": "lora", "max_seq_len": 64, "optimizer": "adamw"}
        sweep = sweep_for(plan, args.quick)
        started = time.perf_counter()
        outcome = in_child({"kind": "select", "config": config, "plan": plan, "sweep": sweep, "device": device,
                            "cap_bytes": cap * GB, "steps": 3 if args.quick else 4})
        row = {"cap_gb": cap, "plan": plan, **outcome, "seconds": round(time.perf_counter() - started, 1)}
        results.append(row)
        print_select_row(row)
    ooms = sum(1 for r in results for run in r.get("runs", [])[:1] if run["oom"])
    print(f"selected plans that ran out of memory: {ooms} of {len(results)}")
    return results


def sweep_for(plan: dict, quick: bool) -> list:
    """Micro-batch / checkpointing alternatives around the plan's choice, at the plan's sequence length."""
    chosen = (plan["micro_batch"], plan["gradient_checkpointing"])
    sizes = (1, 4, 16) if quick else (1, 2, 4, 8, 16)
    return [(size, ckpt) for ckpt in (False, True) for size in sizes if (size, ckpt) != chosen]


def print_select_row(row: dict):
    plan = row["plan"]
    head = f"cap {row['cap_gb']:>3} GB: {plan['method']} mb {plan['micro_batch']} x{plan['grad_accum']} seq " \
           f"{plan['max_seq_len']} ckpt {'on' if plan['gradient_checkpointing'] else 'off'}, predicted " \
           f"{plan['memory']['total_bytes'] / GB:.1f} GB of {plan['memory']['capacity_bytes'] / GB:.1f}"
    if "runs" not in row:
        print(f"{head}: {row.get('failure')}", flush=True)
        return
    chosen, alternatives = row["runs"][0], row["runs"][1:]
    if chosen["oom"]:
        print(f"{head}: OOM", flush=True)
    else:
        print(f"{head}: measured {chosen.get('measured_bytes', 0) / GB:.1f} GB, "
              f"{chosen['tokens_per_second']:.0f} tokens/s", flush=True)
    ran = [a for a in alternatives if not a["oom"]]
    for alt in alternatives:
        status = "OOM" if alt["oom"] else f"{alt['tokens_per_second']:.0f} tokens/s"
        print(f"    mb {alt['micro_batch']:>2} ckpt {'on ' if alt['gradient_checkpointing'] else 'off'}: {status}")
    if ran and not chosen["oom"]:
        best = max(ran, key=lambda a: a["tokens_per_second"])
        print(f"    plan / fastest alternative that fit (mb {best['micro_batch']}, ckpt "
              f"{'on' if best['gradient_checkpointing'] else 'off'}): "
              f"{chosen['tokens_per_second'] / best['tokens_per_second']:.2f}", flush=True)


def gpu_description(device: str) -> str:
    if device != "cuda":
        return "CPU"
    import torch

    return torch.cuda.get_device_name(0)


# ------------------------------------------------------------------------ main

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2}


def _has(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main():
    args = parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    if not args.cpu_smoke and not cuda_available():
        print("needs CUDA: no CUDA GPU here (this benchmark measures GPU memory); nothing to do.")
        return 0
    device = "cpu" if args.cpu_smoke else "cuda"
    results = {}
    if args.section in ("estimate", "both"):
        results["estimate"] = estimate_section(args, device)
    if args.section in ("select", "both"):
        results["select"] = select_section(args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training speed: the platform's own training path against a plain transformers + peft loop, in one run.

    .venv/bin/python bench/train_speed.py                              # CPU: SmolLM2-135M-Instruct, LoRA
    .venv/bin/python bench/train_speed.py --shapes llama-1b,llama-8b,qwen2.5-1.5b --methods lora,qlora \
        --seq 2048 --micro-batch 4                                      # on a GPU
    .venv/bin/python bench/train_speed.py --lengths full               # every row exactly --seq tokens
    .venv/bin/python bench/train_speed.py --world-size 2 --rounds 3    # 2 ranks against 1 process (issue 36)

Every side trains the same model shape on the same tokenised rows, in the same micro-batch size, for the same
number of optimizer steps, with the same gradient checkpointing (--checkpointing, off by default); each side runs
in its own subprocess (so peak memory is its own). The sides run --rounds times (at least 5) in ABBA order (one
round forwards, the next backwards), so drift on the machine hits every side alike; min/median/max are printed.

  platform        finetune.train.train(): the path a Tunedeck job runs (loading, wrapping, fit check, the loop),
                  timed from its first to its last optimizer step by the progress callback. Loss only where there
                  are labels, chunk by chunk (no vocabulary-wide logits); batches grouped by length; on a
                  CPU, LoRA's dropout masks drawn from 16 random bits per element (finetune/cpudropout.py:
                  the same Bernoulli masks as torch's, p rounded to 1/65536, a fifth of the cost).
  plain-grouped   AutoModelForCausalLM + peft.get_peft_model + torch AdamW, loss from model(..., labels=...),
                  batches grouped by length exactly as the platform groups them (finetune.train.batch_order).
  plain-shuffled  The same in random order, each batch padded to its longest row.
  plain-fp32      CPU only, when the plan trains in bf16: the grouped loop in fp32, a plain loop's default on a CPU
                  (its own row: it shows what the measured dtype choice is worth, not the training path).
  peft-recipe     QLoRA only: peft's documented recipe, prepare_model_for_kbit_training (fp32 upcast of the
                  non-quantised weights) with gradient checkpointing, grouped batches: its own row, since it
                  changes both precision and checkpointing.
QLoRA's plain sides load NF4 with bf16 compute and no upcast, like the platform.

Dtype: --dtype auto (default) is what the planner picks for this device from the worker's own bf16 vs fp32 matmul
measurement (autotune/precision.py, autotune.select.choose_dtype): bf16 on a GPU, and on a CPU whose bf16 matmuls
are measurably faster (AVX512-BF16, AMX); every side but plain-fp32 then trains in that dtype.

Rows: --lengths mixed (chat rows of 10-100% of --seq, prompt 30-70%) and full (every row --seq tokens); both by
default. Tokens are non-padding tokens. Peak memory: CUDA max allocated, CPU peak RSS of the subprocess. MFU =
tokens/s x model FLOPs per token / --peak-tflops, FLOPs per token counted for a frozen base: 4 x frozen linear
parameters (forward 2N, backward only the activation gradients 2N, no weight gradients), 6 x adapter parameters,
and attention's 12 x layers x hidden x mean row length (no causal halving); checkpointing's recomputation is not
counted (it is overhead, not model work). Shapes other than SmolLM2 are random-initialised from their published configs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.methods import get_method  # after the path above; pure Python, no torch

# Published configurations (hidden, layers, heads, kv heads, intermediate, vocab), random-initialised here.
SHAPES = {
    "llama-1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0),
    "llama-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                     rope_theta=500000.0),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                         tie_word_embeddings=True),
}
H100_BF16_TFLOPS = 989.0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2", help="comma-separated: smollm2, a model folder, " + ", ".join(SHAPES))
    p.add_argument("--methods", default="lora", help="comma-separated: lora, qlora")
    p.add_argument("--seq", type=int, default=None, help="max sequence length (default: 512 on CPU, 2048 on GPU)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--rounds", type=int, default=5, help="ABBA rounds over all sides (at least 5)")
    p.add_argument("--lengths", default="mixed,full",
                   help="mixed: chat rows of 10-100%% of --seq with a prompt of 30-70%% (realistic); full: all --seq")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="every side's dtype (auto: the planner's choice from this device's matmul measurement)")
    p.add_argument("--checkpointing", choices=["on", "off"], default="off",
                   help="gradient checkpointing, the same on every side")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: H100 bf16 dense on CUDA)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--world-size", type=int, default=1,
                   help="N > 1: tokens/s on N ranks (torchrun; gloo processes on a CPU, GPUs with NCCL) against one "
                        "process at the same global batch, and the scaling efficiency (bench/rank_scaling.py)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one side and print JSON
    p.add_argument("--job", help=argparse.SUPPRESS)
    return p.parse_args()


# ------------------------------------------------------------------------------------------ inputs


def smollm2_folder() -> Path:
    folder = Path(os.environ.get("TUNEDECK_SMOLLM_DIR", ROOT / "var" / "test-models" / "SmolLM2-135M-Instruct"))
    if not (folder / "model.safetensors").exists():
        from finetune.modelstore import import_default_model

        import_default_model(folder)
    return folder


def random_model_folder(name: str, work: Path) -> Path:
    """A random-initialised model of a published shape, saved with SmolLM2's tokenizer (ids fit any vocab)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = work / name
    if (folder / "config.json").exists():
        return folder
    spec = dict(SHAPES[name])
    config = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=8192, **spec)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    tokenizer.save_pretrained(folder)
    return folder


def synthetic_chat(path: Path, tokenizer, seq: int, rows: int, lengths: str, seed: int = 0):
    """Chat rows whose rendered length is known in tokens: filler words are one token each in SmolLM2's BPE."""
    rng = random.Random(seed)
    words = [w for w in ("the cat sat on a mat and then it ran to see if all was well with its old red hat "
                         "near one big tree by our home").split()]
    overhead = len(tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=True)) + 2
    with open(path, "w") as out:
        for _ in range(rows):
            total = seq if lengths == "full" else rng.randint(seq // 10, seq)
            body = max(4, total - overhead)
            prompt_share = 0.5 if lengths == "full" else rng.uniform(0.3, 0.7)
            n_prompt = max(1, int(body * prompt_share))
            prompt = " ".join(rng.choice(words) for _ in range(n_prompt))
            answer = " ".join(rng.choice(words) for _ in range(body - n_prompt))
            out.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": answer}]}) + "\n")


# ------------------------------------------------------------------------------------------ measuring


def peak_memory(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


FLOPS_COUNTING = ("model FLOPs per token for a frozen base: 4 x frozen linear parameters (forward 2N + "
                  "activation gradients 2N, no weight gradients) + 6 x adapter parameters + 12 x layers x hidden x "
                  "mean row length (attention); recomputation not counted")


def flops_per_token(config, mean_len: float, rank: int = 16) -> float:
    """See FLOPS_COUNTING. The output layer counts as a frozen linear layer (the loss needs its input gradient)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    inter = config.intermediate_size
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or h // heads
    shapes = [(h, heads * head_dim), (h, kv * head_dim), (h, kv * head_dim), (heads * head_dim, h),
              (h, inter), (h, inter), (inter, h)]
    frozen = layers * sum(i * o for i, o in shapes) + h * config.vocab_size
    adapter = layers * sum(rank * (i + o) for i, o in shapes)
    return 4 * frozen + 6 * adapter + 12 * layers * h * mean_len


def run_platform(job: dict) -> dict:
    import torch

    from finetune.train import TrainSpec, train

    times, tokens = [], []
    spec = TrainSpec(
        base_model_path=job["model"], train_file=job["data"], output_dir=job["out"],
        method=job["method"], rank=16, alpha=32.0, dropout=0.05, target_modules="all-linear",
        micro_batch=job["micro_batch"], grad_accum=1, max_seq_len=job["seq"],
        max_steps=job["warmup"] + job["steps"], warmup_ratio=0.0, max_eval_generations=0,
        gradient_checkpointing=job["platform_checkpointing"], checkpoint_every_minutes=1e9, dtype=job["dtype"],
    )
    seen = [0]

    def on_progress(info):
        if "tokens_per_second" not in info:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        tokens.append(info["tokens_seen"] if "tokens_seen" in info else None)

    def on_event(kind, message, data):
        if kind in ("fit_check", "oom_recovered"):
            seen.append(f"{kind}: {message}")

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(spec, on_progress=on_progress, on_event=on_event)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timed_tokens = sum(t for t in tokens[job["warmup"]:] if t) if tokens and tokens[0] is not None else None
    return {
        "times": times, "step_tokens": tokens, "total_seconds": time.perf_counter() - start,
        "peak_bytes": peak_memory(device), "plan": result.plan, "notes": seen[1:],
        "timed_tokens": timed_tokens,
    }


def run_plain(job: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from finetune.data import iter_examples
    from finetune.tokenize import encode_example

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[job["dtype"]]
    kwargs = dict(dtype=dtype, device_map={"": device})
    if get_method(job["method"]).quantized_base:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(job["model"], **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.config.use_cache = False
    if job.get("peft_recipe"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    elif job["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    rows = [encode_example(ex, tokenizer, job["seq"]) for ex in iter_examples(job["data"])]
    if job.get("order") == "shuffled":
        random.Random(0).shuffle(rows)
        batches = [rows[i:i + job["micro_batch"]] for i in range(0, len(rows), job["micro_batch"])]
    else:  # the platform's own length grouping, same seed
        from finetune.train import batch_order

        lengths = [len(r.input_ids) for r in rows]
        batches = [[rows[i] for i in b] for b in batch_order(len(rows), job["micro_batch"], 42, 0, lengths)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, step_tokens = [], []
    for step in range(job["warmup"] + job["steps"]):
        batch = batches[step % len(batches)]
        width = max(len(r.input_ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
            labels[i, : len(r.labels)] = torch.tensor(r.labels)
            mask[i, : len(r.input_ids)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        step_tokens.append(int(mask.sum()))
    return {"times": times, "step_tokens": step_tokens, "peak_bytes": peak_memory(device)}


def tokens_per_second(result: dict, warmup: int) -> float:
    times, toks = result["times"], result["step_tokens"]
    timed = toks[warmup:]
    return sum(timed[1:]) / (times[-1] - times[warmup]) if len(timed) > 1 else float("nan")


# ------------------------------------------------------------------------------------------ driver


def run_side(side: str, job: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    proc = subprocess.run([sys.executable, __file__, "--worker", side, "--job", f.name],
                          capture_output=True, text=True)
    os.unlink(f.name)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main():
    args = parse_args()
    if args.worker:
        job = json.loads(Path(args.job).read_text())
        result = run_platform(job) if args.worker == "platform" else run_plain(job)
        if args.worker == "platform":
            # The platform reports tokens per step only as a window rate; count them from its own encoder instead.
            result["step_tokens"] = platform_step_tokens(job, len(result["times"]))
        print(json.dumps(result, default=str))
        return

    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    cuda = torch.cuda.is_available()
    args.cuda, args.planned_dtype = cuda, planned_dtype(args.dtype, cuda)
    seq = args.seq or (2048 if cuda else 512)
    peak = args.peak_tflops or (H100_BF16_TFLOPS if cuda else None)
    device_name = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} threads)"
    print(f"device: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {__import__('peft').__version__}; seq {seq}, micro-batch {args.micro_batch}, "
          f"{args.warmup}+{args.steps} steps, lengths {args.lengths}, {args.rounds} rounds, "
          f"{args.planned_dtype}{' (the planner' + chr(39) + 's choice here)' if args.dtype == 'auto' else ''}")
    if args.world_size > 1:
        return scaling(args, seq, cuda)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for shape in args.shapes.split(","):
            folder = smollm2_folder() if shape == "smollm2" else (
                Path(shape) if Path(shape).is_dir() else random_model_folder(shape, work))
            tokenizer = AutoTokenizer.from_pretrained(folder)
            config = AutoConfig.from_pretrained(folder)
            for lengths in args.lengths.split(","):
                data = work / f"{Path(str(folder)).name}-{lengths}.jsonl"
                n_rows = args.micro_batch * (args.warmup + args.steps) * 2
                synthetic_chat(data, tokenizer, seq, n_rows, lengths)
                for method in args.methods.split(","):
                    row = measure_row(args, shape, str(folder), str(data), work, config, method, seq, lengths, peak)
                    rows.append(row)
                    print_row(row)
                    if args.json:  # after every row: a run cut off at its time budget keeps what it measured
                        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"MFU counting: {FLOPS_COUNTING}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def sides_for(method: str, dtype: str, cuda: bool) -> list[str]:
    recipe = ["peft-recipe"] if get_method(method).quantized_base else []
    fp32 = ["plain-fp32"] if dtype != "fp32" and not cuda else []
    return ["platform", "plain-grouped", "plain-shuffled"] + recipe + fp32


def planned_dtype(requested: str, cuda: bool) -> str:
    """--dtype, or for auto the dtype the planner picks for this device from a worker's matmul measurement."""
    if requested != "auto":
        return requested
    from autotune import probe
    from autotune.precision import matmul_speed
    from autotune.select import Notes, choose_dtype, choose_target

    inventory = probe()
    inventory["matmul_speed"] = matmul_speed(ROOT / "var" / "bench")
    if not cuda:
        inventory["gpus"] = []
    notes = Notes()
    return choose_dtype(choose_target(inventory, {}, {}, notes), {}, notes)


def scaling(args, seq: int, cuda: bool) -> None:
    """--world-size N: the first --shapes entry, LoRA, N ranks against one process (bench/rank_scaling.py)."""
    from rank_scaling import measure, print_scaling
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shape = args.shapes.split(",")[0]
        folder = smollm2_folder() if shape == "smollm2" else (
            Path(shape) if Path(shape).is_dir() else random_model_folder(shape, work))
        data = work / "scaling.jsonl"
        synthetic_chat(data, AutoTokenizer.from_pretrained(folder), seq,
                       args.micro_batch * args.world_size * (args.warmup + args.steps) * 2, args.lengths.split(",")[0])
        row = measure(str(folder), str(data), seq, args.micro_batch, args.steps, args.warmup, args.world_size,
                      args.rounds, args.planned_dtype, cuda)
    print_scaling(row, cuda)
    if args.json:
        Path(args.json).write_text(json.dumps([row], indent=2))


def measure_row(args, shape, folder, data, work, config, method, seq, lengths, peak) -> dict:
    """Every side, --rounds times in ABBA order; min/median/max tokens/s per side and the platform's ratios."""
    checkpointing = args.checkpointing == "on"
    rounds = max(5, args.rounds)
    job = {"model": folder, "data": data, "out": str(work / "adapter"), "method": method, "seq": seq,
           "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup,
           "checkpointing": checkpointing, "platform_checkpointing": checkpointing, "dtype": args.planned_dtype}
    sides = sides_for(method, args.planned_dtype, args.cuda)
    results = {side: [] for side in sides}
    for round_index in range(rounds):
        for side in sides if round_index % 2 == 0 else sides[::-1]:
            side_job = {**job, "order": "shuffled" if side == "plain-shuffled" else "grouped",
                        "peft_recipe": side == "peft-recipe", "dtype": "fp32" if side == "plain-fp32" else job["dtype"]}
            results[side].append(run_side("platform" if side == "platform" else "plain", side_job))
    row = {"shape": shape, "method": method, "seq": seq, "lengths": lengths, "micro_batch": args.micro_batch,
           "dtype": args.planned_dtype,
           "checkpointing": checkpointing, "rounds": rounds, "sides": {}, "flops_counting": FLOPS_COUNTING}
    for side in sides:
        speeds = sorted(tokens_per_second(r, args.warmup) for r in results[side])
        tokens = [t for r in results[side] for t in r["step_tokens"][args.warmup:]]
        mean_len = statistics.mean(tokens) / args.micro_batch if tokens else seq
        median = statistics.median(speeds)
        row["sides"][side] = {
            "tokens_per_second": {"min": speeds[0], "median": median, "max": speeds[-1]},
            "peak_gib": max(r["peak_bytes"] for r in results[side]) / 2**30,
            "mean_row_tokens": mean_len,
            "mfu": median * flops_per_token(config, mean_len) / (peak * 1e12) if peak else None,
        }
    platform = row["sides"]["platform"]
    row["speedup"] = {side: platform["tokens_per_second"]["median"] / v["tokens_per_second"]["median"]
                      for side, v in row["sides"].items() if side != "platform"}
    row["memory_ratio"] = {side: platform["peak_gib"] / v["peak_gib"]
                           for side, v in row["sides"].items() if side != "platform"}
    row["platform_notes"] = results["platform"][-1].get("notes", [])
    return row


def platform_step_tokens(job: dict, steps: int) -> list[int]:
    """Non-padding tokens per optimizer step in the platform's own batch order (same encoder, same seed)."""
    from transformers import AutoTokenizer

    from finetune.train import TrainSpec, batch_order, load_encoded

    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    spec = TrainSpec(base_model_path=job["model"], train_file=job["data"], output_dir=job["out"],
                     method=job["method"], micro_batch=job["micro_batch"], max_seq_len=job["seq"])
    rows, _ = load_encoded(job["data"], tokenizer, spec)
    lengths = [len(r["input_ids"]) for r in rows]
    order, out, epoch = batch_order(len(rows), spec.micro_batch, spec.seed, 0, lengths), [], 0
    index = 0
    for _ in range(steps):
        if index >= len(order):
            epoch, index = epoch + 1, 0
            order = batch_order(len(rows), spec.micro_batch, spec.seed, epoch, lengths)
        out.append(sum(lengths[i] for i in order[index]))
        index += 1
    return out


def print_row(row):
    print(f"{row['shape']} {row['method']} {row['dtype']} seq {row['seq']} {row['lengths']} rows, mb {row['micro_batch']}, "
          f"checkpointing {'on' if row['checkpointing'] else 'off'} on every side, {row['rounds']} ABBA rounds:")
    for side, s in row["sides"].items():
        speed = s["tokens_per_second"]
        mfu = f", MFU {s['mfu']:.1%}" if s["mfu"] is not None else ""
        ratio = "" if side == "platform" else \
            f" | platform x{row['speedup'][side]:.2f} speed, x{row['memory_ratio'][side]:.2f} memory"
        print(f"  {side:<15} {speed['median']:>9,.0f} tok/s (min {speed['min']:,.0f}, max {speed['max']:,.0f}), "
              f"peak {s['peak_gib']:.2f} GiB{mfu}{ratio}", flush=True)
    for note in row.get("platform_notes", []):
        print(f"  platform: {note}")


if __name__ == "__main__":
    main()

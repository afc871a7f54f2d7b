"""Scaling across ranks (bench/train_speed.py --world-size N): one training run on N ranks against one process,
in the same run, at the same global batch.

Both sides go through finetune.distributed_launch.train_on_ranks (torchrun), so start-up costs are alike:
  one process    1 rank with N threads, grad_accum = N x the per-rank accumulation;
  N ranks        N ranks with 1 thread each (gloo on a CPU, NCCL on GPUs), each its share of the step.
Tokens/s is the run's own training-only rate after its warm-up steps, from rank 0's cumulative
`train_tokens_per_second` (the global steps' tokens over the optimizer steps' time, evaluations left out) read at
the last warm-up step w and the last step n: (n - w) / (n / r_n - w / r_w), exact when the steps carry equal
tokens, and the same approximation on both sides (they train the same batches). Efficiency = N-rank tokens/s / one-process
tokens/s on a CPU (the same cores either way), and / (N x one GPU) on GPUs. Sides alternate ABBA over --rounds.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

# Stated as expected, not measured here: a LoRA run's all-reduce carries only the adapter's gradients (tens of
# MB for an 8B model at rank 16), overlapped with nothing but small next to a step's compute.
EXPECTED_GPU = ("expected on GPUs (not measured here): 0.90-0.97 per GPU for LoRA DDP on NVLink/NVSwitch (only "
                "the adapter's gradients are all-reduced), lower over PCIe or across hosts; FSDP sharding of the "
                "base adds an all-gather of every layer per forward and backward, expect 0.6-0.85.")


def run_side(folder: str, data: str, seq: int, micro_batch: int, steps: int, warmup: int, ranks: int,
             threads: int, grad_accum: int, dtype: str) -> float:
    from finetune.distributed_launch import train_on_ranks
    from finetune.train import TrainSpec

    rates = {}
    with tempfile.TemporaryDirectory() as work:
        spec = TrainSpec(base_model_path=folder, train_file=data, output_dir=str(Path(work) / "adapter"),
                         method="lora", rank=16, alpha=32.0, dropout=0.0, micro_batch=micro_batch,
                         grad_accum=grad_accum, max_seq_len=seq,
                         max_steps=warmup + steps, warmup_ratio=0.0, max_eval_generations=0, early_stopping_patience=0,
                         checkpoint_every_minutes=1e9, dtype=dtype, device="auto")
        train_on_ranks(spec, ranks, on_progress=lambda info: rates.update({info.get("step"): info.get(
            "train_tokens_per_second")}), run_dir=Path(work) / "ranks", threads_per_rank=threads)
    last = warmup + steps
    if not warmup:
        return float(rates[last])
    return steps / (last / rates[last] - warmup / rates[warmup])


def measure(folder: str, data: str, seq: int, micro_batch: int, steps: int, warmup: int, world: int,
            rounds: int, dtype: str, cuda: bool) -> dict:
    one, many = [], []
    for round_index in range(rounds):
        order = ("one", "many") if round_index % 2 == 0 else ("many", "one")
        for side in order:
            if side == "one":
                # the same global batch: the one process accumulates what the ranks train side by side
                one.append(run_side(folder, data, seq, micro_batch, steps, warmup, 1, 1 if cuda else world, world,
                                    dtype))
            else:
                many.append(run_side(folder, data, seq, micro_batch, steps, warmup, world, 1, 1, dtype))
    single, multi = statistics.median(one), statistics.median(many)
    ideal = world * single if cuda else single
    return {"world_size": world, "one_process_tokens_per_second": single, "ranks_tokens_per_second": multi,
            "scaling_efficiency": multi / ideal, "rounds": rounds, "one": one, "many": many,
            "expected_gpu": EXPECTED_GPU}


def print_scaling(row: dict, cuda: bool) -> None:
    world = row["world_size"]
    one = "1 GPU" if cuda else f"1 process x {world} threads"
    many = f"{world} GPUs (NCCL)" if cuda else f"{world} gloo processes x 1 thread"
    print(f"{one}: {row['one_process_tokens_per_second']:,.0f} tokens/s (median of {row['rounds']})")
    print(f"{many}: {row['ranks_tokens_per_second']:,.0f} tokens/s")
    basis = f"{world} x one GPU" if cuda else "one process on the same cores"
    print(f"scaling efficiency: {row['scaling_efficiency']:.2f} (against {basis})")
    print(row["expected_gpu"])
    if not cuda and hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores while measuring: a process "
              "of several threads slows down far more than one-thread processes when the cores are shared.")

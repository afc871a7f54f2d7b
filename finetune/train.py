"""The training loop: one plain function that turns a plan, a base model and a dataset into an adapter folder.

A hand-written loop (not transformers.Trainer) because the platform needs things Trainer hides: a callback on
every optimizer step, cancellation between micro-batches, exact resume from the newest checkpoint, and recovery
from CUDA out-of-memory by halving the micro-batch without changing the effective batch.

This file is the loop, read top to bottom: train() retries an attempt after an out-of-memory error or a replan;
_train_once() sets up, steps until done, cancelled or stopped early, and finishes. What it calls lives by concern:

    trainspec.py        TrainSpec (what to train, from a plan) and TrainResult
    batching.py         encode the rows, pack them, order them by length, collate a micro-batch
    trainable_model.py  load the base model and wrap it for the method
    losses.py           the preference losses (DPO, KTO; a method's `loss` hook picks); the token loss is fastloss.py's
    validation.py       the validation loss and a few greedy samples
    fitcheck.py         the fit check before the first step, and shrinking the plan after out-of-memory
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint as ckpt
from . import fastloss
from .batching import (
    batch_order,
    collate,
    length_window_batches,
    load_encoded,
    pack,
    pack_if_planned,
    packed_positions,
    packing_isolates_examples,
)
from .distributed import Ranks, gather_whole, is_sharded, prepare_model, shard_again
from .errors import OutOfMemory, TrainingError
from .fastloss import token_loss_sum
from .fitcheck import (
    Replan,
    act_on_fit_check,
    fit_check,
    is_oom,
    measure_step_peak,
    release_memory,
    shrink_after_oom,
    worst_case_batch,
)
from .learning_guard import LearningGuard
from .losses import dpo_loss, kto_loss
from .methods import get_method, save_adapter
from .optim import build_optimizer
from .tokenize import IGNORE
from .trainable_model import (
    apply_fused_kernels,
    base_of,
    count_parameters,
    device_of,
    grad_scaler,
    load_for_training,
)
from .trainspec import TrainResult, TrainSpec, spec_dict
from .validation import (
    MAX_STOPPING_PROMPTS,
    answer_exact_match,
    evaluate,
    generate_samples,
    reference_prompts,
    stopping_metric,
)

# What callers (jobs, the search, the benches, tests) import from here; most of it lives in the modules above.
__all__ = [
    "TrainResult", "TrainSpec", "apply_fused_kernels", "batch_order", "collate", "dpo_loss", "evaluate",
    "generate_samples", "kto_loss", "length_window_batches", "load_encoded", "load_for_training",
    "measure_step_peak", "pack", "packed_positions", "packing_isolates_examples", "spec_dict",
    "token_loss_sum", "train", "worst_case_batch",
]


# ------------------------------------------------------------------------------------------ the loop


def _noop(*args, **kwargs):
    return None


def train(
    spec: TrainSpec,
    on_progress: Callable[[dict], None] | None = None,
    on_event: Callable[[str, str, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Trains spec.method on spec.train_file and saves the adapter to spec.output_dir. See docs/internals.md."""
    on_progress = on_progress or _noop
    on_event = on_event or _noop
    should_stop = should_stop or (lambda: False)
    spec.validate()
    oom_recoveries = 0
    while True:
        try:
            return _train_once(spec, on_progress, on_event, should_stop, oom_recoveries)
        except OutOfMemory:
            raise
        except Replan:
            release_memory()
            continue
        except Exception as exc:
            if not is_oom(exc):
                raise
            ranks = Ranks.current()
            if ranks.distributed:  # the other ranks wait in a collective: no retry on one rank alone
                raise OutOfMemory(f"Rank {ranks.rank} ran out of GPU memory at micro-batch {spec.micro_batch}. "
                                  "Use fewer tokens per micro-batch, QLoRA or sharding (FSDP).") from None
            release_memory()
            change = shrink_after_oom(spec)
            if change is None:
                raise OutOfMemory(
                    "Out of GPU memory even with micro-batch 1 and gradient checkpointing at "
                    f"max_seq_len {spec.max_seq_len}. Use QLoRA, a smaller max_seq_len or a bigger GPU."
                ) from None
            oom_recoveries += 1
            on_event("oom_recovered", f"Ran out of GPU memory; retrying with {change}.", spec.as_plan())


@dataclass
class RunClock:
    """What the loop keeps between steps besides the checkpointed state (Run.state): timings, the train loss, the
    latest and the best evaluation. Started when the first step is (after the evaluation before training)."""
    started: float = field(default_factory=time.monotonic)
    last_checkpoint: float = field(default_factory=time.monotonic)
    step_seconds: float = 0.0  # the optimizer steps alone, evaluations left out
    window_tokens: int = 0  # tokens trained since started
    loss_ema: float | None = None
    last_loss: float | None = None
    last_eval: dict = field(default_factory=dict)
    best: dict | None = None  # {"step", "eval", "evals_since", "weights"} at the best evaluation (track_best)
    stopped_early: bool = False


@dataclass
class Run:
    """Everything one training attempt holds between its steps. Built by setup_run, read by the rest."""
    spec: TrainSpec
    model: object
    tokenizer: object
    device: object
    pad_id: int
    train_rows: list
    eval_rows: list
    data_stats: dict
    params: list
    optimizer: object
    scaler: object  # a GradScaler when the compute dtype is fp16 (its range needs loss scaling), else None
    total_steps: int
    warmup: int
    trainable: int
    total_params: int
    state: dict
    resumed: bool
    guard: LearningGuard
    lengths: list = field(default_factory=list)
    order: list = field(default_factory=list)
    ranks: Ranks = field(default_factory=Ranks)  # this process's place in a multi-rank run (finetune/distributed.py)
    # What early stopping and the best checkpoint follow (finetune/validation.py): "eval_loss", or "exact_match"
    # of greedy answers to stop_prompts (validation prompts with their reference answers).
    stop_metric: str = "eval_loss"
    stop_prompts: list = field(default_factory=list)


def _train_once(spec, on_progress, on_event, should_stop, oom_recoveries) -> TrainResult:
    """One attempt, read top to bottom: set up, measure the base, step until done or cancelled, then finish."""
    run = setup_run(spec, on_event)
    initial_eval = {} if run.resumed else evaluate_before_training(run, on_event, on_progress)
    clock = RunClock()
    while run.state["step"] < run.total_steps:
        step_start, began = dict(run.state), time.monotonic()
        outcome = optimizer_step(run, should_stop)
        clock.step_seconds += time.monotonic() - began
        if outcome is None:  # cancelled between micro-batches: the half-done step is thrown away
            run.state = step_start
            return finish_cancelled(run, on_event)
        report_step(run, outcome, clock, on_progress, on_event)
        if clock.stopped_early:
            break
    run.guard.check_finished(initial_eval, clock.best)
    return finish_run(run, clock, initial_eval, oom_recoveries, on_event)


# ------------------------------------------------------------------------------------------ setup


def setup_run(spec: TrainSpec, on_event) -> Run:
    import torch

    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    model, tokenizer = load_for_training(spec)
    device = device_of(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_rows, data_stats, eval_rows = _load_rows(spec, tokenizer)
    train_rows = pack_if_planned(spec, model, device, train_rows, on_event)
    on_event("phase", "Checking that the longest micro-batch fits.", {"phase": "checking_fit"})

    ranks = Ranks.current()
    prepare_model(model, spec.plan, ranks)
    batches_per_epoch = math.ceil(len(train_rows) / spec.micro_batch)
    # One optimizer step is grad_accum micro-batches on every rank: the global batch.
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / (spec.grad_accum * ranks.world_size)))
    total_steps = int(spec.max_steps or max(1, math.ceil(spec.epochs * steps_per_epoch)))
    trainable, total_params = count_parameters(model)
    named_params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named_params]
    optimizer = build_optimizer(params, {**spec.plan, "learning_rate": spec.learning_rate,
                                         "weight_decay": spec.weight_decay}, device)

    # Before any checkpoint is restored: the measurement clears the optimizer state it creates.
    act_on_fit_check(fit_check(model, spec, train_rows, optimizer, pad_id, device), spec, on_event)

    state = {"step": 0, "micro_index": 0, "epoch": 0, "tokens_seen": 0}
    resumed = ckpt.latest(spec.checkpoint_dir) if spec.checkpoint_dir else None
    if resumed:
        state = ckpt.restore(resumed, model, optimizer)
        on_event("resumed", f"Resumed from the checkpoint at step {state['step']}.", {"step": state["step"]})
    stop_metric, stop_prompts = _stopping(spec, model, eval_rows)
    watched = f"; early stopping watches the exact match of {len(stop_prompts)} validation answers" \
        if stop_metric == "exact_match" else ""
    on_event("started", f"Training {spec.method} on {len(train_rows)} examples for {total_steps} steps "
             f"({trainable:,} trainable parameters of {total_params:,}){watched}.",
             {"data": data_stats, "total_steps": total_steps, "trainable_parameters": trainable,
              "loss_path": fastloss.loss_path(model)})
    run = Run(spec=spec, model=model, tokenizer=tokenizer, device=device, pad_id=pad_id, train_rows=train_rows,
              eval_rows=eval_rows, data_stats=data_stats, params=params, optimizer=optimizer,
              scaler=grad_scaler(model, device), total_steps=total_steps,
              warmup=int(spec.warmup_ratio * total_steps), trainable=trainable, total_params=total_params,
              state=state, resumed=bool(resumed), guard=LearningGuard(named_params), ranks=ranks,
              stop_metric=stop_metric, stop_prompts=stop_prompts)
    run.lengths = [len(r["input_ids"]) if "input_ids" in r else len(r["chosen"]["input_ids"]) for r in train_rows]
    run.order = _epoch_order(run, state["epoch"])
    return run


def _load_rows(spec: TrainSpec, tokenizer):
    train_rows, data_stats = load_encoded(spec.train_file, tokenizer, spec)
    if not train_rows:
        raise TrainingError(
            "No training example has any token left to learn after tokenisation "
            f"(max_seq_len {spec.max_seq_len}): raise max_seq_len or check the answers are not empty."
        )
    eval_rows = []
    if spec.eval_file and Path(spec.eval_file).is_file():
        eval_rows, _ = load_encoded(spec.eval_file, tokenizer, spec, limit=spec.max_eval_examples)
    return train_rows, data_stats, eval_rows



def _stopping(spec: TrainSpec, model, eval_rows: list) -> tuple[str, list]:
    """(metric, prompts) early stopping and the kept checkpoint follow (the latter also with patience 0). A sharded
    model generates only with every rank stepping the same tokens, so it keeps the loss."""
    metric = stopping_metric(spec) if eval_rows else "eval_loss"
    if metric != "exact_match" or is_sharded(model):
        return "eval_loss", []
    return metric, reference_prompts(spec.eval_file, MAX_STOPPING_PROMPTS)


def _epoch_order(run: Run, epoch: int) -> list[list[int]]:
    spec = run.spec
    return batch_order(len(run.train_rows), spec.micro_batch, spec.seed, epoch, run.lengths,
                       spec.length_group_window, spec.length_group_min_windows)


def evaluate_before_training(run: Run, on_event, on_progress) -> dict:
    """The base model's own score on the held-out rows: the yardstick every later evaluation is read against."""
    if not run.eval_rows:
        return {}
    initial = evaluate_held_out(run)
    on_event("evaluated", f"Before training: {_eval_text(initial)}.", {"step": 0, **initial})
    on_progress({"step": 0, "total_steps": run.total_steps, **initial})
    return initial


# ------------------------------------------------------------------------------------------ one optimizer step


def _lr_at(step: int, total: int, warmup: int, peak: float, schedule: str = "cosine", floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _next_micro_batches(run: Run) -> list[list[dict]]:
    """This rank's grad_accum micro-batches of the next optimizer step, moving to a new epoch's order when one runs
    out. Every rank walks the same order through the step's grad_accum x world_size micro-batches."""
    micro = []
    for _ in range(run.spec.grad_accum * run.ranks.world_size):
        if run.state["micro_index"] >= len(run.order):
            run.state["epoch"] += 1
            run.state["micro_index"] = 0
            run.order = _epoch_order(run, run.state["epoch"])
        micro.append([run.train_rows[i] for i in run.order[run.state["micro_index"]]])
        run.state["micro_index"] += 1
    return run.ranks.my_share(micro)


def _loss_denominator(spec: TrainSpec, micro: list[list[dict]]) -> int:
    """What the step's summed loss is divided by: every learned token of the whole step (so a long example
    weighs by its tokens whichever micro-batch it falls in), or every pair for preference methods."""
    if get_method(spec.method).preference:
        return sum(len(b) for b in micro)
    return sum(sum(sum(1 for l in r["labels"][1:] if l != IGNORE) for r in b) for b in micro)


def _micro_batch_loss(run: Run, batch: list[dict]):
    """(summed loss, items it sums over, tokens in the batch, extra metrics) for one micro-batch."""
    method = get_method(run.spec.method)
    if method.preference:  # its own loss: DPO's, KTO's, ORPO's
        return method.loss(run.model, batch, run.spec, run.pad_id, run.device)
    ids, labels, mask = collate(batch, run.pad_id, run.device)
    positions = packed_positions(batch, ids.shape[1], run.device)
    loss, n = token_loss_sum(run.model, ids, labels, mask, positions)
    return loss, n, int(mask.sum()), {}


def optimizer_step(run: Run, should_stop) -> dict | None:
    """Accumulates the gradients of grad_accum micro-batches and takes one optimizer step. None when cancelled."""
    import torch

    run.optimizer.zero_grad(set_to_none=True)
    micro = _next_micro_batches(run)
    denominator = max(run.ranks.sum(_loss_denominator(run.spec, micro))[0], 1)  # the whole step's, every rank's
    loss_sum, items, tokens, info = 0.0, 0, 0, {}
    for batch in micro:
        if run.ranks.any(should_stop()):
            return None
        loss, n, batch_tokens, info = _micro_batch_loss(run, batch)
        scaled = loss / denominator
        (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        loss_sum += float(loss.detach())
        items += n
        tokens += batch_tokens
    run.ranks.sync_gradients(run.params)
    loss_sum, items, tokens = run.ranks.sum(loss_sum, items, tokens)
    tokens = int(tokens)
    if run.scaler:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    # clip the gradient, set this step's learning rate, step
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, run.spec.max_grad_norm or math.inf))
    lr = _lr_at(run.state["step"], run.total_steps, run.warmup, run.spec.learning_rate, run.spec.lr_schedule,
                run.spec.min_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.guard.after_step(grad_norm)
    run.state["step"] += 1
    run.state["tokens_seen"] += tokens
    return {"train_loss": loss_sum / max(items, 1), "grad_norm": grad_norm, "learning_rate": lr,
            "tokens": tokens, "info": info}


# ------------------------------------------------------------------------------------------ after a step


def report_step(run: Run, outcome: dict, clock: RunClock, on_progress, on_event) -> None:
    """Progress after a step, an evaluation when one is due, and a checkpoint when one is due (said first)."""
    state = run.state
    clock.window_tokens += outcome["tokens"]
    clock.last_loss = outcome["train_loss"]
    ema = clock.loss_ema
    clock.loss_ema = outcome["train_loss"] if ema is None else 0.9 * ema + 0.1 * outcome["train_loss"]
    elapsed = time.monotonic() - clock.started
    progress = {
        "step": state["step"], "total_steps": run.total_steps,
        "epoch": state["epoch"] + state["micro_index"] / max(1, len(run.order)),
        "train_loss": outcome["train_loss"], "learning_rate": outcome["learning_rate"],
        "grad_norm": outcome["grad_norm"],
        "tokens_per_second": clock.window_tokens / elapsed if elapsed > 0 else 0.0,
        # the optimizer steps alone, evaluations left out: what the search compares its trials' speed by
        "train_tokens_per_second": clock.window_tokens / max(clock.step_seconds, 1e-9),
        "eta_seconds": elapsed / state["step"] * (run.total_steps - state["step"]),
        "memory_bytes": _memory_bytes(run.device),
    }
    progress.update({k: v for k, v in outcome["info"].items() if isinstance(v, float)})
    if state["step"] % _eval_every(run) == 0 or state["step"] == run.total_steps:
        clock.last_eval = evaluate_held_out(run)
        progress.update(clock.last_eval)
        if clock.last_eval:
            on_event("evaluated", f"Step {state['step']}: {_eval_text(clock.last_eval)}.",
                     {"step": state["step"], **clock.last_eval})
            track_best(run, clock, on_event)
    checkpoint_due = run.ranks.any(_checkpoint_due(run, clock))  # the ranks agree (a sharded save needs all)
    # Said before the checkpoint exists, so a caller that batches progress can write it first: a worker killed
    # right after the save must not leave a checkpoint ahead of the recorded metrics.
    progress["checkpoint_due"] = checkpoint_due
    on_progress(progress)
    if checkpoint_due:
        _save_checkpoint(run, clock, on_event)


def _save_checkpoint(run: Run, clock: RunClock, on_event) -> None:
    """Rank 0 writes it (the ranks' weights are the same); a sharded (FSDP) model is gathered whole by all first."""
    gather_whole(run.model)
    if run.ranks.is_main:
        path = ckpt.save(run.spec.checkpoint_dir, run.model, run.optimizer, run.state, run.spec.as_plan())
        on_event("checkpoint", f"Checkpoint saved at step {run.state['step']}.", {"path": str(path), **run.state})
    shard_again(run.model)
    clock.last_checkpoint = time.monotonic()


def evaluate_held_out(run: Run) -> dict:
    """The validation scores: the loss (and what the method adds), and the exact match of greedy answers when
    early stopping watches it."""
    scores = _validation_loss(run)
    if scores and run.stop_metric == "exact_match":
        scores["val_exact_match"] = _validation_exact_match(run)
    return scores


def _eval_text(scores: dict) -> str:
    text = f"eval loss {scores['eval_loss']:.4f}"
    if "val_exact_match" in scores:
        text += f", validation exact match {scores['val_exact_match']:.3g}"
    return text


def _validation_exact_match(run: Run) -> float:
    """Exact match of greedy answers to the stopping prompts; data-parallel ranks answer a share each."""
    ranks, prompts = run.ranks, run.stop_prompts
    share = ranks.my_share(prompts) if ranks.distributed else prompts
    right = answer_exact_match(run.model, run.tokenizer, share, run.spec) * len(share) if share else 0.0
    right, asked = ranks.sum(right, len(share))
    return right / max(asked, 1)


def _validation_loss(run: Run) -> dict:
    """On several data-parallel ranks each evaluates its share of the rows and the scores are averaged by learned
    tokens (pairs for preference methods), so every rank holds the same numbers and early stopping stops them all
    at the same step. A sharded model's forward needs every rank: all evaluate all."""
    ranks, rows = run.ranks, run.eval_rows
    if not ranks.distributed or len(rows) < ranks.world_size or is_sharded(run.model):
        return evaluate(run.model, rows, run.spec, run.pad_id)
    share = ranks.my_share(rows)
    local = evaluate(run.model, share, run.spec, run.pad_id)
    weight = _loss_denominator(run.spec, [share])
    names = sorted(k for k, v in local.items() if k != "perplexity" and isinstance(v, float))
    sums = ranks.sum(weight, *(local[k] * weight for k in names))
    merged = {k: total / max(sums[0], 1) for k, total in zip(names, sums[1:])}
    if "perplexity" in local:
        merged["perplexity"] = math.exp(min(merged["eval_loss"], 50))
    return merged


EVAL_SHARE = 0.10  # validation may cost this share of the training compute (a forward pass ~ 1/3 of a step)


def _eval_every(run: Run) -> int:
    """Steps between evaluations: as given, else up to 8 per run when early stopping watches them (4 without),
    fewer when the validation rows are many against the rows trained: on 360 training rows and 40 validation
    rows, 8 evaluations plus the one before training were a third of the run's compute."""
    if run.spec.eval_every_steps:
        return run.spec.eval_every_steps
    per_run = 8 if run.spec.early_stopping_patience and run.eval_rows else 4
    if run.eval_rows:
        rows_trained = run.total_steps * run.spec.micro_batch * run.spec.grad_accum
        affordable = EVAL_SHARE * 3 * rows_trained / len(run.eval_rows) - 1  # - 1: the one before training
        per_run = max(2, min(per_run, int(affordable)))
    return max(1, math.ceil(run.total_steps / per_run))


def track_best(run: Run, clock: RunClock, on_event) -> None:
    """Keeps a copy of the trainable weights at the best evaluation so far, and sets clock.stopped_early once
    early_stopping_patience evaluations in a row brought no progress. Watching the loss: the lowest loss is best and
    progress. Watching exact match: most answers right is best, ties going to the lower loss, and progress is more
    answers right (a tie at a lower loss moves the kept checkpoint, not the stopping point: on a dozen validation
    rows the answers stop changing long before the loss stops creeping down), or a lower loss while none is right
    yet (the first passes on new labels). The copy lives in memory (adapter weights only); a run resumed from a
    checkpoint starts tracking afresh."""
    scores = clock.last_eval
    loss = scores.get("eval_loss")
    if loss is None or not math.isfinite(loss):
        return
    best = clock.best
    if best is None or _better(scores, best["eval"]):
        tie = best is not None and scores.get("val_exact_match") == best["eval"].get("val_exact_match") and \
            bool(scores.get("val_exact_match"))  # while no answer is right yet, the loss is the only progress
        clock.best = {"step": run.state["step"], "eval": dict(scores), "evals_since": best["evals_since"] + 1 if tie
                      else 0, "weights": [p.detach().to("cpu", copy=True) for p in run.params]}
    else:
        best["evals_since"] += 1
    best = clock.best
    patience = run.spec.early_stopping_patience
    if patience and best["evals_since"] >= patience and run.state["step"] < run.total_steps:
        clock.stopped_early = True
        watched = "more validation answers right" if "val_exact_match" in best["eval"] else "better validation loss"
        on_event("stopped_early", f"Stopped early at step {run.state['step']} of {run.total_steps}: no "
                 f"{watched} in {patience} evaluations; keeping step {best['step']} ({_eval_text(best['eval'])}).",
                 {"step": run.state["step"], "best_step": best["step"], "best_eval_loss": best["eval"]["eval_loss"],
                  "best_val_exact_match": best["eval"].get("val_exact_match")})


def _better(scores: dict, best: dict) -> bool:
    if "val_exact_match" in scores and scores["val_exact_match"] != best.get("val_exact_match"):
        return scores["val_exact_match"] > best.get("val_exact_match", -1.0)
    return scores["eval_loss"] < best["eval_loss"]


def restore_best(run: Run, clock: RunClock) -> None:
    """Puts the best evaluation's weights back into the model before it is saved (no-op when the last was best)."""
    import torch

    best = clock.best
    if not best or best["step"] == run.state["step"]:
        return
    with torch.no_grad():
        for p, kept in zip(run.params, best["weights"]):
            p.copy_(kept.to(p.device))


def _checkpoint_due(run: Run, clock: RunClock) -> bool:
    spec, step = run.spec, run.state["step"]
    due_by_steps = spec.checkpoint_every_steps and step % spec.checkpoint_every_steps == 0
    due_by_time = time.monotonic() - clock.last_checkpoint >= spec.checkpoint_every_minutes * 60
    return bool(spec.checkpoint_dir and step < run.total_steps and (due_by_steps or due_by_time))


# ------------------------------------------------------------------------------------------ finish


def finish_cancelled(run: Run, on_event) -> TrainResult:
    if run.spec.checkpoint_dir and run.state["step"] > 0 and run.ranks.is_main:
        ckpt.save(run.spec.checkpoint_dir, run.model, run.optimizer, run.state, run.spec.as_plan())
    on_event("cancelled", f"Stopped at step {run.state['step']} of {run.total_steps}.", dict(run.state))
    return TrainResult("cancelled", None, {"steps": run.state["step"]}, [], run.spec.as_plan())


def finish_run(run: Run, clock: RunClock, initial_eval: dict, oom_recoveries: int,
               on_event=_noop) -> TrainResult:
    """Saves the adapter folder atomically (staged, then renamed) with its metadata, tokenizer and stop tokens.
    The samples are generated before the save, so the phases read evaluating then saving, once each."""
    spec = run.spec
    restore_best(run, clock)
    sharded = is_sharded(run.model)
    gather_whole(run.model)  # FSDP: every rank takes part in gathering the weights rank 0 saves
    if not run.ranks.is_main:  # rank 0 writes the adapter; the other ranks hold the same weights
        return TrainResult("succeeded", None, {"steps": run.state["step"]}, [], spec.as_plan())
    out_dir = Path(spec.output_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    on_event("phase", "Generating the evaluation samples.", {"phase": "evaluating"})
    # A sharded model's forward needs every rank: no greedy samples from rank 0 alone.
    generations = [] if sharded else generate_samples(run.model, run.tokenizer, spec.eval_file, spec)
    on_event("phase", "Saving the adapter.", {"phase": "saving"})
    save_adapter(run.model, spec.as_plan(), staging)
    metrics = _final_metrics(run, clock, initial_eval, oom_recoveries)
    meta = {"method": spec.method, "plan": spec.as_plan(), "base_model": spec.base_model_path,
            "quantize_4bit": get_method(spec.method).quantized_base, "metrics": metrics,
            "max_seq_len": spec.max_seq_len}
    (staging / "tunedeck.json").write_text(json.dumps(meta, indent=2, default=str))
    # The adapter folder carries what makes it behave like it did in training: the tokenizer with its chat
    # template, and a generation config whose stop tokens include the end-of-turn token it learned to emit.
    run.tokenizer.save_pretrained(str(staging))
    from .modelstore import save_generation_config

    save_generation_config(staging, run.tokenizer, getattr(base_of(run.model), "generation_config", None))
    os.replace(staging, out_dir)
    if spec.checkpoint_dir:
        ckpt.clear(spec.checkpoint_dir)
    return TrainResult("succeeded", str(out_dir), metrics, generations, spec.as_plan())


def _final_metrics(run: Run, clock: RunClock, initial_eval: dict, oom_recoveries: int) -> dict:
    state = run.state
    metrics = {
        "train_loss": clock.loss_ema,
        "final_step_loss": clock.last_loss if state["step"] else None,
        "steps": state["step"],
        "tokens_seen": state["tokens_seen"],
        "tokens_per_second": state["tokens_seen"] / max(time.monotonic() - clock.started, 1e-9),
        "trainable_parameters": run.trainable,
        "total_parameters": run.total_params,
        "train_examples": len(run.train_rows),
        "truncated_examples": run.data_stats["truncated"],
        "skipped_examples": run.data_stats["skipped_no_labels"],
        "oom_recoveries": oom_recoveries,
        "peak_memory_bytes": _memory_bytes(run.device),
        "device": str(run.device),
        "loss_path": fastloss.loss_path(run.model),
        "kernels": run.spec.plan.get("kernels", []),
        **clock.last_eval,
    }
    if run.spec.plan.get("fit_check"):
        metrics["fit_check"] = run.spec.plan["fit_check"]
    if initial_eval:
        metrics["initial_eval_loss"] = initial_eval["eval_loss"]
    best = clock.best
    if best:
        # The adapter holds the best evaluation's weights, so its scores are the ones reported.
        metrics["last_eval_loss"] = clock.last_eval.get("eval_loss")
        metrics.update(best["eval"])
        metrics["best_step"] = best["step"]
        metrics["best_eval_loss"] = best["eval"]["eval_loss"]
    metrics["stopped_early"] = clock.stopped_early
    return metrics


def _memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0

"""How long a run trains: a ceiling of passes that grows as the data shrinks, and validation deciding where under
that ceiling the run stops (finetune/train.py evaluates every `eval_every_steps`, stops after
`early_stopping_patience` evaluations without a better validation score and saves the best evaluation's adapter;
the score is the exact match of greedy answers when the answers are short, labels or classes, else the loss:
finetune/validation.py says why).

    length = choose_length(rows, effective_batch, validation_rows, overrides)
    -> {"epochs": ceiling, "eval_every_steps": ..., "early_stopping_patience": ...} and length_reason(...)

Why a ceiling and not a length: how many passes a dataset needs depends on what the base model already knows, not
on its size. Issue 32: on 108 training rows whose labels the base model had never seen, 3 passes at lr 2e-4 (42
steps) scored exact match 0.31 where the plain recipe at lr 1e-3 for 10 passes (135 steps) scored 0.95, while a
400-row intent task was learned in under 2 passes. So small datasets get room for many passes (most of which they
never use: the run stops a pass or two after validation stops improving), large ones about one.
"""
from __future__ import annotations

import math

# The ceiling: room for this many optimizer steps, at most MAX_PASSES passes and at least one. 300 is twice the
# steps issue 32's careful run needed on new labels (135 at lr 1e-3; the rules' lr is lower), so the best
# validation point falls well inside the ceiling rather than at it.
CEILING_STEPS = 300
# Beyond this many passes over the same rows an adapter memorises them; the careful run above used 10.
MAX_PASSES = 20
# A multi-pass ceiling is evaluated at least every pass and at least this many times over the ceiling (with the
# default 10 % validation split, one evaluation costs about 4 % of a pass: a forward pass is ~1/3 of a step).
MIN_EVALUATIONS = 8
# Patience: evaluations without a better validation score before the run stops, about one pass's worth (so one
# noisy evaluation of a small validation split does not end it), at least MIN_PATIENCE, at most MAX_PATIENCE.
MIN_PATIENCE, MAX_PATIENCE = 2, 3
# Without validation rows nothing can stop a run early, so the ceiling would be its length: then the old fixed
# rule (enough passes for 80 optimizer steps, at most 3), which keeps a run without validation short.
FIXED_STEPS, FIXED_MAX_PASSES = 80, 3


def steps_per_pass(rows: int, effective_batch: int) -> int:
    return max(1, math.ceil(rows / max(1, effective_batch)))


def hundredths_up(value: float) -> float:
    return math.ceil(round(100 * value, 6)) / 100


def ceiling_passes(rows: int, effective_batch: int) -> int | float:
    """Passes for CEILING_STEPS optimizer steps, 1 to MAX_PASSES, in hundredths (360 rows at batch 8: 6.67)."""
    if rows <= 0:
        return 1
    passes = hundredths_up(CEILING_STEPS * effective_batch / rows)
    return 1 if passes <= 1 else min(MAX_PASSES, passes)


def fixed_passes(rows: int, effective_batch: int) -> int | float:
    if rows <= 0:
        return 1
    passes = hundredths_up(FIXED_STEPS * effective_batch / rows)
    return 1 if passes <= 1 else min(FIXED_MAX_PASSES, passes)


def choose_length(rows: int, effective_batch: int, validation_rows: int | None, overrides: dict) -> dict:
    """The plan's length fields. validation_rows None means unknown (planned as if the usual split exists: a job's
    dataset has one unless its validation fraction is 0); 0 means none, so nothing can stop the run early."""
    if "epochs" in overrides:
        epochs = overrides["epochs"]
    elif validation_rows == 0:
        epochs = fixed_passes(rows, effective_batch)
    else:
        epochs = ceiling_passes(rows, effective_batch)
    length = {"epochs": epochs}
    if rows <= 0 or validation_rows == 0 or "max_steps" in overrides or float(epochs) <= 1:
        return length  # one pass or less: the trainer's own schedule (up to 8 evaluations, their cost capped)
    per_pass = steps_per_pass(rows, effective_batch)
    total = max(1, math.ceil(float(epochs) * per_pass))
    every = int(overrides.get("eval_every_steps") or min(per_pass, math.ceil(total / MIN_EVALUATIONS)))
    patience = overrides.get("early_stopping_patience",
                             min(MAX_PATIENCE, max(MIN_PATIENCE, math.ceil(per_pass / every))))
    return {**length, "eval_every_steps": every, "early_stopping_patience": patience}


def length_reason(plan: dict, rows: int, validation_rows: int | None, overrides: dict) -> str:
    epochs = plan["epochs"]
    effective = plan["micro_batch"] * plan["grad_accum"]
    per_pass = steps_per_pass(rows, effective) if rows else 0
    steps = f" (about {math.ceil(per_pass * float(epochs)):,} optimizer steps)" if rows else ""
    head = f"{_number(epochs)} epoch{'s' if epochs != 1 else ''}"
    if "max_steps" in overrides:
        return f"{head}, but max_steps = {overrides['max_steps']} (override) ends the run first."
    if "epochs" in overrides:
        return f"{head} (override){steps}{stopping_text(plan, per_pass)}."
    if not rows:
        return f"{head}: the default without dataset statistics; training stops early on validation."
    if validation_rows == 0:
        return f"{head}{steps}: the dataset has no validation rows, so nothing can stop the run early and this is " \
               f"its length: enough passes for {FIXED_STEPS} optimizer steps, {FIXED_MAX_PASSES} at most (add a " \
               f"validation split to let validation decide, with room for up to {MAX_PASSES} passes)."
    if float(epochs) <= 1:
        return f"{head}{steps}: {rows:,} rows give at least {CEILING_STEPS} optimizer steps in one pass, room " \
               "enough; the run stops early when validation stops improving and keeps its best checkpoint."
    cap = f"{MAX_PASSES} passes" if epochs == MAX_PASSES else f"{CEILING_STEPS} optimizer steps"
    return f"At most {head}{steps}: a ceiling of {CEILING_STEPS} steps or {MAX_PASSES} passes, whichever " \
           f"comes first ({cap} here: {rows:,} rows give {per_pass:,} steps a pass); validation decides where " \
           f"below it the run ends{stopping_text(plan, per_pass)}."


def stopping_text(plan: dict, per_pass: int) -> str:
    every, patience = plan.get("eval_every_steps"), plan.get("early_stopping_patience")
    if not every or not patience or not per_pass:
        return "; the run stops early when validation stops improving and keeps its best checkpoint"
    epochs = float(plan["epochs"])
    earliest = min(epochs, (1 + patience) * every / per_pass)
    cadence = "every pass" if every >= per_pass else f"every {every / per_pass:.2g} pass"
    return f". Validation every {every:,} steps ({cadence}); the run stops after {patience} evaluations without " \
           f"a better validation score (the exact match of its greedy answers when the answers are short, labels " \
           f"or classes, else the loss) and keeps the best one's adapter (its best checkpoint), so it ends between " \
           f"{_number(round(earliest, 2))} passes (nothing better after the first evaluation) and " \
           f"{_number(epochs)} (still improving): a task the base model nearly knows stops near the low end, new " \
           "labels or formats use more"


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)

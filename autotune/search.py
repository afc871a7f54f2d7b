"""The search stage before the final training: an Optuna study of short trial runs. Pure Python, no Django.

    budget = plan_budget(plan, rows=..., mean_tokens=..., tokens_per_second=..., source=...)
    study = open_study(storage_url, name, metric)
    run_trials(study, setup, budget, observer=..., should_stop=...)   # any number of workers, one study
    plan = apply_winner(plan, study)                                  # the final training's plan, with reasons

How it works, and why:

- A trial is a short run (setup.trial_steps optimizer steps) on the training split with finetune.train.train; it
  reports validation loss every setup.eval_every steps (trial.report), and a successive-halving pruner stops the
  trials after the first ones (the ladder below, which runs to the end) whose validation loss is behind the
  others' at the same step (should_stop answers True, training returns "cancelled", the trial is pruned). A loss
  that is not finite is pruned at once. Trials in one worker load the base model from disk once and train copies
  of it (reused_base_model). A trial warms up for as many steps as the final run will, so it is the final run's
  first steps at its settings; it has no early stopping of its own (its evaluations, a third of a pass apart on
  small data, are too close for a dozen validation answers to settle), and keeps its best evaluation.
- A finished trial is scored on the validation split: when the rows have short reference answers (labels,
  classes), by the exact match of its greedy answers, which the trial's own evaluations watch as the final run's
  do (finetune/validation.py: the best evaluation is kept, on up to 64 validation prompts); with longer answers by
  token F1 of greedy generations on up to setup.score_examples prompts (finetune/evalmetrics.py); else by the
  final validation loss.
- The first trials are the rules' plan, then the same at 3x and 10x its learning rate (LR_LADDER): the rate is
  what most often decides whether a small dataset is learned (issue 32: 0.04 at 2e-4 against 0.95 at 1e-3).
  Then TPE samples. With few trials (fewer than FULL_SPACE_TRIALS expected) only the learning rate is searched and
  everything else stays the rules'; with more, also rank, alpha/rank, target set (attention only or every linear
  layer), LoRA or DoRA (only when both fit) and the micro-batch (powers of two up to the plan's effective batch).
  Every candidate is first checked by autotune.estimate against the plan's memory capacity; one that does not fit
  is pruned with the reason and never runs, so no trial can run out of memory.
- The budget is wall time and/or a number of trials, shared by every worker through the study's storage: a
  worker starts a trial only while trials started < max_trials and the time since the study began < seconds.
  By default 30 % of the final run's ceiling (autotune/length.py), on when the ladder fits in it: small datasets
  have the cheapest trials and the longest ceilings relative to their size, so they are searched first (the
  smallest task of the bench's tuning half, 60 rows, fits the ladder at 30 % and not at 25 %).
- The final run keeps the rules' length: a ceiling under which validation decides (early stopping, best
  checkpoint); the reasons say where the winning trial's validation loss stood.
"""
from __future__ import annotations

import copy
import math
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from finetune.evalmetrics import exact_match, token_f1
from finetune.methods import find_method, names_where
from finetune.units import format_duration
from finetune.validation import choose_metric, reference_prompts  # noqa: F401  (search.choose_metric: the study's metric)

DEFAULT_BUDGET_FRACTION = 0.3  # of the final training's ceiling (its longest possible time)
LR_LADDER = (1.0, 3.0, 10.0)  # the first trials: the rules' learning rate times these
MIN_TRIALS = 3  # the ladder; fewer and the search cannot compare rates: it is off by default
FULL_TRIALS = 3  # a trial is as long as the budget allows for this many unpruned trials (the ladder) ...
MIN_TRIAL_STEPS, MAX_TRIAL_STEPS = 8, 60  # ... within these bounds
FULL_SPACE_TRIALS = 10  # expected trials below this: only the learning rate is searched (TPE needs ~10 to learn)
MAX_FINAL_SLOWDOWN = 1.3  # the winner's settings may train at most this much slower than the planned ones
# What a trial costs beyond its steps: a fixed part (copying the loaded model, saving) and about as much compute as
# TRIAL_OVERHEAD_STEPS steps (the fit check's step, the validation passes, the scoring generations).
TRIAL_OVERHEAD_SECONDS = 6.0
TRIAL_OVERHEAD_STEPS = 2
RANKS = (4, 8, 16, 32)
ALPHA_RATIOS = (1.0, 2.0, 4.0)
LEARNING_RATE_RANGE = (5e-5, 3e-3)
TARGET_SETS = ("all-linear", "attention")
SEARCHED_METHODS = names_where(search_alternative=True)
about = partial(format_duration, approximate=True, missing="?")  # an estimate's duration, '?' when unknown

STATE_RUNNING, STATE_COMPLETE, STATE_PRUNED, STATE_FAILED = "running", "complete", "pruned", "failed"
MAXIMISED = {"exact_match", "token_f1"}
PARAM_LABELS = {"learning_rate": "learning rate", "rank": "rank", "alpha_ratio": "alpha/rank",
                "target_set": "target modules", "method": "method", "micro_batch": "micro-batch"}


@dataclass
class SearchSetup:
    """What every trial needs: the rules' plan (with memory capacity) and where the data and model are."""

    plan: dict
    model_config: dict
    base_model_path: str
    train_file: str
    eval_file: str
    work_dir: str
    trial_steps: int
    eval_every: int
    score_examples: int = 16
    max_new_tokens: int | None = None  # None: enough for the longest validation reference (generation is slow)
    eval_examples: int = 48  # validation rows for the loss curve of a trial
    seed: int = 42
    trust_remote_code: bool = False
    learning_rates: tuple = LEARNING_RATE_RANGE  # (low, high), searched on a log scale
    fixed: dict = field(default_factory=dict)  # parameters the user set (overrides): not searched
    final_steps: int | None = None  # the final run's ceiling in steps (else the budget's): sets the trials' warmup


@dataclass
class Budget:
    max_trials: int | None = None
    seconds: float | None = None
    trial_seconds: float = 0.0  # expected length of one trial: none starts that would end far past the budget
    searched: str = "all"  # "learning_rate": only the rate, the rest stays the rules' (few trials)
    final_steps: int | None = None  # the final run's ceiling in steps: trials warm up as long as it will

    @classmethod
    def from_plan(cls, budget: dict) -> Budget:
        return cls(budget.get("max_trials"), budget.get("seconds"), float(budget.get("trial_seconds_estimate") or 0),
                   budget.get("searched") or "all", budget.get("final_steps"))


@dataclass
class TrialRecord:
    """One trial as the host stores it (jobs.SearchTrial mirrors these fields)."""

    number: int
    params: dict
    state: str = STATE_RUNNING
    score: float | None = None
    metric: str = ""
    curve: list = field(default_factory=list)  # [[step, eval_loss], ...]
    duration: float = 0.0
    reason: str = ""
    tokens_per_second: float | None = None  # its training steps alone: what the final run would cost with it

    def as_dict(self) -> dict:
        return asdict(self)


class Observer:
    """Hooks for the host (the job layer writes rows); the default does nothing."""

    def started(self, record: TrialRecord): ...

    def point(self, record: TrialRecord): ...

    def finished(self, record: TrialRecord): ...


# ------------------------------------------------------------------------ budget


def plan_budget(plan: dict, *, rows: int, mean_tokens: float, tokens_per_second: float | None, source: str,
                minutes: float | None = None, trials: int | None = None, enabled: bool | None = None,
                on_by_default: bool = True) -> dict:
    """The search budget a person reads before clicking Train: the longest the final run can take (its ceiling:
    it stops earlier on validation), what the search may take (30 % of that unless set in minutes or trials), and
    whether search is on: by default when the learning-rate ladder fits (MIN_TRIALS trials)."""
    effective = max(1, int(plan.get("micro_batch") or 1) * int(plan.get("grad_accum") or 1))
    epochs = float(plan.get("epochs") or 1)
    final_steps = int(plan.get("max_steps") or max(1, math.ceil(rows * epochs / effective)))
    step_seconds = effective * max(1.0, mean_tokens) / tokens_per_second if tokens_per_second else None
    final_seconds = final_steps * step_seconds if step_seconds else None
    seconds = minutes * 60 if minutes else (final_seconds * DEFAULT_BUDGET_FRACTION if final_seconds else None)
    trial_steps = MIN_TRIAL_STEPS
    overhead = TRIAL_OVERHEAD_SECONDS + TRIAL_OVERHEAD_STEPS * (step_seconds or 0)
    if seconds and step_seconds:  # long enough for FULL_TRIALS unpruned trials (pruning makes room for more)
        trial_steps = int((seconds / FULL_TRIALS - overhead) / step_seconds)
    trial_steps = min(MAX_TRIAL_STEPS, max(MIN_TRIAL_STEPS, trial_steps, 0))
    trial_seconds = trial_steps * step_seconds + overhead if step_seconds else None
    affordable = int(seconds // trial_seconds) if seconds and trial_seconds else 0
    fits = affordable >= MIN_TRIALS or bool(trials) or bool(minutes)
    on = (fits and on_by_default) if enabled is None and not (trials or minutes) else enabled is not False
    searched = getattr(find_method(plan.get("method")), "searchable", False)
    expected = int(trials) if trials else affordable
    budget = {
        "enabled": bool(on and searched and rows > 0),
        "method_searched": searched,
        "max_trials": int(trials) if trials else None,
        "expected_trials": expected,
        "searched": "all" if expected >= FULL_SPACE_TRIALS else "learning_rate",
        "seconds": None if trials and not minutes else (round(seconds, 1) if seconds else None),
        "trial_steps": trial_steps,
        "eval_every": max(2, trial_steps // 4),
        "final_steps": final_steps,
        "final_seconds_estimate": round(final_seconds, 1) if final_seconds else None,
        "trial_seconds_estimate": round(trial_seconds, 1) if trial_seconds else None,
        "tokens_per_second": round(tokens_per_second, 1) if tokens_per_second else None,
        "tokens_per_second_source": source,
        "set_by": "trials" if trials else "minutes" if minutes else "default",
    }
    budget["summary"] = budget_summary(budget, fits, enabled, on_by_default, plan.get("learning_rate"))
    return budget


def budget_summary(budget: dict, fits: bool, enabled: bool | None, on_by_default: bool = True,
                   learning_rate: float | None = None) -> str:
    final = budget["final_seconds_estimate"]
    speed = (f"{budget['tokens_per_second']:,.0f} tokens/s {budget['tokens_per_second_source']}"
             if budget["tokens_per_second"] else "no speed figure")
    head = f"Final training about {about(final)} at most ({budget['final_steps']:,} steps at {speed}; it " \
           "stops earlier when validation stops improving)" if final else \
        f"Final training {budget['final_steps']:,} steps at most ({speed})"
    if not budget["enabled"]:
        if enabled is False:
            why = "skipped as asked"
        elif budget["method_searched"] is False:
            why = "this method is not searched"
        elif not fits:
            why = f"it would fit fewer than {MIN_TRIALS} trials of about " \
                  f"{about(budget['trial_seconds_estimate'])}"
        else:
            why = "a method was chosen (search on, or set search minutes or trials, to search its settings)"
        return f"{head}. Search off: {why}; the rules choose the settings."
    if budget["set_by"] == "trials":
        limit = f"{budget['max_trials']} trials (set)"
    else:
        share = "set" if budget["set_by"] == "minutes" else \
            f"{DEFAULT_BUDGET_FRACTION:.0%} of the final training's longest time"
        limit = f"{about(budget['seconds'])} ({share}), about {budget['expected_trials']} full trials"
    what = searched_text(budget["searched"], learning_rate)
    return f"{head}. Search first: at most {limit} of {budget['trial_steps']} steps each, {what}; later " \
           "trials stopped early when behind."


def searched_text(searched: str, learning_rate: float | None) -> str:
    ladder = ""
    if learning_rate:
        ladder = " (" + ", ".join(format_value(learning_rate * f) for f in LR_LADDER) + " first)"
    if searched == "learning_rate":
        return f"the learning rate{ladder}; the rest stays the rules' (fewer than {FULL_SPACE_TRIALS} trials)"
    return f"the learning rate{ladder}, rank, alpha, target modules, method and micro-batch"


# ------------------------------------------------------------------------ the study


def open_study(storage, name: str, metric: str, seed: int = 42, eval_every: int = 2):
    """Creates the study, or loads it when another worker (or an earlier attempt) already did."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=3, multivariate=True, group=True,
                                         constant_liar=True)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_every, reduction_factor=3)
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                direction="maximize" if metric in MAXIMISED else "minimize", load_if_exists=True)
    if "started_at" not in study.user_attrs:
        study.set_user_attr("started_at", time.time())
        study.set_user_attr("metric", metric)
    return study


def budget_left(study, budget: Budget) -> bool:
    import optuna

    waiting = optuna.trial.TrialState.WAITING  # enqueued, not started: the planned trial and the ladder
    trials = study.get_trials(deepcopy=False)
    started = sum(t.state != waiting for t in trials)
    if budget.max_trials is not None and started >= budget.max_trials:
        return False
    # The ladder runs whole: the plan names its rates, and trials slower than estimated must not leave the highest
    # untried (a 108-row task's budget ran out after two of three).
    if any(t.state == waiting for t in trials):
        return True
    began = study.user_attrs.get("started_at") or time.time()
    return budget.seconds is None or time.time() - began + expected_trial_seconds(study, budget) / 2 < budget.seconds


def expected_trial_seconds(study, budget: Budget) -> float:
    """How long the next trial should take: the mean of this study's completed trials once there are some (the
    estimate in the budget is made before anything ran), else the estimate."""
    import optuna

    done = [t.user_attrs.get("duration") for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("duration")]
    return sum(done) / len(done) if done else budget.trial_seconds


def run_trials(study, setup: SearchSetup, budget: Budget, observer: Observer | None = None,
               should_stop: Callable[[], bool] | None = None) -> int:
    """Runs trials one after another while the shared budget lasts; several workers may call this on one study.
    Returns how many trials this call ran."""
    observer = observer or Observer()
    should_stop = should_stop or (lambda: False)
    if setup.max_new_tokens is None:
        references = reference_prompts(setup.eval_file, 200, preference=False)
        longest = max((len(r.split()) for _, r in references), default=8)
        setup.max_new_tokens = min(64, 2 * longest + 6)
    setup.final_steps = setup.final_steps or budget.final_steps
    space = trial_space(setup, budget)
    if not study.get_trials(deepcopy=False) and not study.user_attrs.get("planned_trial"):
        first = first_trials(setup.plan, space, setup.model_config)
        if first:  # the rules' own settings run first: a candidate to beat, and the speed the budget assumed
            study.set_user_attr("planned_trial", first[0])
            study.set_user_attr("ladder_trials", len(first))  # numbers 0..n-1: they run unpruned
            for params in first:
                study.enqueue_trial(params)
    ran = 0
    with reused_base_model(setup.plan):
        while budget_left(study, budget) and not should_stop():
            trial = study.ask()
            run_one(study, trial, setup, space, observer, should_stop)
            ran += 1
    return ran


def trial_space(setup: SearchSetup, budget: Budget) -> dict:
    """What the trials sample from. With budget.searched "learning_rate" everything but the rate stays the rules'
    (fixed at the planned values, or left out of the parameters where the plan lies outside the space); when the
    user fixed the rate there is nothing else to vary, so then the whole space is searched."""
    space = {**search_space(setup.plan, setup.model_config), "learning_rates": tuple(setup.learning_rates),
             "fixed": dict(setup.fixed), "only": None}
    if budget.searched != "learning_rate" or "learning_rate" in setup.fixed:
        return space
    planned = planned_params(setup.plan, space, setup.model_config)
    if planned:
        space["fixed"] = {**{k: v for k, v in planned.items() if k != "learning_rate"}, **setup.fixed}
    else:
        space["only"] = {"learning_rate", *setup.fixed}
    return space


def first_trials(plan: dict, space: dict, model_config: dict) -> list[dict]:
    """The rules' plan, then the ladder of higher learning rates (those inside the searched range), as points of
    the search space; none where the plan lies outside it."""
    planned = planned_params(plan, space, model_config)
    if planned is None and space.get("only"):
        planned = {"learning_rate": float(plan.get("learning_rate") or 0), **space["fixed"]}
    low, high = space.get("learning_rates", LEARNING_RATE_RANGE)
    if planned is None or not low <= planned["learning_rate"] <= high:
        return []
    if "learning_rate" in (space.get("fixed") or {}):
        return [planned]
    rates = [planned["learning_rate"] * f for f in LR_LADDER]
    return [{**planned, "learning_rate": rate} for rate in rates if low <= rate <= high]


@contextmanager
def reused_base_model(plan: dict):
    """Within it, every trial of this worker trains a copy of one base model loaded from disk once, instead of
    loading it again (finetune.train loads through modelstore.load_model_and_tokenizer, looked up at call time).
    Only on the CPU, and only where the plan's memory estimate leaves room for the second copy; a 4-bit base is
    always loaded afresh (its quantisation state is not copied safely)."""
    from finetune import modelstore

    if not keeps_a_copy(plan):
        yield
        return
    original, kept = modelstore.load_model_and_tokenizer, {}

    def load(path, *, device="auto", dtype="auto", quantize_4bit=False, trust_remote_code=False):
        if quantize_4bit or str(device).startswith("cuda"):
            return original(path, device=device, dtype=dtype, quantize_4bit=quantize_4bit,
                            trust_remote_code=trust_remote_code)
        key = (str(path), str(device), str(dtype), bool(trust_remote_code))
        if key not in kept:
            kept.clear()
            kept[key] = original(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        model, tokenizer = kept[key]
        return copy.deepcopy(model), copy.deepcopy(tokenizer)

    modelstore.load_model_and_tokenizer = load
    try:
        yield
    finally:
        modelstore.load_model_and_tokenizer = original
        kept.clear()


def keeps_a_copy(plan: dict) -> bool:
    memory = plan.get("memory") or {}
    weights = int((memory.get("breakdown") or {}).get("weights") or 0)
    room = int(memory.get("capacity_bytes") or 0) - int(memory.get("total_bytes") or 0)
    quantized = getattr(find_method(plan.get("method")), "quantized_base", False)  # unknown methods: not 4-bit
    return plan.get("device") == "cpu" and not quantized and 0 < weights <= room


def search_space(plan: dict, model_config: dict) -> dict:
    effective = max(2, int(plan.get("micro_batch") or 1) * int(plan.get("grad_accum") or 1))
    batches = [b for b in (2, 4, 8, 16, 32) if b <= max(effective, 8)]
    methods = [m for m in SEARCHED_METHODS if fits(model_config, {**plan, "method": m, "micro_batch": batches[0]})]
    if getattr(find_method(plan.get("method")), "quantized_base", False) or not methods:
        methods = [plan.get("method") or "lora"]
    return {"methods": methods, "micro_batches": batches}


def planned_params(plan: dict, space: dict, model_config: dict) -> dict | None:
    """The rules' plan as a point of the search space (what the user fixed in place), or None where the plan lies
    outside it (accumulated batches, a rank or alpha ratio the search does not try, hand-picked modules)."""
    if int(plan.get("grad_accum") or 1) != 1 or not plan.get("rank"):
        return None
    targets = plan.get("target_modules")
    common = {"learning_rate": 1e-3, "rank": 8, "alpha_ratio": 1.0}
    target_set = "all-linear" if targets == "all-linear" else next(
        (name for name in TARGET_SETS
         if candidate_plan(plan, {**common, "target_set": name}, model_config)["target_modules"] == targets), None)
    params = {"learning_rate": float(plan.get("learning_rate") or 0), "rank": int(plan["rank"]),
              "alpha_ratio": float(plan.get("alpha") or 0) / int(plan["rank"]), "target_set": target_set,
              "method": plan.get("method"), "micro_batch": int(plan.get("micro_batch") or 0),
              **(space.get("fixed") or {})}
    low, high = space.get("learning_rates", LEARNING_RATE_RANGE)
    choices = {"rank": RANKS, "alpha_ratio": ALPHA_RATIOS, "target_set": TARGET_SETS, "method": space["methods"],
               "micro_batch": space["micro_batches"]}
    inside = low <= params["learning_rate"] <= high and all(
        params[name] in values or name in (space.get("fixed") or {}) for name, values in choices.items())
    return params if inside else None


def sample(trial, space: dict) -> dict:
    """The trial's parameters; those the user fixed (space["fixed"], from overrides) have one choice."""
    fixed = space.get("fixed") or {}
    low, high = space.get("learning_rates", LEARNING_RATE_RANGE)
    choices = {"rank": list(RANKS), "alpha_ratio": list(ALPHA_RATIOS), "target_set": list(TARGET_SETS),
               "method": space["methods"], "micro_batch": space["micro_batches"]}
    only = space.get("only")
    params = {}
    for name in PARAM_LABELS:
        if only is not None and name not in only:
            continue  # stays the rules' (candidate_plan keeps the plan's value)
        if name in fixed:
            params[name] = trial.suggest_categorical(name, [fixed[name]])
        elif name == "learning_rate":
            params[name] = trial.suggest_float(name, low, high, log=True)
        else:
            params[name] = trial.suggest_categorical(name, choices[name])
    return params


def candidate_plan(plan: dict, params: dict, model_config: dict) -> dict:
    """The rules' plan with a trial's parameters in place (also the final plan, with the winner's). A parameter
    the trial does not carry keeps the plan's value."""
    candidate = {**plan, "learning_rate": float(params["learning_rate"])}
    if "rank" in params:
        ratio = params.get("alpha_ratio") or float(plan.get("alpha") or 0) / int(plan.get("rank") or 1)
        candidate.update(rank=int(params["rank"]), alpha=float(ratio) * int(params["rank"]))
    if params.get("target_set"):
        from .shapes import ModelShape

        shape = ModelShape.from_config(model_config)
        targets = [m.name for m in shape.modules_for("all-linear")]
        if params["target_set"] == "attention":
            targets = [m.name for m in shape.linear_modules if m.path.startswith(("self_attn.", "attn."))] or targets
        candidate["target_modules"] = list(dict.fromkeys(targets))
    if params.get("method"):
        candidate["method"] = params["method"]
    if "micro_batch" in params:  # the searched micro-batch is the batch: no accumulation on top
        candidate.update(micro_batch=int(params["micro_batch"] or plan.get("micro_batch") or 1), grad_accum=1)
    return candidate


def fits(model_config: dict, plan: dict) -> bool:
    return memory_shortfall(model_config, plan) is None


def memory_shortfall(model_config: dict, plan: dict) -> str | None:
    """None when the estimator says the plan fits its capacity, else the reason in words."""
    from . import estimate

    capacity = int((plan.get("memory") or {}).get("capacity_bytes") or 0)
    if not capacity:
        return None
    need = estimate(model_config, plan)["total_bytes"]
    if need <= capacity:
        return None
    return f"needs {need / 1e6:,.0f} MB by the estimator, over the {capacity / 1e6:,.0f} MB usable; not run"


def run_one(study, trial, setup: SearchSetup, space: dict, observer: Observer, should_stop) -> TrialRecord:
    import optuna

    params = sample(trial, space)
    record = TrialRecord(trial.number, params, metric=study.user_attrs.get("metric", "eval_loss"))
    plan = candidate_plan(setup.plan, params, setup.model_config)
    shortfall = memory_shortfall(setup.model_config, plan)
    if shortfall:
        return _close(study, trial, record, optuna.trial.TrialState.PRUNED, observer, reason=shortfall)
    observer.started(record)
    started = time.monotonic()
    try:
        outcome = train_trial(trial, setup, plan, record, observer, should_stop)
    except Exception as exc:  # noqa: BLE001 - a trial that crashes is failed; the study goes on
        record.duration = time.monotonic() - started
        return _close(study, trial, record, optuna.trial.TrialState.FAIL, observer,
                      reason=f"{type(exc).__name__}: {exc}"[:500])
    record.duration = time.monotonic() - started
    if outcome is None:
        return _close(study, trial, record, optuna.trial.TrialState.PRUNED, observer,
                      reason=record.reason or "stopped early: validation loss behind the other trials")
    record.score = outcome
    return _close(study, trial, record, optuna.trial.TrialState.COMPLETE, observer, value=outcome)


def _close(study, trial, record: TrialRecord, state, observer: Observer, value=None, reason="") -> TrialRecord:
    import optuna

    record.reason = reason or record.reason
    trial.set_user_attr("curve", record.curve)
    trial.set_user_attr("reason", record.reason)
    trial.set_user_attr("duration", record.duration)
    trial.set_user_attr("tokens_per_second", record.tokens_per_second)
    record.state = {optuna.trial.TrialState.COMPLETE: STATE_COMPLETE,
                    optuna.trial.TrialState.PRUNED: STATE_PRUNED}.get(state, STATE_FAILED)
    study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    observer.finished(record)
    return record


def train_trial(trial, setup: SearchSetup, plan: dict, record: TrialRecord, observer: Observer,
                should_stop) -> float | None:
    """Trains the candidate for setup.trial_steps; the score, or None when pruned (or stopped)."""
    from finetune.train import TrainSpec, train

    maximise = record.metric in MAXIMISED
    state = {"prune": False}
    # The first trials (the rules' plan and its learning-rate ladder) run to the end: they are what the budget was
    # sized for, and a higher rate often looks worse on validation in its first steps before it overtakes.
    ladder = int(trial.study.user_attrs.get("ladder_trials") or 0)

    def on_progress(info: dict):
        if info.get("train_tokens_per_second"):
            record.tokens_per_second = float(info["train_tokens_per_second"])
        loss = info.get("eval_loss")
        if loss is None or not info.get("step"):
            return
        record.curve.append([int(info["step"]), float(loss)])
        observer.point(record)
        if not math.isfinite(loss):
            state["prune"], record.reason = True, "validation loss is not finite (the learning rate diverges)"
            return
        trial.report(-loss if maximise else loss, int(info["step"]))  # the pruner compares in the study's direction
        if trial.number >= ladder and trial.should_prune():
            state["prune"] = True

    out_dir = Path(setup.work_dir) / f"trial-{trial.number}"
    # A trial runs its steps whole (no early stopping: a third of a pass between evaluations is too little for
    # a dozen validation answers to settle) and is scored at its best evaluation.
    trial_plan = {**plan, "max_steps": setup.trial_steps, "eval_every_steps": setup.eval_every,
                  "early_stopping_patience": 0,
                  "max_eval_generations": setup.score_examples if scored_by_generations(plan, record.metric) else 0,
                  "max_new_tokens": setup.max_new_tokens, "seed": setup.seed, "checkpoint_every_minutes": 1e9,
                  "max_eval_examples": setup.eval_examples,
                  "warmup_ratio": trial_warmup_ratio(plan, setup.trial_steps, setup.final_steps)}
    spec = TrainSpec.from_plan(trial_plan, base_model_path=setup.base_model_path, train_file=setup.train_file,
                               eval_file=setup.eval_file, output_dir=str(out_dir), checkpoint_dir=None,
                               trust_remote_code=setup.trust_remote_code)
    try:
        result = train(spec, on_progress=on_progress, should_stop=lambda: state["prune"] or should_stop())
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if result.status != "succeeded":
        return None
    return score(result, record.metric)


def scored_by_generations(plan: dict, metric: str) -> bool:
    """Whether a trial needs greedy answers at its end to be scored: not when its evaluations already answered
    with exact match and kept the best (finetune/validation.py; the metric not forced to the loss)."""
    if metric not in MAXIMISED:
        return False
    return metric != "exact_match" or plan.get("early_stopping_metric") == "eval_loss"


def trial_warmup_ratio(plan: dict, trial_steps: int, final_steps: int | None) -> float:
    """The warmup share that gives a trial of trial_steps as many warmup steps as the final run (final_steps at the
    plan's warmup_ratio) will have, so the trial trains exactly the final run's first steps at its settings."""
    from finetune.train import TrainSpec

    ratio = plan.get("warmup_ratio")
    ratio = TrainSpec.__dataclass_fields__["warmup_ratio"].default if ratio is None else float(ratio)
    if not final_steps:
        return ratio
    warmup = int(ratio * final_steps)
    return (warmup + 0.5) / trial_steps if warmup else 0.0  # above 1 when the trial ends inside the warmup


def score(result, metric: str) -> float:
    if metric == "eval_loss":
        return float(result.metrics.get("eval_loss", float("inf")))
    if metric == "exact_match" and "val_exact_match" in result.metrics:
        # early stopping watched it on up to 64 validation prompts and kept its best checkpoint (finetune/train.py)
        return float(result.metrics["val_exact_match"])
    scorer = exact_match if metric == "exact_match" else token_f1
    generations = [g for g in result.generations if g.get("reference") is not None]
    if not generations:
        return 0.0
    return sum(scorer(g["output"], g["reference"]) for g in generations) / len(generations)


# ------------------------------------------------------------------------ results


def trial_records(study) -> list[TrialRecord]:
    """Every trial of the study, as stored (including those of other workers)."""
    import optuna

    states = {optuna.trial.TrialState.COMPLETE: STATE_COMPLETE, optuna.trial.TrialState.PRUNED: STATE_PRUNED,
              optuna.trial.TrialState.RUNNING: STATE_RUNNING}
    records = []
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.WAITING:  # enqueued (the planned trial) but never started
            continue
        records.append(TrialRecord(
            t.number, dict(t.params), states.get(t.state, STATE_FAILED), t.value,
            study.user_attrs.get("metric", ""), t.user_attrs.get("curve") or
            [[step, v] for step, v in sorted(t.intermediate_values.items())],
            float(t.user_attrs.get("duration") or 0.0), t.user_attrs.get("reason", ""),
            t.user_attrs.get("tokens_per_second")))
    return records


def best_record(records: list[TrialRecord]) -> TrialRecord | None:
    complete = [r for r in records if r.state == STATE_COMPLETE and r.score is not None and math.isfinite(r.score)]
    if not complete:
        return None
    maximise = complete[0].metric in MAXIMISED
    # ties (common with exact match on few prompts) go to the lower final validation loss
    return max(complete, key=lambda r: ((r.score if maximise else -r.score), -(r.curve[-1][1] if r.curve else 0)))


def affordable_records(records: list[TrialRecord], plan: dict) -> tuple[list[TrialRecord], list[str]]:
    """The trials whose settings train at most MAX_FINAL_SLOWDOWN x slower than the rules' plan would (the fastest
    trial with the plan's method and micro-batch: the cost the budget was shown for), and a reason for each
    complete one left out. Without such a trial there is nothing to compare with, and none is left out.
    Short trials reward whatever learns fastest in a few steps (a higher learning rate, DoRA, a smaller batch), and
    a final run at such a setting could take several times the time the budget was shown for: measured, DoRA at
    micro-batch 4 won 6 trials on a 400-row task and its final run took 2.7x the rules' run."""
    like_plan = [r for r in records if r.tokens_per_second
                 and r.params.get("method", plan.get("method")) == plan.get("method")
                 and int(r.params.get("micro_batch") or 0) == int(plan.get("micro_batch") or 0)]
    if not like_plan:
        return records, []
    reference = max(r.tokens_per_second for r in like_plan)
    kept, notes = _within(records, reference, "the planned settings")
    if not any(r.state == STATE_COMPLETE for r in kept):  # the planned settings lost: the quickest that learned
        fastest = max((r.tokens_per_second for r in records if r.state == STATE_COMPLETE and r.tokens_per_second),
                      default=None)
        if fastest:
            kept, notes = _within(records, fastest, "the fastest completed trial")
    return kept, notes


def _within(records: list[TrialRecord], reference: float, what: str) -> tuple[list[TrialRecord], list[str]]:
    speeds = settings_speeds(records)
    kept, notes = [], []
    for r in records:
        speed = speeds.get(cost_settings(r))
        slowdown = reference / speed if speed else 1.0
        if slowdown <= MAX_FINAL_SLOWDOWN:
            kept.append(r)
        elif r.state == STATE_COMPLETE:
            notes.append(f"Trial {r.number} was left out: it trained at {speed:,.0f} tokens/s, "
                         f"{slowdown:.1f}x slower than {what}, so the final run would take about "
                         f"that much longer than planned (limit {MAX_FINAL_SLOWDOWN:g}x).")
    return kept, notes


def cost_settings(record: TrialRecord) -> tuple:
    """The parameters that set a trial's speed (the learning rate and alpha do not)."""
    return tuple(record.params.get(name) for name in ("method", "micro_batch", "rank", "target_set"))


def settings_speeds(records: list[TrialRecord]) -> dict:
    """The fastest measured speed of each setting: trials that differ only in learning rate train equally fast,
    and one slow measurement (a busy machine, the first trial's warm-up) must not count against the rate."""
    speeds: dict = {}
    for r in records:
        if r.tokens_per_second:
            key = cost_settings(r)
            speeds[key] = max(speeds.get(key, 0.0), r.tokens_per_second)
    return speeds


def apply_winner(plan: dict, records: list[TrialRecord], model_config: dict) -> dict:
    """The final training's plan: the best affordable trial's parameters, with reasons that cite the trials.
    Without a complete affordable trial, the rules' plan, saying so."""
    affordable, left_out = affordable_records(records, plan)
    winner = best_record(affordable)
    reasons = list(plan.get("reasons") or [])
    summary = {"trials": len(records), "complete": sum(r.state == STATE_COMPLETE for r in records),
               "pruned": sum(r.state == STATE_PRUNED for r in records),
               "failed": sum(r.state == STATE_FAILED for r in records)}
    if winner is None:
        why = "completed" if not left_out else "completed at an affordable speed"
        reasons.append(f"Search: none of {len(records)} trials {why}; the rules' settings are kept.")
        return {**plan, "reasons": reasons + left_out, "search_result": {**summary, "winner": None}}
    final = candidate_plan(plan, winner.params, model_config)
    from . import estimate

    final["memory"] = {**estimate(model_config, final), "capacity_bytes": plan["memory"]["capacity_bytes"]} \
        if (plan.get("memory") or {}).get("capacity_bytes") else plan.get("memory")
    among = f"of {len(records)} trials" if not left_out else \
        f"of {len(affordable)} trials fast enough to train (of {len(records)})"
    varied = [name for name in PARAM_LABELS if name in winner.params
              and len({format_value(r.params.get(name)) for r in records if name in r.params}) > 1]
    cited = [winner_reason(name, winner, affordable, among) for name in varied]
    kept = [PARAM_LABELS[name] for name in PARAM_LABELS if name not in varied]
    if kept:
        cited.append(f"Not varied by the search, so the rules' (or your) values: {', '.join(kept)}.")
    final["reasons"] = [(f"Search: trial {winner.number} won, of {len(records)} trials ({summary['complete']} "
                        f"complete, {summary['pruned']} pruned, {summary['failed']} failed), by validation "
                        f"{_metric_label(winner.metric)}.")] + cited + [length_after_search(final, winner)] + \
        left_out + reasons
    final["search_result"] = {**summary, "winner": winner.number, "metric": winner.metric, "score": winner.score,
                              "params": winner.params}
    return final


def length_after_search(plan: dict, winner: TrialRecord) -> str:
    """Why the final run's length stays a ceiling under which validation decides, from the winner's curve."""
    epochs = plan.get("epochs") or 1
    ceiling = f"up to {format_value(epochs)} epoch{'s' if epochs != 1 else ''}"
    if plan.get("max_steps"):
        ceiling = f"{plan['max_steps']} steps (max_steps)"
    if len(winner.curve) < 2:
        return f"Length: {ceiling}, validation decides where below it the run stops."
    best_step, best_loss = min(winner.curve, key=lambda point: point[1])
    last_step = winner.curve[-1][0]
    if best_step == last_step:
        seen = f"trial {winner.number}'s validation loss was still falling at its last step ({last_step}, " \
               f"{best_loss:.3g}), so the final run goes on past it"
    else:
        seen = f"trial {winner.number}'s validation loss was lowest at step {best_step} of {last_step} " \
               f"({best_loss:.3g}), so the final run will likely stop early"
    return f"Length: {ceiling}; {seen} while validation keeps improving (early stopping, best checkpoint)."


def winner_reason(name: str, winner: TrialRecord, records: list[TrialRecord], among: str = "") -> str:
    """'learning rate 0.0004: best of 12 trials, validation exact match 0.97 vs 0.85 at 0.0002'"""
    value = winner.params[name]
    label, metric = PARAM_LABELS[name], _metric_label(winner.metric)
    complete = [r for r in records if r.state == STATE_COMPLETE and r.score is not None]
    others = [r for r in complete if name in r.params and r.params[name] != value]
    among = among or f"of {len(records)} trials"
    head = f"{label.capitalize()} {format_value(value)}: best {among}, validation {metric} " \
           f"{winner.score:.3g}"
    if not others:
        return f"{head} (no completed trial tried another value)."
    runner_up = best_record(others)
    return f"{head} vs {runner_up.score:.3g} at {format_value(runner_up.params[name])} (trial {runner_up.number})."


def _metric_label(metric: str) -> str:
    return {"exact_match": "exact match", "token_f1": "token F1", "eval_loss": "loss"}.get(metric, metric)


def format_value(value) -> str:
    return f"{value:.2g}" if isinstance(value, float) and value < 0.01 else f"{value:.3g}" \
        if isinstance(value, float) else str(value)

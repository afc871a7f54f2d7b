"""ORPO, odds-ratio preference optimisation (Hong, Lee and Thorne 2024, arXiv 2403.07691), on a LoRA.

Preference pairs like DPO, but no reference model: one loss both teaches the chosen answer (its negative
log-likelihood) and pushes its odds above the rejected answer's. Per pair, with lc and lr the length-averaged
log-probabilities of the chosen and rejected answers:

    loss = -lc - beta * log sigmoid(log_odds),   log_odds = (lc - lr) - (log(1 - e^lc) - log(1 - e^lr))

as LLaMA-Factory's odds_ratio_loss computes it (its `sft_loss + beta * odds_ratio_loss`), and as TRL's
ORPOTrainer.odds_ratio_loss computes the second term (tests/finetune/test_losses_vs_trl.py runs TRL's code on
the same numbers). TRL's first term differs: the cross-entropy over every chosen token of the batch, prompt
included; here, as in the paper and LLaMA-Factory, it is each chosen answer's own average.

This file is the whole method: the registry finds it (methods/__init__.py), the planner, the estimator, training,
merge and serving ask it (finetune/methods/base.py). It is never chosen by "auto": ask for method "orpo".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..collate import collate
from ..losses import answer_logprobs
from ..tokenize import IGNORE
from .base import register_method
from .preference import PreferenceMethod

# An answer whose every token has probability 1 in float has an average log-probability of exactly 0 and infinite
# odds; TRL then back-propagates NaN. Clamping just below 0 changes nothing else.
MAX_AVERAGE_LOGPROB = -1e-6


def log1mexp(x):
    """log(1 - e^x) for x < 0, precise on both sides of -ln 2 (Maechler 2012; TRL's log1mexp is the same)."""
    import torch

    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(chosen, rejected, beta: float):
    """ORPO on length-averaged answer log-probabilities, per pair. Returns (losses, log_odds)."""
    import torch.nn.functional as F

    chosen, rejected = chosen.clamp(max=MAX_AVERAGE_LOGPROB), rejected.clamp(max=MAX_AVERAGE_LOGPROB)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -chosen - beta * F.logsigmoid(log_odds), log_odds


def orpo_loss(model, batch: list[dict], beta: float, pad_id: int, device):
    """ORPO on a micro-batch of pairs: one forward with the adapter on, no reference forward. Returns (summed
    loss, pairs, tokens, metrics) like the other preference losses (finetune/losses.py)."""
    rows = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
    ids, labels, mask = collate(rows, pad_id, device)
    learned = labels[:, 1:] != IGNORE
    average = answer_logprobs(model, ids, labels, mask) / learned.sum(-1).clamp(min=1)
    n = len(batch)
    chosen, rejected = average[:n], average[n:]
    losses, log_odds = orpo_losses(chosen, rejected, beta)
    chosen, rejected, log_odds = chosen.detach(), rejected.detach(), log_odds.detach()
    metrics = {  # TRL's rewards are beta times the averages: the same accuracy and margin
        "reward_accuracy": float((chosen > rejected).float().mean()),
        "reward_margin": float(beta * (chosen - rejected).mean()),
        "log_odds_ratio": float(log_odds.mean()),
        "nll_loss": float(-chosen.mean()),
    }
    return losses.sum(), n, int(learned.sum()), metrics


@dataclass(frozen=True)
class OrpoMethod(PreferenceMethod):
    paired: bool = True
    reference_model: bool = False  # no second forward: the estimate and the step are the policy's alone

    def example_problem(self, example: dict) -> str | None:
        if "chosen" not in example:
            return "ORPO needs a preference dataset (prompt, chosen, rejected columns)."
        return None

    def loss(self, model, batch: list[dict], spec, pad_id: int, device):
        return orpo_loss(model, batch, self.beta(spec), pad_id, device)


ORPO = register_method(OrpoMethod(
    "orpo", "ORPO (LoRA)", 8e-6,
    "the ORPO paper's rate, kept with QLoRA in the Llama 3 ORPO recipe on TRL (Labonne 2024); LLaMA-Factory's "
    "LoRA preference example (pref_loss sigmoid, orpo or simpo) uses 5e-6. Beta (orpo_beta) 0.1: TRL's ORPOConfig "
    "default and LLaMA-Factory's pref_beta",
    beta_field="orpo_beta", schemas=("preference",),
    wrong_data="ORPO needs a preference dataset (prompt/chosen/rejected); this one is {layout}."))

"""The preference losses: DPO on chosen/rejected pairs, KTO on answers labelled desirable or undesirable.

Each comes in two layers. The loss itself is a pure function of summed answer log-probabilities (dpo_losses,
kto_losses): what the papers define and TRL computes, testable on numbers alone. The model-facing function
(dpo_loss, kto_loss) pads a micro-batch, takes the policy's log-probabilities with the adapter on and the
reference's with it switched off (the base itself is the reference, so no second model is loaded), and returns
(summed loss, items, tokens, metrics) as the training loop expects from every micro-batch. The methods call them
from their `loss` hook (finetune/methods/preference.py); a method with a loss of its own keeps it in its own
module (finetune/methods/orpo.py).
"""
from __future__ import annotations

from .collate import collate
from .tokenize import IGNORE

# ------------------------------------------------------------------------------------------ on log-probabilities


def dpo_losses(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float):
    """Direct Preference Optimisation (Rafailov et al. 2023), sigmoid loss: per pair -log sigmoid(beta * margin),
    margin = (log pi/pi_ref of the chosen answer) - (log pi/pi_ref of the rejected one). Returns (losses, margin)."""
    import torch.nn.functional as F

    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin), margin


def kto_losses(policy, reference, desirable, beta: float):
    """Kahneman-Tversky Optimisation (Ethayarajh et al. 2024, as TRL's KTOTrainer computes it) on unpaired answers.
    The reference point z0 (the policy's KL from the reference) is estimated by the batch mean of the answers'
    log-ratios, clamped at 0 and not back-propagated (the paper's batch estimate; TRL uses mismatched pairs).
    Desirable: 1 - sigmoid(beta (r - z0)); undesirable: 1 - sigmoid(beta (z0 - r)), r = log pi/pi_ref.
    `desirable` is a bool tensor. Returns (losses, r, z0)."""
    import torch

    ratios = policy - reference
    kl = ratios.detach().mean().clamp(min=0)
    losses = torch.where(desirable, 1 - torch.sigmoid(beta * (ratios - kl)), 1 - torch.sigmoid(beta * (kl - ratios)))
    return losses, ratios, kl


def kto_metrics(ratios, kl, desirable, beta: float) -> dict:
    """Reward accuracy (desirable answers above z0, undesirable below), z0, and the reward margin when the batch
    holds both kinds."""
    import torch

    right = torch.where(desirable, ratios > kl, ratios < kl)
    rewards = (beta * ratios).detach()
    info = {"reward_accuracy": float(right.float().mean()), "kl": float(kl)}
    if bool(desirable.any()) and bool((~desirable).any()):
        info["reward_margin"] = float(rewards[desirable].mean() - rewards[~desirable].mean())
    return info


# ------------------------------------------------------------------------------------------ on a model


def answer_logprobs(model, ids, labels, mask):
    """Per row, the summed log-probability of its learned tokens (those whose label is not IGNORE)."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits
    if logits.shape[1] > labels.shape[1]:
        logits = logits[:, -labels.shape[1] :]
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1)


def policy_and_reference_logprobs(model, ids, labels, mask):
    """answer_logprobs with the adapter (the policy) and without it (the reference, no gradient)."""
    import torch

    policy = answer_logprobs(model, ids, labels, mask)
    with torch.no_grad(), model.disable_adapter():
        reference = answer_logprobs(model, ids, labels, mask)
    return policy, reference


def dpo_loss(model, batch: list[dict], beta: float, pad_id: int, device):
    """DPO on a micro-batch of pairs; the reference model is the base itself, with the LoRA switched off."""
    rows = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
    ids, labels, mask = collate(rows, pad_id, device)
    policy, reference = policy_and_reference_logprobs(model, ids, labels, mask)
    n = len(batch)
    losses, margin = dpo_losses(policy[:n], policy[n:], reference[:n], reference[n:], beta)
    accuracy = float((margin > 0).float().mean())
    tokens = int((labels[:, 1:] != IGNORE).sum())
    return losses.sum(), n, tokens, {"reward_accuracy": accuracy, "reward_margin": float(beta * margin.mean())}


def kto_loss(model, batch: list[dict], beta: float, pad_id: int, device):
    """KTO on a micro-batch of labelled answers; the reference is the base itself, as in dpo_loss."""
    import torch

    ids, labels, mask = collate(batch, pad_id, device)
    policy, reference = policy_and_reference_logprobs(model, ids, labels, mask)
    desirable = torch.tensor([bool(b["desirable"]) for b in batch], device=policy.device)
    losses, ratios, kl = kto_losses(policy, reference, desirable, beta)
    tokens = int((labels[:, 1:] != IGNORE).sum())
    return losses.sum(), len(batch), tokens, kto_metrics(ratios, kl, desirable, beta)


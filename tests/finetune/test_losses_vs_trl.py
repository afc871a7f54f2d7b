"""The preference losses against TRL's own code on the same log-probabilities, so the hand-written loop keeps the
field's reference numbers (issue 33). TRL is a test dependency (the dev extra); nothing here re-implements its
formulas: TRL's DPOTrainer._compute_loss, KTOTrainer._compute_loss and ORPOTrainer.odds_ratio_loss run unbound on
a stand-in `self` carrying the settings they read, and on a stand-in model whose output carries the given
per-token log-probabilities (TRL's fused LM head returns `log_probs`; each answer's first learned token carries its
whole log-probability, the others 0, so TRL's sums are the given numbers).

Where the product and TRL differ by design (each documented beside the product's code):
- KTO's reference point z0: TRL estimates it from mismatched pairs (prompt i with answer i+1) run through the
  policy and the reference; Tunedeck from the batch's own answers. The test hands TRL the batch's own answers as
  its "KL" sequences, so both see the same z0, and then the losses must agree to the last digit.
- ORPO's NLL term: TRL averages the cross-entropy over every chosen token of the batch, prompt included;
  Tunedeck (like the paper and LLaMA-Factory) uses each chosen answer's own average, -lc. TRL computes the
  odds-ratio term, which is compared exactly.
"""
from collections import defaultdict
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from trl import DPOTrainer, KTOTrainer
from trl.experimental.orpo import ORPOTrainer

from finetune.losses import dpo_losses, kto_losses
from finetune.methods.orpo import orpo_losses

SEEDS = (0, 1, 2)
BETAS = (0.05, 0.1, 0.5)
WIDTH = 6  # tokens per stand-in sequence: the first is the prompt, the rest the answer


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, tensor):
        return tensor

    def gather(self, tensor):
        return tensor

    def unwrap_model(self, model):
        return model


class _LogProbModel:
    """Answers TRL's forward with given summed log-probabilities: per sequence, the first learned position holds
    the whole sum and the others 0. Keyed by the input_ids tensor TRL passes (KTO runs its KL sequences too)."""

    def __init__(self):
        self.training = True
        self.outputs = {}

    def give(self, input_ids, summed):
        per_token = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float64)
        per_token[:, 0] = summed
        self.outputs[id(input_ids)] = per_token

    def __call__(self, input_ids, **kwargs):
        per_token = self.outputs[id(input_ids)]
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(per_token, dtype=torch.bool), aux_loss=None)


def _sequences(rows: int):
    ids = torch.arange(rows * WIDTH).reshape(rows, WIDTH)
    completion = torch.ones_like(ids)
    completion[:, 0] = 0  # the prompt token
    return ids, torch.ones_like(ids), completion


def _trainer_self(model, beta, **settings):
    return SimpleNamespace(model=model, accelerator=_Accelerator(), beta=beta, aux_loss_enabled=False,
                           precompute_ref_logps=True, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1, **settings)


def _random_logps(seed: int, n: int):
    generator = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=generator, dtype=torch.float64) * 30 + 0.1) for _ in range(4)]


def trl_dpo(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta):
    """TRL's DPO (loss_type sigmoid, the default) on these summed log-probabilities: its mean over the pairs."""
    model = _LogProbModel()
    ids, mask, completion = _sequences(2 * len(policy_chosen))
    model.give(ids, torch.cat([policy_chosen, policy_rejected]))
    inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion,
              "ref_chosen_logps": reference_chosen, "ref_rejected_logps": reference_rejected}
    me = _trainer_self(model, beta, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
                       loss_weights=[1.0], use_weighting=False)
    return DPOTrainer._compute_loss(me, model, inputs, return_outputs=False)


def trl_kto(policy, reference, desirable, beta):
    """TRL's KTO (loss_type kto, weights 1) with the batch's own answers as its KL sequences."""
    model = _LogProbModel()
    ids, mask, completion = _sequences(len(policy))
    kl_ids = ids.clone()
    model.give(ids, policy)
    model.give(kl_ids, policy)
    inputs = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion, "label": desirable,
              "KL_input_ids": kl_ids, "KL_attention_mask": mask, "KL_completion_mask": completion,
              "ref_logps": reference, "ref_KL_logps": reference}
    me = _trainer_self(model, beta, calculate_KL=True, loss_type="kto", desirable_weight=1.0,
                       undesirable_weight=1.0)
    me._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(me, model, batch)
    return KTOTrainer._compute_loss(me, model, inputs, return_outputs=False)


def trl_odds_ratio(chosen, rejected, beta):
    """TRL's ORPO odds-ratio term per pair: beta * log sigmoid(log_odds) (its loss subtracts the mean)."""
    me = SimpleNamespace(beta=beta, accelerator=_Accelerator())
    losses, *_ = ORPOTrainer.odds_ratio_loss(me, chosen, rejected)
    return losses


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", BETAS)
def test_dpo_equals_trls_sigmoid_loss(seed, beta):
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = _random_logps(seed, 8)
    ours, _ = dpo_losses(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    theirs = trl_dpo(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    assert torch.allclose(ours.mean(), theirs, rtol=1e-12, atol=1e-12), (ours.mean(), theirs)
    for i in range(len(ours)):  # pair by pair too: one pair per TRL batch
        one = trl_dpo(policy_chosen[i:i + 1], policy_rejected[i:i + 1], reference_chosen[i:i + 1],
                      reference_rejected[i:i + 1], beta)
        assert torch.allclose(ours[i], one, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", BETAS)
def test_kto_equals_trls_loss_given_the_same_reference_point(seed, beta):
    policy, reference, _, _ = _random_logps(seed, 10)
    reference = policy - torch.linspace(-2.0, 3.0, 10, dtype=torch.float64)  # log-ratios of both signs
    desirable = torch.tensor([True, False] * 5)
    ours, _, kl = kto_losses(policy, reference, desirable, beta)
    theirs = trl_kto(policy, reference, desirable, beta)
    assert kl > 0, "the reference point is not clamped away in this case"
    assert torch.allclose(ours.mean(), theirs, rtol=1e-12, atol=1e-12), (ours.mean(), theirs)


def test_kto_reference_point_is_clamped_at_zero_like_trls():
    policy = torch.tensor([-5.0, -6.0, -7.0], dtype=torch.float64)
    reference = policy + 1.0  # every log-ratio -1: the mean KL estimate is negative, clamped to 0
    desirable = torch.tensor([True, False, True])
    ours, _, kl = kto_losses(policy, reference, desirable, 0.1)
    assert kl == 0
    assert torch.allclose(ours.mean(), trl_kto(policy, reference, desirable, 0.1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", BETAS)
def test_orpo_odds_ratio_term_equals_trls(seed, beta):
    generator = torch.Generator().manual_seed(seed)
    # length-averaged log-probabilities: both sides of -ln 2, where log(1 - e^x) switches formula. float32, as
    # TRL casts them (and as the product's answer_logprobs computes them).
    chosen = -(torch.rand(16, generator=generator) * 4 + 0.01)
    rejected = -(torch.rand(16, generator=generator) * 4 + 0.01)
    ours, _ = orpo_losses(chosen, rejected, beta)
    odds_ratio_term = trl_odds_ratio(chosen, rejected, beta)
    assert torch.allclose(ours, -chosen - odds_ratio_term, rtol=1e-6, atol=1e-6)
    # TRL's loss is nll - mean(odds_ratio_term); with nll = the chosen answers' mean NLL, ours is the same mean
    assert torch.allclose(ours.mean(), -chosen.mean() - odds_ratio_term.mean(), rtol=1e-6, atol=1e-6)


def test_orpo_stays_finite_where_an_answer_is_certain():
    chosen = torch.tensor([0.0, -1e-9, -0.5], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-2.0, -3.0, -0.4], dtype=torch.float64)
    losses, _ = orpo_losses(chosen, rejected, 0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()

"""The preference losses on log-probabilities alone, against the papers' formulas worked by hand."""
import math

import pytest

from finetune.losses import dpo_losses, kto_losses, kto_metrics

torch = pytest.importorskip("torch")


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_is_minus_log_sigmoid_of_the_scaled_margin():
    # The policy raised the chosen answer by 1 nat against the reference and lowered the rejected one by 1.
    losses, margin = dpo_losses(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0]),
                                torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), beta=0.1)
    assert margin.tolist() == pytest.approx([2.0, 0.0])
    assert losses.tolist() == pytest.approx([-math.log(_sigmoid(0.2)), math.log(2)])


def test_kto_compares_each_answer_with_the_batch_kl_which_carries_no_gradient():
    policy = torch.tensor([-1.0, -1.0, -4.0], requires_grad=True)
    reference = torch.tensor([-2.0, -2.0, -2.0])
    desirable = torch.tensor([True, False, False])
    losses, ratios, kl = kto_losses(policy, reference, desirable, beta=0.5)
    assert ratios.tolist() == pytest.approx([1.0, 1.0, -2.0])
    assert float(kl) == 0.0  # the mean log-ratio, 0, clamped at 0
    expected = [1 - _sigmoid(0.5 * 1.0), 1 - _sigmoid(0.5 * -1.0), 1 - _sigmoid(0.5 * 2.0)]
    assert losses.tolist() == pytest.approx(expected)
    losses.sum().backward()
    # d/dr of 1 - sigmoid(beta (r - z0)) alone: z0 is a constant, so no answer's gradient leaks into the others.
    s = _sigmoid(0.5)
    assert policy.grad.tolist() == pytest.approx([-0.5 * s * (1 - s), 0.5 * s * (1 - s), 0.5 * _sigmoid(1) * (1 - _sigmoid(1))])
    info = kto_metrics(ratios, kl, desirable, beta=0.5)
    assert info["reward_accuracy"] == pytest.approx(2 / 3)  # the desirable one above z0, one undesirable below
    assert info["reward_margin"] == pytest.approx(0.5 * 1.0 - 0.5 * (1.0 - 2.0) / 2)


def test_kto_reference_point_is_the_positive_mean_log_ratio():
    _, _, kl = kto_losses(torch.tensor([0.0, 1.0]), torch.tensor([-1.0, -1.0]), torch.tensor([True, False]), 0.1)
    assert float(kl) == pytest.approx(1.5)

"""LoRA's CPU dropout: an independent Bernoulli mask per element at the asked rate, the exact inverse scaling,
the gradient through the same mask, nothing in evaluation, and swapped in only where it applies."""
import pytest

torch = pytest.importorskip("torch")

from finetune import cpudropout  # noqa: E402
from finetune.methods import wrap_for_training  # noqa: E402
from finetune.modelstore import load_model_and_tokenizer  # noqa: E402

N = 1_000_003  # not a multiple of four: the last 64-bit draw is used in part


def _dropped(p, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    x = torch.rand(N, dtype=torch.float64).add_(1.0).to(dtype).requires_grad_()  # no zeros of its own
    layer = cpudropout.cpu_dropout(p).train()
    return x, layer(x)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keeps_each_element_with_probability_one_minus_p_and_scales_by_its_inverse(p):
    x, y = _dropped(p)
    kept = y != 0
    cut = round(p * 65536)
    assert cut / 65536 == pytest.approx(p, abs=1 / 65536)
    sigma = (p * (1 - p) / N) ** 0.5
    assert abs(1 - kept.double().mean().item() - p) < 5 * sigma
    # Each of the four elements a 64-bit draw serves, on its own, and neighbours uncorrelated.
    for lane in range(4):
        lane_rate = 1 - kept[lane::4].double().mean().item()
        assert abs(lane_rate - p) < 5 * (p * (1 - p) / (N / 4)) ** 0.5
    both = (kept[:-1] & kept[1:]).double().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * sigma
    scale = 65536 / (65536 - cut)
    assert torch.allclose(y[kept], x[kept] * scale)
    # Unbiased: the expectation of the output is the input's.
    assert y.double().mean().item() == pytest.approx(x.double().mean().item(), rel=5 * sigma / (1 - p) * 2)


def test_gradient_passes_through_the_same_mask_and_scale():
    x, y = _dropped(0.05)
    y.sum().backward()
    scale = 65536 / (65536 - round(0.05 * 65536))
    expected = (y != 0).float() * scale
    assert torch.equal(x.grad, expected)


def test_bf16_keeps_the_scale_exact_and_a_seed_repeats_the_mask():
    x, y = _dropped(0.05, dtype=torch.bfloat16)
    kept = y != 0
    scale = 65536 / (65536 - round(0.05 * 65536))
    assert torch.equal(y[kept], (x[kept].float() * scale).to(torch.bfloat16))
    _, again = _dropped(0.05, dtype=torch.bfloat16)
    assert torch.equal(again != 0, kept)
    _, other_seed = _dropped(0.05, dtype=torch.bfloat16, seed=1)
    assert not torch.equal(other_seed != 0, kept)


def test_evaluation_and_zero_rate_pass_the_input_through_and_rate_one_drops_all():
    x = torch.randn(4, 8)
    assert cpudropout.cpu_dropout(0.3).eval()(x) is x
    assert cpudropout.cpu_dropout(0.0).train()(x) is x
    assert torch.count_nonzero(cpudropout.cpu_dropout(1.0).train()(x)) == 0


def test_swapped_into_every_lora_layer_on_the_cpu_and_not_when_dropout_is_off(tiny_model_dir):
    model, _ = load_model_and_tokenizer(tiny_model_dir, device="cpu", dtype="float32")
    model = wrap_for_training(model, {"method": "lora", "rank": 4, "alpha": 8, "dropout": 0.1,
                                      "target_modules": "all-linear"})
    adapted = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)]
    assert cpudropout.use_on(model) == len(adapted) > 0
    assert all(type(m.lora_dropout["default"]).__name__ == "CpuDropout" for m in adapted)
    assert all(m.lora_dropout["default"].p == 0.1 for m in adapted)
    assert cpudropout.use_on(model) == 0  # already swapped

    plain, _ = load_model_and_tokenizer(tiny_model_dir, device="cpu", dtype="float32")
    plain = wrap_for_training(plain, {"method": "lora", "rank": 4, "alpha": 8, "dropout": 0.0,
                                      "target_modules": "all-linear"})
    assert cpudropout.use_on(plain) == 0

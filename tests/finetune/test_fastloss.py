"""The fused output-layer cross-entropy gives the same loss and gradients as the ordinary full-logits path."""
import pytest

torch = pytest.importorskip("torch")

from finetune import fastloss  # noqa: E402
from finetune.methods import wrap_for_training  # noqa: E402
from finetune.modelstore import load_model_and_tokenizer  # noqa: E402


@pytest.mark.parametrize("rows", [1, 3, 1000])
def test_linear_cross_entropy_matches_torch_in_value_and_gradients(rows):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=g)

    fused = fastloss.linear_cross_entropy(hidden, weight, targets, chunk_rows=rows)
    (2.5 * fused).backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (2.5 * reference).backward()
    assert torch.allclose(fused, reference)
    assert torch.allclose(fused_grads[0], hidden.grad)
    assert torch.allclose(fused_grads[1], weight.grad)


def test_frozen_output_layer_gets_no_gradient_and_no_grad_mode_computes_none():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(30, 8)  # frozen, as the output layer is under LoRA
    loss = fastloss.linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 4, 5]))
    loss.backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        value = fastloss.linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 4, 5]))
    assert torch.allclose(value, loss.detach())


def _batch(tokenizer):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, -100, 13, 14, -100, -100]])
    return ids, labels, mask


@pytest.mark.parametrize("fixture,method", [("tiny_model_dir", "lora"), ("tiny_model_dir", "dora"),
                                            ("tiny_gpt2_dir", "lora"), ("tiny_model_dir", "ia3")])
def test_training_loss_and_adapter_gradients_equal_the_full_logits_path(request, fixture, method):
    folder = request.getfixturevalue(fixture)
    model, tokenizer = load_model_and_tokenizer(folder, device="cpu", dtype="float32")
    model = wrap_for_training(model, {"method": method, "rank": 4, "alpha": 8, "dropout": 0.0,
                                      "target_modules": "all-linear"})
    model.train()
    assert fastloss.loss_path(model) == "fused-linear-cross-entropy"
    ids, labels, mask = _batch(tokenizer)

    def loss_and_grads(fn):
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks on both paths (GPT-2 has dropout in its body)
        loss, n = fn(model, ids, labels, mask)
        loss.backward()
        return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    fused, n_fused, g_fused = loss_and_grads(fastloss.token_loss_sum)
    full, n_full, g_full = loss_and_grads(fastloss.full_logits_loss_sum)
    assert n_fused == n_full == 5
    assert torch.allclose(fused, full, rtol=1e-5, atol=1e-5)
    for name in g_full:
        assert torch.allclose(g_fused[name], g_full[name], rtol=1e-4, atol=1e-6), name


def test_prompt_tuning_uses_the_full_logits_path(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, device="cpu", dtype="float32")
    model = wrap_for_training(model, {"method": "prompt", "num_virtual_tokens": 4})
    assert fastloss.loss_path(model) == "full-logits"
    ids, labels, mask = _batch(tokenizer)
    loss, n = fastloss.token_loss_sum(model, ids, labels, mask)
    assert n == 5 and torch.isfinite(loss)


@pytest.mark.parametrize("fused", [True, False])
def test_a_packed_row_trains_exactly_like_its_examples_one_by_one(tiny_model_dir, fused):
    from finetune.train import collate, pack, packed_positions

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, device="cpu", dtype="float32")
    model = wrap_for_training(model, {"method": "lora", "rank": 4, "alpha": 8, "dropout": 0.0,
                                      "target_modules": "all-linear"})
    model.eval()
    loss_fn = fastloss.token_loss_sum if fused else fastloss.full_logits_loss_sum
    examples = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
        {"input_ids": [20, 21, 22, 23, 24, 25, 26], "labels": [-100, -100, -100, -100, 24, 25, 26]},
        {"input_ids": [30, 31, 32], "labels": [-100, 31, 32]},
    ]
    separate = sum(float(loss_fn(model, *collate([ex], 0, "cpu"))[0]) for ex in examples)

    rows = pack([dict(ex) for ex in examples], max_seq_len=12)
    rows.append({"input_ids": [40, 41], "labels": [-100, 41], "segments": [2]})  # a shorter row: padding
    ids, labels, mask = collate(rows, 0, "cpu")
    positions = packed_positions(rows, ids.shape[1], "cpu")
    packed, n = loss_fn(model, ids, labels, mask, positions)
    alone = float(loss_fn(model, *collate([rows[-1]], 0, "cpu"))[0])

    assert [r["segments"] for r in rows[:-1]] == [[7, 5], [3]]
    assert n == 3 + 3 + 2 + 1
    assert float(packed) == pytest.approx(separate + alone, rel=1e-5)
    # Without the restarting positions the examples would attend to each other, and the loss would differ.
    crossed, _ = loss_fn(model, ids, labels, mask)
    assert float(crossed) != pytest.approx(separate + alone, rel=1e-3)


def test_packing_check_accepts_architectures_that_isolate_packed_examples(tiny_model_dir, tiny_gpt2_dir):
    from finetune.train import packing_isolates_examples

    llama, _ = load_model_and_tokenizer(tiny_model_dir, device="cpu", dtype="float32")
    assert packing_isolates_examples(llama, llama.device) is True
    gpt2, _ = load_model_and_tokenizer(tiny_gpt2_dir, device="cpu", dtype="float32")
    assert packing_isolates_examples(gpt2, gpt2.device) is True


def test_packing_check_refuses_a_model_whose_attention_crosses_examples(tiny_model_dir):
    from finetune.train import packing_isolates_examples

    class IgnoresPositions(torch.nn.Module):  # what an architecture without packed-sequence masks does
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, use_cache=False):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    llama, _ = load_model_and_tokenizer(tiny_model_dir, device="cpu", dtype="float32")
    assert packing_isolates_examples(IgnoresPositions(llama), llama.device) is False

"""A run that learns nothing fails loudly, and QLoRA learns whatever the CPU's features.

bitsandbytes repacks 4-bit weights for CPU inference on AVX512-BF16 CPUs (and only there) after an evaluation
forward, and the repacked path passes no gradient back. These tests exercise both sides on every CPU: the repacking
is prevented for models being trained, and a layer that was repacked anyway is restored."""
import pytest
import torch

from finetune import fourbit
from finetune.errors import TrainingError
from finetune.train import TrainSpec, evaluate, load_encoded, load_for_training, token_loss_sum, train
from tinymodel import learnable_chat_rows, write_jsonl


@pytest.fixture
def files(tmp_path):
    return (write_jsonl(tmp_path / "train.jsonl", learnable_chat_rows(32)),
            write_jsonl(tmp_path / "eval.jsonl", learnable_chat_rows(8)))


def _spec(model_dir, files, tmp_path, **plan):
    base = {"method": "lora", "rank": 8, "alpha": 16, "micro_batch": 8, "max_seq_len": 64, "learning_rate": 1e-2,
            "max_steps": 8, "warmup_ratio": 0.0, "max_eval_generations": 0}
    return TrainSpec.from_plan({**base, **plan}, base_model_path=str(model_dir), train_file=str(files[0]),
                               eval_file=str(files[1]), output_dir=str(tmp_path / "adapter"))


def _lora_b_with_gradient(model, spec, tokenizer):
    rows, _ = load_encoded(spec.train_file, tokenizer, spec, limit=4)
    from finetune.train import collate

    ids, labels, mask = collate(rows, tokenizer.pad_token_id, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    loss, n = token_loss_sum(model, ids, labels, mask)
    (loss / n).backward()
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    return sum(1 for p in lora_b if p.grad is not None and p.grad.abs().sum() > 0), len(lora_b)


def test_qlora_evaluated_before_training_still_gets_gradients(tiny_model_dir, files, tmp_path, record_property):
    spec = _spec(tiny_model_dir, files, tmp_path, method="qlora")
    model, tokenizer = load_for_training(spec)
    layers = fourbit.four_bit_layers(model)
    assert layers, "QLoRA must load the base in 4-bit"
    record_property("bitsandbytes_cpu_path", fourbit.cpu_kernel_path())
    # What the product does before the first step: an evaluation in eval mode, under no_grad.
    eval_rows, _ = load_encoded(spec.eval_file, tokenizer, spec)
    evaluate(model, eval_rows, spec, tokenizer.pad_token_id)
    assert model.training
    assert not any(fourbit.is_repacked_for_cpu_inference(layer) for layer in layers)
    with_grad, total = _lora_b_with_gradient(model, spec, tokenizer)
    assert with_grad == total > 0


def test_a_layer_repacked_for_inference_is_restored_and_learns(tiny_model_dir, files, tmp_path):
    """What bitsandbytes does on an AVX512-BF16 CPU, done by hand so every CPU runs this path."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit

    spec = _spec(tiny_model_dir, files, tmp_path, method="qlora")
    model, tokenizer = load_for_training(spec)
    layers = fourbit.four_bit_layers(model)
    before = [dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone() for layer in layers]
    for layer in layers:
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state)
    assert all(fourbit.is_repacked_for_cpu_inference(layer) for layer in layers)

    assert fourbit.keep_trainable(model) == len(layers)
    after = [dequantize_4bit(layer.weight.data, layer.weight.quant_state) for layer in layers]
    for b, a in zip(before, after):
        # The round trip re-quantises the nested absmax statistics: the weights agree to bf16-like precision.
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    with_grad, total = _lora_b_with_gradient(model, spec, tokenizer)
    assert with_grad == total > 0


def test_qlora_run_learns_with_an_evaluation_before_training(tiny_model_dir, files, tmp_path):
    result = train(_spec(tiny_model_dir, files, tmp_path, method="qlora", max_steps=10))
    assert result.status == "succeeded"
    assert result.metrics["eval_loss"] < result.metrics["initial_eval_loss"]


def test_no_gradient_fails_the_run_instead_of_saving_the_base(tiny_model_dir, files, tmp_path, monkeypatch):
    """A fault that zeroes every gradient (as the repacked 4-bit path did) must not end in a 'succeeded' run."""
    import finetune.train as train_module

    real_load = train_module.load_for_training

    def load_with_dead_gradients(spec):
        model, tokenizer = real_load(spec)
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(torch.zeros_like)
        return model, tokenizer

    monkeypatch.setattr(train_module, "load_for_training", load_with_dead_gradients)
    progress = []
    with pytest.raises(TrainingError, match="No trainable parameter received a gradient in the first 3"):
        train(_spec(tiny_model_dir, files, tmp_path), on_progress=progress.append)
    assert max(p["step"] for p in progress) < 3  # stopped at the third step, before reporting it
    assert not (tmp_path / "adapter").exists()


def test_weights_that_never_move_fail_the_run(tiny_model_dir, files, tmp_path):
    # A learning rate that rounds every update to nothing in fp32: gradients flow, the adapter never changes.
    with pytest.raises(TrainingError, match="weights are unchanged after 4 optimizer steps"):
        train(_spec(tiny_model_dir, files, tmp_path, learning_rate=1e-46, max_steps=4))
    assert not (tmp_path / "adapter").exists()


def test_fp16_trains_with_a_gradient_scaler(tiny_model_dir, files, tmp_path):
    spec = _spec(tiny_model_dir, files, tmp_path, dtype="fp16", max_steps=10)
    result = train(spec)
    assert result.status == "succeeded"
    assert result.metrics["eval_loss"] < result.metrics["initial_eval_loss"]

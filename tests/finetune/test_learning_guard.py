"""A run that learns nothing, or whose adapter mostly cannot learn, fails loudly; QLoRA learns whatever the CPU.

bitsandbytes repacks 4-bit weights for CPU inference on AVX512-BF16 CPUs (and only there) after an evaluation
forward, and the repacked path passes no gradient back. These tests exercise both sides on every CPU: the repacking
is prevented for models being trained, a layer that was repacked anyway is restored, and a run where the repacking
happens anyway (the workaround switched off) fails with the learning guard's message (finetune/learning_guard.py).
"""
import pytest
import torch
from tinymodel import learnable_chat_rows, write_jsonl

from finetune import fourbit
from finetune.errors import TrainingError
from finetune.learning_guard import LearningGuard
from finetune.train import TrainSpec, evaluate, load_encoded, load_for_training, token_loss_sum, train


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


# ------------------------------------------------------------------------------------------ the real fault


def _unpack_cpu_layout(packed, shape, absmax, code, blocksize):
    """The weights of bitsandbytes' AVX512-BF16 CPU layout (functional._convert_weight_packed_for_cpu), in bf16."""
    n, k = shape
    rows = packed.contiguous().view(torch.uint8).reshape(-1, 32)
    nibbles = torch.cat([rows & 0xF, rows >> 4], dim=1)  # the packing puts 32 low nibbles, then 32 high ones
    codes = nibbles.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k).long()
    scales = absmax.float().T.reshape(n, k // blocksize, 1)  # the packing stores absmax as [k / blocksize, n]
    return (code.float()[codes].reshape(n, k // blocksize, blocksize) * scales).reshape(n, k).to(torch.bfloat16)


def _native_cpu_gemv(A, B, shapeB, absmax, code, blocksize):
    """Stands in for bitsandbytes' native AVX512-BF16 kernel (backends/cpu/ops.py, registered only on such CPUs):
    the same bf16 product from the same packed bytes, computed out of autograd's sight as a C++ kernel is."""
    with torch.no_grad():
        return A.detach().to(torch.bfloat16) @ _unpack_cpu_layout(B, shapeB, absmax, code, blocksize).T


@pytest.fixture
def avx512_bf16_bitsandbytes(monkeypatch):
    """bitsandbytes as it runs on an AVX512-BF16 CPU without Tunedeck's workaround: its Linear4bit layers repack
    their weights in their own forward (the evaluation before training does it), and the packed product is a
    kernel autograd cannot see. On a CPU without AVX512-BF16 the kernel is the stand-in above (bitsandbytes' own
    default kernel for that op is plain torch and would pass gradients); on one with it, bitsandbytes' own."""
    from bitsandbytes.functional import has_avx512bf16

    def advertise_avx512_bf16(model):
        for layer in fourbit.four_bit_layers(model):
            layer.support_avx512bf16_for_cpu = True
        return 0

    monkeypatch.setattr(fourbit, "keep_trainable", advertise_avx512_bf16)
    library = None
    if not has_avx512bf16():
        library = torch.library.Library("bitsandbytes", "FRAGMENT")
        torch.library.register_kernel("bitsandbytes::gemv_4bit", "cpu", _native_cpu_gemv, lib=library)
    yield
    if library is not None:
        library._destroy()


def test_the_stand_in_kernel_computes_bitsandbytes_packed_product(tiny_model_dir, files, tmp_path):
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit

    spec = _spec(tiny_model_dir, files, tmp_path, method="qlora")
    model, _ = load_for_training(spec)
    layer = fourbit.four_bit_layers(model)[0]
    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    packed, state = _convert_weight_packed_for_cpu(layer.weight.data.clone(), layer.weight.quant_state)
    x = torch.randn(3, weight.shape[1])
    product = _native_cpu_gemv(x, packed, state.shape, state.absmax, state.code, state.blocksize)
    torch.testing.assert_close(product.float(), x @ weight.T, rtol=3e-2, atol=3e-2)


def test_qlora_with_bitsandbytes_cpu_repacking_fails_with_the_guards_message(
        tiny_model_dir, files, tmp_path, avx512_bf16_bitsandbytes):
    """Only the LoRA weights writing straight into the residual stream (o_proj, down_proj) get a gradient at first;
    the loss still falls (7.6 to 2.6 on this task), so neither "no gradient at all" nor "weights unchanged" nor
    the validation check would stop it: the per-tensor count must."""
    with pytest.raises(TrainingError, match=r"20 of the adapter's 28 trainable tensors received no gradient") as err:
        train(_spec(tiny_model_dir, files, tmp_path, method="qlora"))
    assert "layers.0.self_attn.q_proj.lora_B" in str(err.value) and "o_proj" not in str(err.value)
    assert not (tmp_path / "adapter").exists()


def test_every_tensor_is_judged_at_its_first_due_step():
    """LoRA's A gets no gradient while its B is still zero; it is judged at the step after B first moved."""
    lora_a = torch.nn.Parameter(torch.ones(2, 2))
    lora_b = torch.nn.Parameter(torch.zeros(2, 2))
    guard = LearningGuard([("q_proj.lora_A.default.weight", lora_a), ("q_proj.lora_B.default.weight", lora_b)])
    lora_b.grad = torch.ones(2, 2)
    guard.after_step(1.0)  # B is due and has its gradient; say the update left B at zero (a tiny step)
    assert guard.got_gradient == {1: True} and not guard.partners_free
    with torch.no_grad():
        lora_b.add_(0.1)  # this step's update moves B
    lora_a.grad = torch.zeros(2, 2)
    guard.after_step(1.0)  # so A was still held back in this step: not judged, due from the next one
    assert guard.got_gradient == {1: True} and guard.partners_free
    guard.after_step(float("inf"))  # a step the fp16 scaler skipped is not counted
    assert 0 not in guard.got_gradient
    lora_a.grad = torch.ones(2, 2)
    guard.after_step(1.0)
    assert guard.got_gradient == {0: True, 1: True} and guard.decided


def test_a_run_whose_validation_never_improves_fails(tiny_model_dir, files, tmp_path):
    # A learning rate far too high: the adapter moves a lot and the validation loss only gets worse.
    with pytest.raises(TrainingError, match="validation loss never went below the base model's") as err:
        train(_spec(tiny_model_dir, files, tmp_path, learning_rate=30.0, max_steps=8, eval_every_steps=4))
    assert "no better than the base model" in str(err.value)
    assert not (tmp_path / "adapter").exists()


def test_more_validation_answers_right_than_the_base_model_is_learning_even_at_a_higher_loss():
    """Early stopping on exact match may keep a checkpoint whose loss is above the base model's (a label's loss
    rises on the rows still wrong while more rows come right): that adapter learned, and is saved."""
    guard = LearningGuard([("q_proj.lora_B.default.weight", torch.nn.Parameter(torch.zeros(2, 2)))])
    guard.steps = 10
    base = {"eval_loss": 2.0, "val_exact_match": 0.25}
    guard.check_validation_improved(base, {"step": 10, "eval": {"eval_loss": 2.5, "val_exact_match": 0.5}})
    with pytest.raises(TrainingError, match=r"never went below the base model's 2.0000 .* and its greedy answers "
                                            r"were right no more often \(0.25\)"):
        guard.check_validation_improved(base, {"step": 10, "eval": {"eval_loss": 2.5, "val_exact_match": 0.25}})

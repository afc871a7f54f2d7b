"""Batch order and learning-rate schedule: the choices bench/train_quality.py found to cost held-out quality."""
import random

import pytest

from finetune.train import TrainSpec, _lr_at, batch_order, length_window_batches


def _spread(batches, rank):
    """Mean over micro-batches of (highest - lowest length rank inside it): small means each batch is one run."""
    return sum(max(rank[i] for i in b) - min(rank[i] for i in b) for b in batches) / len(batches)


def _lengths(n, seed=0):
    rng = random.Random(seed)
    lengths = [rng.randint(10, 500) for _ in range(n)]
    order = sorted(range(n), key=lambda i: lengths[i])
    return lengths, {i: r for r, i in enumerate(order)}


def test_every_row_once_per_epoch_and_the_order_depends_only_on_seed_and_epoch():
    lengths, _ = _lengths(100)
    first = batch_order(100, 8, seed=3, epoch=0, lengths=lengths)
    assert sorted(i for b in first for i in b) == list(range(100))
    assert first == batch_order(100, 8, seed=3, epoch=0, lengths=lengths)
    assert first != batch_order(100, 8, seed=3, epoch=1, lengths=lengths)


def test_a_small_dataset_is_never_sorted_whole_into_one_length_order():
    lengths, rank = _lengths(400)
    legacy = batch_order(400, 8, 42, 0, lengths, window_batches=64, min_windows=1)
    today = batch_order(400, 8, 42, 0, lengths)
    # The old rule: 400 rows < one window of 512, so every micro-batch was 8 neighbours in length order.
    assert _spread(legacy, rank) < 10
    # Now at least 16 windows per epoch: 50 micro-batches give windows of 3, so batches mix lengths widely.
    assert length_window_batches(400, 8, 64) == 3
    assert _spread(today, rank) > 4 * _spread(legacy, rank)


def test_tiny_datasets_are_plainly_shuffled():
    assert length_window_batches(96, 8, 64) == 1
    assert length_window_batches(96, 8, 64, min_windows=1) == 12
    assert length_window_batches(1000, 8, 0) == 1


def test_large_datasets_keep_the_padding_saving():
    n, micro = 8 * 64 * 16, 8
    lengths, _ = _lengths(n)
    assert length_window_batches(n, micro, 64) == 64

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = padding(batch_order(n, micro, 1, 0, lengths))
    shuffled = padding(batch_order(n, micro, 1, 0, lengths, window_batches=0))
    assert grouped < 0.1 * shuffled


def test_constant_schedule_after_warmup_is_the_default():
    assert TrainSpec.lr_schedule == "constant"
    assert [_lr_at(s, 100, 4, 1.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert all(_lr_at(s, 100, 4, 1.0, "constant") == 1.0 for s in range(4, 100))


def test_cosine_schedule_decays_to_its_floor():
    assert _lr_at(4, 100, 4, 1.0, "cosine", 0.1) == pytest.approx(1.0)
    assert _lr_at(99, 100, 4, 1.0, "cosine", 0.1) == pytest.approx(0.1, abs=1e-3)
    assert _lr_at(99, 100, 4, 1.0, "cosine", 0.0) < 1e-3


def test_a_plan_can_turn_the_fused_loss_off(tiny_model_dir, tmp_path):
    from tinymodel import learnable_chat_rows, write_jsonl

    from finetune import fastloss
    from finetune.train import load_for_training

    def loss_path(plan):
        spec = TrainSpec.from_plan({"method": "lora", "rank": 4, "alpha": 8, **plan},
                                   base_model_path=str(tiny_model_dir), output_dir=str(tmp_path / "out"),
                                   train_file=str(write_jsonl(tmp_path / "t.jsonl", learnable_chat_rows(4))))
        return fastloss.loss_path(load_for_training(spec)[0])

    assert loss_path({}) == "fused-linear-cross-entropy"
    assert loss_path({"fused_cross_entropy": False}) == "full-logits"

"""The learning guard: a run that learns nothing, or whose adapter mostly cannot learn, fails with a message a user
can act on instead of "succeeding" with an adapter that is (nearly) the base model. Such a run never becomes a
version. finetune.train calls after_step once per optimizer step and check_finished before saving.

What it checks:
- some trainable tensor received a gradient in the first optimizer steps;
- per tensor, a non-zero gradient at the first step where it can have one, for all but a small share of them;
- the weights moved;
- with a validation split, the best validation loss is below the base model's (measured before training).

When a tensor can first have a gradient: methods that start from the base model have trainable tensors that start
at zero (LoRA's and DoRA's B, the adapter layers' up-projection), and those zeros hold back the gradient of their
partners (LoRA's A, the down-projection) until their first update. So the tensors that start at zero are due at
the first step, every other tensor at the first step after one of them has moved (or at the first step when none
starts at zero: IA3, prefix and prompt tuning, a resumed run). Counting gradients over a few steps instead would
miss the fault this guards against: bitsandbytes' CPU-repacked 4-bit layers pass no gradient to their input, so
only the LoRA weights writing straight into the residual stream (o_proj, down_proj) learn at first, and from the
second step a trickle reaches the others through those few LoRA weights. Steps whose gradients are not finite
(the fp16 gradient scaler skips them, nothing moves) are not counted.
"""
from __future__ import annotations

import math

from .errors import TrainingError

# How many optimizer steps may pass without any gradient before a run is declared to be learning nothing.
STEPS_BEFORE_NO_GRADIENT_IS_AN_ERROR = 3

# A run fails when more than this share of its trainable tensors got no gradient when due. A healthy run has none:
# every tensor of every method gets one at its first due step. Some may legitimately miss it (a mixture-of-experts
# expert no token was routed to, a vision tower "all-linear" targets in a model trained on text), but they are a
# minority; a broken gradient path silences most of the adapter (bitsandbytes' repacked 4-bit layers: 20 of the
# tiny test model's 28 LoRA tensors, every q/k/v/gate/up one).
MAX_SHARE_WITHOUT_GRADIENT = 0.5
NAMES_IN_MESSAGE = 6


def short_name(name: str) -> str:
    """'base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight' -> 'layers.0.mlp.up_proj.lora_A'"""
    for prefix in ("base_model.model.", "model."):
        name = name.removeprefix(prefix)
    return name.replace(".default", "").removesuffix(".weight")


class LearningGuard:
    """Built once per training attempt from the model's trainable (name, tensor) pairs, before the first step."""

    def __init__(self, named_params):
        self.names = [short_name(name) for name, _ in named_params]
        self.params = [p for _, p in named_params]
        self.start = self._fingerprint()
        self.steps = 0
        self.saw_gradient = False
        self.starts_at_zero = [square_sum == 0.0 for _, square_sum in self.start]
        self.partners_free = not any(self.starts_at_zero)  # no zero tensor holds a gradient back (any more)
        self.got_gradient: dict[int, bool] = {}  # tensor index -> non-zero gradient at its first due step
        self.decided = False

    def _fingerprint(self) -> list[tuple[float, float]]:
        # Sum and sum of squares per tensor in float64: equal before and after only if nothing moved, without
        # keeping a copy of every weight.
        return [(float(p.detach().double().sum()), float(p.detach().double().square().sum())) for p in self.params]

    # ---------------------------------------------------------------- during training

    def after_step(self, grad_norm: float) -> None:
        """After the optimizer step (the gradients are still on the tensors)."""
        self.steps += 1
        counted = math.isfinite(grad_norm) and grad_norm > 0
        self.saw_gradient = self.saw_gradient or counted
        if not self.saw_gradient and self.steps >= STEPS_BEFORE_NO_GRADIENT_IS_AN_ERROR:
            raise TrainingError(
                f"No trainable parameter received a gradient in the first {self.steps} optimizer steps (gradient "
                "norm 0), so this run would learn nothing. The job was stopped instead of saving an adapter that "
                "is the base model; please report it with the job's log.")
        if counted and not self.decided:
            self._note_gradients()

    def _note_gradients(self) -> None:
        due = [i for i in range(len(self.params))
               if i not in self.got_gradient and (self.partners_free or self.starts_at_zero[i])]
        for i in due:
            grad = self.params[i].grad
            self.got_gradient[i] = grad is not None and bool(grad.count_nonzero())
        if not self.partners_free:
            self.partners_free = any(bool(p.detach().count_nonzero())
                                     for p, zero in zip(self.params, self.starts_at_zero) if zero)
        if len(self.got_gradient) == len(self.params):
            self._decide()

    def _decide(self) -> None:
        """Fails the run when too many of the tensors judged so far got no gradient when due."""
        self.decided = True
        missing = [self.names[i] for i, got in sorted(self.got_gradient.items()) if not got]
        if len(missing) <= MAX_SHARE_WITHOUT_GRADIENT * len(self.got_gradient):
            return
        shown = ", ".join(missing[:NAMES_IN_MESSAGE])
        more = f" and {len(missing) - NAMES_IN_MESSAGE} more" if len(missing) > NAMES_IN_MESSAGE else ""
        raise TrainingError(
            f"{len(missing)} of the adapter's {len(self.got_gradient)} trainable tensors received no gradient when "
            f"they should have ({shown}{more}); more than {MAX_SHARE_WITHOUT_GRADIENT:.0%} means part of the model "
            "passes no gradient back, so most of the adapter would never learn. The job was stopped instead of "
            "saving it; please report it with the job's log.")

    # ---------------------------------------------------------------- before saving

    def check_finished(self, initial_eval: dict, best: dict | None) -> None:
        """Before the adapter is saved: judges the tensors seen so far (a run shorter than the due steps), then
        checks that the weights moved and that validation beat the base model."""
        if self.got_gradient and not self.decided:
            self._decide()
        self.check_weights_moved()
        self.check_validation_improved(initial_eval, best)

    def check_weights_moved(self) -> None:
        if self.steps and self._fingerprint() == self.start:
            raise TrainingError(
                f"The adapter's weights are unchanged after {self.steps} optimizer steps, so it is the base model. "
                "No version was saved; check the learning rate and please report it with the job's log.")

    def check_validation_improved(self, initial_eval: dict, best: dict | None) -> None:
        """initial_eval: the base model's evaluation ({} without a validation split, or on a resumed run);
        best: {"step", "eval"} of the best evaluation during training (finetune.train.track_best), or None."""
        initial = (initial_eval or {}).get("eval_loss")
        if initial is None or not math.isfinite(initial) or not self.steps:
            return
        if best is None:
            raise TrainingError(
                f"The validation loss was never a finite number after training started (the base model's was "
                f"{initial:.4f}): the training diverged. No version was saved; try a lower learning rate.")
        best_loss = best["eval"]["eval_loss"]
        if best_loss < initial or _answers_improved(initial_eval, best["eval"]):
            return
        answers = "" if "val_exact_match" not in best["eval"] else \
            f" and its greedy answers were right no more often ({best['eval']['val_exact_match']:.3g})"
        raise TrainingError(
            f"The validation loss never went below the base model's {initial:.4f} (the best was {best_loss:.4f}, "
            f"at step {best['step']}){answers}, so this adapter would answer your validation rows no better than the base "
            "model. No version was saved. Try another learning rate or more steps, and check that the validation "
            "rows are like the training rows.")


def _answers_improved(initial_eval: dict, best_eval: dict) -> bool:
    """More validation answers right than the base model got (when early stopping watched exact match)."""
    before, after = initial_eval.get("val_exact_match"), best_eval.get("val_exact_match")
    return before is not None and after is not None and after > before

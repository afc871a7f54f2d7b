"""Cross-entropy on the learned tokens only, without ever materialising the vocabulary-wide logits.

A causal LM's output layer turns every position's hidden state into logits over the whole vocabulary: with a
128k vocabulary that is the largest tensor of a training step (batch x seq x 128k, upcast to fp32), and with
completion-only training most of it belongs to prompt tokens whose loss is thrown away. Here the transformer
body runs as usual, the hidden states of the positions that carry a label are picked out, and the output layer
plus cross-entropy run over them chunk by chunk; each chunk's gradient with respect to its hidden states is
computed in the forward pass (as Liger's fused linear cross-entropy does), so backward needs no logits either.
Same FLOPs on the kept positions as the usual path, none on the others, memory bounded by one chunk.

Models whose logits are not a plain linear map of the last hidden state (soft-capped or scaled logits, a biased
or adapted output layer, virtual tokens in front) use the ordinary path; `loss_path()` says which one a model
gets, and training reports it.
"""
from __future__ import annotations

IGNORE = -100
FP32 = 4
MIN_CHUNK_ROWS = 256  # smaller matmuls were measured slower (chunk_rows_for)
CHUNK_BYTES = 256 * 1024**2  # at most this much fp32 logits per chunk: 512 rows at a 128k vocabulary

# Config fields that mean the logits are not just hidden @ weight.T.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _causal_lm(model):
    """The transformers *ForCausalLM inside a peft wrapper (or the model itself)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner


def use_full_logits(model) -> None:
    """Opts a model out of the fused loss (a plan with fused_cross_entropy false): the ordinary path runs."""
    _causal_lm(model).tunedeck_full_logits = True


def fused_parts(model):
    """(body, output weight) when the fused loss applies to this model, else None."""
    import torch

    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        config = next(iter(peft_config.values()))
        if getattr(config, "is_prompt_learning", False):
            return None  # prompt/prefix tuning: peft's own forward inserts virtual tokens or past key/values
    lm = _causal_lm(model)
    if getattr(lm, "tunedeck_full_logits", False):
        return None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    config = lm.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    body = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    if body is None or body is lm:
        return None
    return body, head.weight


def loss_path(model) -> str:
    return "fused-linear-cross-entropy" if fused_parts(model) else "full-logits"


def _inputs(ids, mask, position_ids):
    # Packed rows: restarting positions and no 2-D mask make transformers build a block-diagonal causal mask.
    if position_ids is not None:
        # (Only without a cache: with one, transformers does not look for packed sequences.)
        return {"input_ids": ids, "position_ids": position_ids, "use_cache": False}
    return {"input_ids": ids, "attention_mask": mask}


def token_loss_sum(model, ids, labels, mask, position_ids=None):
    """Summed cross-entropy over the tokens whose label is not IGNORE, and their count."""
    parts = fused_parts(model)
    if parts is None:
        return full_logits_loss_sum(model, ids, labels, mask, position_ids)
    body, weight = parts
    hidden = body(**_inputs(ids, mask, position_ids)).last_hidden_state
    targets = labels[:, 1:]
    keep = (targets != IGNORE).nonzero(as_tuple=True)  # one device sync for the index, the count and the gather
    picked = hidden[:, :-1][keep]
    count = picked.shape[0]
    if count == 0:
        return picked.sum() * 0.0, 0
    return linear_cross_entropy(picked, weight, targets[keep]), count


def full_logits_loss_sum(model, ids, labels, mask, position_ids=None):
    import torch.nn.functional as F

    logits = model(**_inputs(ids, mask, position_ids)).logits
    if logits.shape[1] > labels.shape[1]:  # prompt tuning puts virtual tokens in front
        logits = logits[:, -labels.shape[1] :]
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    keep = shift_labels != IGNORE
    return F.cross_entropy(shift_logits[keep].float(), shift_labels[keep], reduction="sum"), int(keep.sum())


def chunk_rows_for(n_rows: int, vocab: int, hidden: int) -> int:
    """Liger's rule (about vocab/hidden chunks, a power of two rows each), bounded below by MIN_CHUNK_ROWS
    (smaller matmuls were measured slower: on the CPU, SmolLM2's 2,048 labelled rows took 1.58 s in chunks of 64,
    1.15 s in chunks of 256, against 2.21 s for the full logits) and above by CHUNK_BYTES of fp32 logits (but 64
    rows at least). autotune's estimate costs the logits with this very rule, so the memory the planner predicts is
    the memory this loss takes."""
    chunks = max(1, -(-vocab // hidden))
    rows = 1 << max(0, (-(-n_rows // chunks) - 1).bit_length())
    ceiling = max(64, CHUNK_BYTES // (FP32 * vocab))
    return max(1, min(max(rows, MIN_CHUNK_ROWS), ceiling))


def linear_cross_entropy(hidden, weight, targets, chunk_rows: int | None = None):
    """sum_i CE(hidden[i] @ weight.T, targets[i]) with at most chunk_rows rows of logits alive at once."""
    rows = chunk_rows or chunk_rows_for(hidden.shape[0], weight.shape[0], weight.shape[1])
    return _LinearCrossEntropy.apply(hidden, weight, targets, rows)


def _function():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, rows):
            need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # at least fp32
            total = torch.zeros((), dtype=acc, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start : start + rows]
                t = targets[start : start + rows]
                logits = (h @ weight.t()).to(acc)
                # One kernel (logsumexp, then sub_ and exp_, took 151 against 141 ms for SmolLM2's 512 rows on the
                # CPU); the fp32 logits and their log-softmax are the two chunk-sized buffers the estimate counts.
                logp = torch.log_softmax(logits, dim=-1)
                logits = None
                total -= logp.gather(1, t.unsqueeze(1)).sum()
                if need_hidden or need_weight:
                    # d(sum CE)/d(logits) = softmax - one_hot, formed in place over the log-softmax.
                    grad = logp.exp_()
                    grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    grad = grad.to(h.dtype)
                    logp = None  # the fp32 gradient, done with once its copy exists
                    if need_hidden:
                        grad_hidden[start : start + rows] = grad @ weight
                    if need_weight:
                        grad_weight += (grad.t() @ h).to(acc)
                logp = grad = None  # before the next chunk's matmul: one chunk alive at a time (as estimated)
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
            return total

        @staticmethod
        def backward(ctx, grad_output):
            grad_hidden, grad_weight = ctx.saved_tensors
            gh = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
            gw = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
            return gh, gw, None, None

    return LinearCrossEntropy


class _Lazy:
    """Builds the autograd Function on first use, so importing this module does not import torch."""

    _fn = None

    @classmethod
    def apply(cls, *args):
        if cls._fn is None:
            cls._fn = _function()
        return cls._fn.apply(*args)


_LinearCrossEntropy = _Lazy

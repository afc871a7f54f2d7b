"""`generate` that honours every adapter kind.

peft injects a prefix-tuned adapter's key/value vectors from `prepare_inputs_for_generation`, and with
transformers 5 `model.generate` no longer goes through that hook: a prefix-tuned model generates exactly what its
base does (its forward pass is right). So prefix-tuned models decode here, token by token through the forward
pass, without a KV cache: slower, and only they pay for it. Everything else uses `model.generate`.
"""
from __future__ import annotations


def decode_answer(tokenizer, token_ids) -> str:
    """The answer as text to store: a model may emit a NUL byte, which PostgreSQL's JSON columns refuse."""
    return tokenizer.decode(token_ids, skip_special_tokens=True).replace("\x00", "\ufffd").strip()


def is_prefix_tuned(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", ""))) == \
        "PREFIX_TUNING"


def generate(model, input_ids, *, generation_config=None, logits_processor=None, stopping_criteria=None,
             **kwargs):
    """Like `model.generate(input_ids=..., attention_mask=ones, ...)`; returns prompt + new token ids."""
    import torch

    if not is_prefix_tuned(model):
        return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              generation_config=generation_config, logits_processor=logits_processor,
                              stopping_criteria=stopping_criteria, **kwargs)
    max_new = kwargs.get("max_new_tokens") or getattr(generation_config, "max_new_tokens", None) or 20
    eos = kwargs.get("eos_token_id", getattr(generation_config, "eos_token_id", None))
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    return _greedy_without_cache(model, input_ids, max_new, eos, logits_processor, stopping_criteria)


def _greedy_without_cache(model, ids, max_new: int, eos: set, processors, stopping):
    """Greedy decoding (after the processors, which is how sampling processors pick their token)."""
    import torch

    for _ in range(max_new):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1, :].float()
        scores = processors(ids, logits) if processors else logits
        ids = torch.cat([ids, scores.argmax(dim=-1, keepdim=True)], dim=1)
        if int(ids[0, -1]) in eos or (stopping and bool(torch.as_tensor(stopping(ids, scores)).any())):
            break
    return ids

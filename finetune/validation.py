"""The held-out rows during training: the validation loss (perplexity, or reward accuracy for preference methods)
and a few greedy answers for side-by-side review.
"""
from __future__ import annotations

import math

from .collate import collate
from .data import iter_examples
from .fastloss import token_loss_sum
from .methods import get_method
from .tokenize import render_prompt
from .trainable_model import device_of
from .trainspec import TrainSpec


def evaluate(model, examples: list[dict], spec: TrainSpec, pad_id: int) -> dict:
    import torch

    if not examples:
        return {}
    device = device_of(model)
    model.eval()
    method = get_method(spec.method)
    total, count, extra = 0.0, 0, {}
    with torch.no_grad():
        for start in range(0, len(examples), spec.micro_batch):
            batch = examples[start : start + spec.micro_batch]
            if method.preference:
                loss, n, _, info = method.loss(model, batch, spec, pad_id, device)
                extra.setdefault("reward_accuracy", []).append(info["reward_accuracy"])
            else:
                ids, labels, mask = collate(batch, pad_id, device)
                loss, n = token_loss_sum(model, ids, labels, mask)
            total += float(loss)
            count += n
    model.train()
    eval_loss = total / max(count, 1)
    out = {"eval_loss": eval_loss}
    if not method.preference:
        out["perplexity"] = math.exp(min(eval_loss, 50))
    else:
        out["reward_accuracy"] = sum(extra["reward_accuracy"]) / len(extra["reward_accuracy"])
    return out


def generate_samples(model, tokenizer, eval_file, spec: TrainSpec) -> list[dict]:
    """Greedy answers to a few held-out prompts, stopping at the end-of-turn token, for side-by-side review."""
    import torch

    from .generation import decode_answer, generate
    from .modelstore import stop_token_ids

    if not eval_file or spec.max_eval_generations <= 0:
        return []
    samples = []
    device = device_of(model)
    model.eval()
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    for example in iter_examples(eval_file):
        if len(samples) >= spec.max_eval_generations:
            break
        if "messages" in example:
            messages = example["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt_messages, reference = messages[:last], messages[last]["content"]
        elif "chosen" in example:
            prompt_messages, reference = list(example["prompt"]), example["chosen"]
        else:
            continue
        prompt = render_prompt(tokenizer, prompt_messages)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -spec.max_seq_len :]
        with torch.no_grad():
            out = generate(
                model,
                ids.to(device),
                max_new_tokens=spec.max_new_tokens,
                do_sample=False,
                eos_token_id=stops or None,
                pad_token_id=tokenizer.pad_token_id,
            )
        text = decode_answer(tokenizer, out[0, ids.shape[1] :])
        samples.append({"prompt": prompt_messages[-1]["content"] if prompt_messages else "", "output": text,
                        "reference": reference})
    model.train()
    return samples


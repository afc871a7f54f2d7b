"""The held-out rows during training: the validation loss (perplexity, or reward accuracy for preference methods),
the exact match of greedy answers when the answers are short (what early stopping watches then), and a few greedy
answers for side-by-side review.

Why exact match and not the loss for short answers (issue 32): on 108 rows of labels the base model had never seen,
the validation loss of the 12 validation rows was lowest after 2 passes and the run stopped there at test exact
match 0.37, where the same settings trained a pass further scored 0.98. The loss of a label keeps rising on the
rows still answered wrong while more rows become right; exact match counts the rows that are right.
"""
from __future__ import annotations

import math
from pathlib import Path
from statistics import median

from .collate import collate
from .data import iter_examples
from .evalmetrics import exact_match
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


SHORT_ANSWER_WORDS = 4  # median reference answer up to this many words: exact match is the score (labels, classes)
MAX_STOPPING_PROMPTS = 64  # validation prompts early stopping answers at each evaluation when it watches exact match


def reference_prompts(eval_file, limit: int, preference: bool = True) -> list[tuple[list, str]]:
    """(prompt messages, reference answer) of up to `limit` rows: chat rows (their last answer), and preference rows
    (their chosen answer) unless preference is False."""
    found = []
    if not eval_file or not Path(eval_file).is_file():
        return found
    for example in iter_examples(eval_file):
        if len(found) >= limit:
            break
        if "messages" in example:
            messages = example["messages"]
            answers = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
            if answers:
                found.append((messages[:answers[-1]], messages[answers[-1]].get("content") or ""))
        elif "chosen" in example and preference:
            found.append((list(example.get("prompt") or []), example.get("chosen")))
    return found


def choose_metric(eval_file) -> str:
    """exact_match for short reference answers, token_f1 for longer ones, eval_loss when rows have none."""
    references = [r for _, r in reference_prompts(eval_file, 200, preference=False) if r]
    if not references:
        return "eval_loss"
    words = median(len(r.split()) for r in references)
    return "exact_match" if words <= SHORT_ANSWER_WORDS else "token_f1"


def stopping_metric(spec: TrainSpec) -> str:
    """What early stopping and the best checkpoint follow: exact match of greedy answers when the validation
    answers are short (auto) or when asked, the validation loss otherwise (and always for preference methods,
    whose rows have two answers)."""
    wanted = spec.early_stopping_metric or "auto"
    spec.check_stopping_metric()
    if wanted == "eval_loss" or get_method(spec.method).preference or not spec.eval_file:
        return "eval_loss"
    if wanted == "exact_match":
        return "exact_match" if reference_prompts(spec.eval_file, 1) else "eval_loss"
    return "exact_match" if choose_metric(spec.eval_file) == "exact_match" else "eval_loss"


def answer_exact_match(model, tokenizer, prompts: list[tuple[list, str]], spec: TrainSpec) -> float:
    """The share of prompts whose greedy answer matches its reference (evalmetrics.exact_match), each answer cut
    a few tokens past the longest reference: a longer one cannot match."""
    if not prompts:
        return 0.0
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for _, r in prompts)
    answers = greedy_answers(model, tokenizer, [m for m, _ in prompts], spec, min(spec.max_new_tokens, longest + 4))
    return sum(exact_match(a, r) for a, (_, r) in zip(answers, prompts)) / len(prompts)


def greedy_answers(model, tokenizer, prompts: list[list], spec: TrainSpec, max_new_tokens: int) -> list[str]:
    """Greedy answers to chat prompts, stopping at the end-of-turn token; the model is left in train mode."""
    import torch

    from .generation import decode_answer, generate
    from .modelstore import stop_token_ids

    device = device_of(model)
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    answers = []
    model.eval()
    for messages in prompts:
        prompt = render_prompt(tokenizer, messages)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -spec.max_seq_len :]
        with torch.no_grad():
            out = generate(model, ids.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=stops or None, pad_token_id=tokenizer.pad_token_id)
        answers.append(decode_answer(tokenizer, out[0, ids.shape[1] :]))
    model.train()
    return answers


def generate_samples(model, tokenizer, eval_file, spec: TrainSpec) -> list[dict]:
    """Greedy answers to a few held-out prompts, stopping at the end-of-turn token, for side-by-side review."""
    if not eval_file or spec.max_eval_generations <= 0:
        return []
    prompts = reference_prompts(eval_file, spec.max_eval_generations)
    answers = greedy_answers(model, tokenizer, [m for m, _ in prompts], spec, spec.max_new_tokens)
    return [{"prompt": messages[-1]["content"] if messages else "", "output": answer, "reference": reference}
            for answer, (messages, reference) in zip(answers, prompts)]


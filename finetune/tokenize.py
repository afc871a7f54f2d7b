"""Turns normalised examples into token ids and labels exactly as training sees them.

Chats go through the tokenizer's own chat template; only assistant turns are learned (their end-of-turn token
included, so the model learns to stop), everything else is masked with -100. Plain text is learned whole and ends
with EOS. Models without a chat template get plain "role: content" lines with EOS after each answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def supports_tools(tokenizer) -> bool:
    """Whether the chat template renders tool definitions and tool calls (it reads a `tools` variable)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates: the default one, or a "tool_use" one
        template = " ".join(str(t) for t in template.values())
    return "tools" in template or "tool_calls" in template


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False, tools=None) -> str:
    if has_chat_template(tokenizer):
        extra = {"tools": tools} if tools else {}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **extra)
    eos = tokenizer.eos_token or ""
    text = "".join(
        f"{m['role']}: {m['content']}{eos if m['role'] == 'assistant' else ''}\n" for m in messages
    )
    return text + ("assistant: " if add_generation_prompt else "")


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The text a model is given to answer the next assistant turn."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def chat_text_and_spans(tokenizer, messages: list[dict], tools=None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of every assistant answer (tool calls included),
    end-of-turn marker included. `tools` are the tool definitions, rendered by the chat template."""
    full = _render(tokenizer, messages, tools=tools)
    spans: list[tuple[int, int]] = []
    search_from = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools) if i else None
        upto = _render(tokenizer, messages[: i + 1], tools=tools)
        if before is not None and full.startswith(upto) and upto.startswith(before):
            start, end = len(before), len(upto.rstrip())
        elif not message["content"]:
            continue  # a tool call the template rewrote: no text of its own to find
        else:
            # Templates that rewrite earlier turns (or put the answer first): find the answer text itself.
            start = full.find(message["content"], search_from)
            if start < 0:
                continue
            end = start + len(message["content"])
            end = _extend_over_end_of_turn(tokenizer, full, end)
        spans.append((start, end))
        search_from = end
    return full, spans


def _extend_over_end_of_turn(tokenizer, text: str, end: int) -> int:
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", tokenizer.eos_token or ""):
        if marker and text.startswith(marker, end):
            return end + len(marker)
    return end


def _encode_with_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE] * len(ids)
    for k, (s, e) in enumerate(encoded["offset_mapping"]):
        if any(s < span_end and e > span_start for span_start, span_end in spans):
            labels[k] = ids[k]
    return ids, labels


def encode_example(example: dict, tokenizer, max_seq_len: int, *, completion_only: bool = True) -> Encoded:
    """Token ids and labels for one normalised example, cut to max_seq_len from the right."""
    if "text" in example and "messages" not in example:
        ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = list(ids) + [tokenizer.eos_token_id]
        labels = list(ids)
        spans = [(0, len(example["text"]))]
    else:
        messages = example["messages"] if "messages" in example else (
            list(example["prompt"]) + [{"role": "assistant", "content": example["chosen"]}]
        )
        text, spans = chat_text_and_spans(tokenizer, messages, example.get("tools"))
        ids, labels = _encode_with_spans(tokenizer, text, spans)
        if not completion_only:
            labels = list(ids)
    truncated = len(ids) > max_seq_len
    return Encoded(ids[:max_seq_len], labels[:max_seq_len], truncated, spans)


def encode_preference(example: dict, tokenizer, max_seq_len: int) -> dict:
    """DPO inputs: prompt ids shared by both answers, and the chosen/rejected answers' ids and labels."""
    prompt_text = render_prompt(tokenizer, list(example["prompt"]))
    out = {}
    for side in ("chosen", "rejected"):
        messages = list(example["prompt"]) + [{"role": "assistant", "content": example[side]}]
        text, spans = chat_text_and_spans(tokenizer, messages)
        ids, labels = _encode_with_spans(tokenizer, text, spans[-1:] if spans else [(len(prompt_text), len(text))])
        if len(ids) > max_seq_len:
            # Keep the answer: cut the prompt from the left rather than the answer from the right.
            first_label = next((i for i, l in enumerate(labels) if l != IGNORE), len(ids))
            overflow = len(ids) - max_seq_len
            cut = min(overflow, first_label)
            ids, labels = ids[cut:], labels[cut:]
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        out[side] = {"input_ids": ids, "labels": labels}
    return out


def preview_segments(example: dict, tokenizer, max_seq_len: int = 2048) -> list[dict]:
    """The example as the model sees it: runs of text, each marked trained (learned) or masked."""
    encoded = encode_example(example, tokenizer, max_seq_len)
    segments: list[dict] = []
    run: list[int] = []
    run_trained = None
    for token_id, label in zip(encoded.input_ids, encoded.labels):
        trained = label != IGNORE
        if run and trained != run_trained:
            segments.append({"text": tokenizer.decode(run), "trained": run_trained})
            run = []
        run.append(token_id)
        run_trained = trained
    if run:
        segments.append({"text": tokenizer.decode(run), "trained": run_trained})
    if encoded.truncated:
        segments.append({"text": f"\n[cut at {max_seq_len} tokens]", "trained": False})
    return segments


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    from .modelstore import stop_token_ids as ids

    return ids(tokenizer, generation_config)

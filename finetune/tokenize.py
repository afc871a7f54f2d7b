"""Turns normalised examples into token ids and labels exactly as training sees them.

Chats go through the tokenizer's own chat template; only assistant turns are learned (their end-of-turn token
included, so the model learns to stop), everything else is masked with -100. An assistant turn normalised with
"weight": 0 (OpenAI's and LLaMA-Factory's per-turn weights) is context, masked like a user turn. Plain text is
learned whole and ends with EOS. Models without a chat template get plain "role: content" lines with EOS after each
answer.
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
    excluded: list[bool] = field(default_factory=list)  # per token: in an assistant turn left out by its weight

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
    messages = [{k: v for k, v in m.items() if k != "weight"} if "weight" in m else m for m in messages]
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
    """The rendered conversation and the character spans of every trained assistant answer (tool calls included),
    end-of-turn marker included. `tools` are the tool definitions, rendered by the chat template."""
    full, spans = _assistant_spans(tokenizer, messages, tools)
    return full, [(start, end) for start, end, trained in spans if trained]


def _assistant_spans(tokenizer, messages: list[dict], tools=None) -> tuple[str, list[tuple[int, int, bool]]]:
    """The rendered conversation and (start, end, trained) for every assistant answer; trained is False for a turn
    with weight 0."""
    full = _render(tokenizer, messages, tools=tools)
    spans: list[tuple[int, int, bool]] = []
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
        spans.append((start, end, message.get("weight", 1) != 0))
        search_from = end
    return full, spans


def _extend_over_end_of_turn(tokenizer, text: str, end: int) -> int:
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", tokenizer.eos_token or ""):
        if marker and text.startswith(marker, end):
            return end + len(marker)
    return end


def _encode_with_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    ids, (inside,) = _encode_marking(tokenizer, text, spans)
    return ids, [token if learned else IGNORE for token, learned in zip(ids, inside)]


def _encode_marking(tokenizer, text: str, *span_lists) -> tuple[list[int], list[list[bool]]]:
    """Token ids, and for each list of character spans whether each token overlaps one of them."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    marks = [[any(s < span[1] and e > span[0] for span in spans) for s, e in offsets] for spans in span_lists]
    return list(encoded["input_ids"]), marks


def encode_example(example: dict, tokenizer, max_seq_len: int, *, completion_only: bool = True) -> Encoded:
    """Token ids and labels for one normalised example, cut to max_seq_len from the right."""
    if "text" in example and "messages" not in example:
        ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = list(ids) + [tokenizer.eos_token_id]
        return Encoded(ids[:max_seq_len], list(ids)[:max_seq_len], len(ids) > max_seq_len,
                       [(0, len(example["text"]))])
    messages = example["messages"] if "messages" in example else (
        list(example["prompt"]) + [{"role": "assistant", "content": example["chosen"]}]
    )
    return _encode_chat(tokenizer, messages, example.get("tools"), max_seq_len, completion_only)


def _encode_chat(tokenizer, messages, tools, max_seq_len: int, completion_only: bool) -> Encoded:
    """Assistant answers learned; without completion_only everything is, but the turns weighted out never are."""
    text, all_spans = _assistant_spans(tokenizer, messages, tools)
    spans = [(s, e) for s, e, trained in all_spans if trained]
    excluded_spans = [(s, e) for s, e, trained in all_spans if not trained]
    ids, (learned, excluded) = _encode_marking(tokenizer, text, spans, excluded_spans)
    if not completion_only:
        learned = [not out for out in excluded]
    labels = [token if keep else IGNORE for token, keep in zip(ids, learned)]
    return Encoded(ids[:max_seq_len], labels[:max_seq_len], len(ids) > max_seq_len, spans,
                   excluded[:max_seq_len] if excluded_spans else [])


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


KTO_NOTES = {True: "KTO label: desirable (this answer is made more likely)\n",
             False: "KTO label: undesirable (this answer is made less likely)\n"}


def preview_segments(example: dict, tokenizer, max_seq_len: int = 2048) -> list[dict]:
    """The example as the model sees it: runs of text, each marked trained (learned) or masked. A masked run of an
    assistant turn left out by its weight is also marked excluded; notes ({"note": True}) say what the layout
    trains on: a preference pair shows both answers (the rejected one's runs marked rejected), a KTO example its
    label."""
    if "chosen" in example:
        return _preference_preview(example, tokenizer, max_seq_len)
    encoded = encode_example(example, tokenizer, max_seq_len)
    segments = _runs(tokenizer, encoded.input_ids, encoded.labels, encoded.excluded)
    if encoded.truncated:
        segments.append(_note(f"\n[cut at {max_seq_len} tokens]"))
    if "label" in example:
        segments.insert(0, _note(KTO_NOTES[bool(example["label"])]))
    return segments


def _preference_preview(example: dict, tokenizer, max_seq_len: int) -> list[dict]:
    """The prompt and chosen answer as DPO reads them, then the rejected answer (its prompt is the same)."""
    pair = encode_preference(example, tokenizer, max_seq_len)
    chosen, rejected = pair["chosen"], pair["rejected"]
    first = next((i for i, label in enumerate(rejected["labels"]) if label != IGNORE), len(rejected["labels"]))
    return [_note("Chosen answer, made more likely:\n"),
            *_runs(tokenizer, chosen["input_ids"], chosen["labels"]),
            _note("\n\nRejected answer to the same prompt, made less likely:\n"),
            *_runs(tokenizer, rejected["input_ids"][first:], rejected["labels"][first:], rejected=True)]


def _note(text: str) -> dict:
    return {"text": text, "trained": False, "note": True}


def _runs(tokenizer, ids: list[int], labels: list[int], excluded=(), **marks) -> list[dict]:
    """Consecutive tokens of the same kind (trained, masked, excluded) decoded together; `marks` go on trained runs."""
    kinds = [(label != IGNORE, bool(out)) for label, out in zip(labels, excluded or [False] * len(labels))]
    segments: list[dict] = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or kinds[end] != kinds[start]:
            trained, out = kinds[start]
            segment = {"text": tokenizer.decode(ids[start:end]), "trained": trained}
            segment.update({"excluded": True} if out else marks if trained else {})
            segments.append(segment)
            start = end
    return segments


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    from .modelstore import stop_token_ids as ids

    return ids(tokenizer, generation_config)

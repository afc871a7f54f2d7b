"""What the report warns about in usable rows: examples far longer than the model's context, and template
placeholders such as {{name}} that would be trained as written. Warnings inform; they never make a dataset invalid.

There is no tokenizer here, so an example's length in tokens is estimated from its characters at CHARS_PER_TOKEN
(English under common tokenizers runs 3.5 to 4.5 characters a token; most other text has more tokens per
character, so the estimate errs short and the warning only fires on examples that are surely too long).
"""
from __future__ import annotations

import re

DEFAULT_CONTEXT_TOKENS = 8192
CHARS_PER_TOKEN = 4
# "Far longer": at least this many times the context, so most of the example is never trained.
FAR_LONGER = 2
PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_][\w.]*\s*\}\}")


def example_texts(example: dict) -> list[str]:
    """Every text of a normalised example, in the order training reads it."""
    if "text" in example:
        return [example["text"]]
    if "messages" in example:
        return [m["content"] for m in example["messages"]]
    return [m["content"] for m in example.get("prompt", ())] + [example.get("chosen", ""),
                                                                example.get("rejected", "")]


def sequence_chars(example: dict) -> int:
    """Characters of the longest sequence training runs for the example (a pair runs prompt + each answer)."""
    if "chosen" in example:
        prompt = sum(len(m["content"]) for m in example["prompt"])
        return prompt + max(len(example["chosen"]), len(example["rejected"]))
    return sum(len(text) for text in example_texts(example))


class Notices:
    def __init__(self, max_examples: int, context_tokens: int | None):
        self.max_examples = max_examples
        self.context = int(context_tokens or DEFAULT_CONTEXT_TOKENS)
        self.long: list[dict] = []
        self.long_rows = 0
        self.placeholder_rows = 0
        self.placeholder_first: tuple[int, str] | None = None

    def check(self, row: int, example: dict):
        chars = sequence_chars(example)
        if chars > FAR_LONGER * self.context * CHARS_PER_TOKEN:
            self.long_rows += 1
            if len(self.long) < self.max_examples:
                self.long.append({"row": row, "kind": "long_example", "message": self._long_message(chars)})
        found = next((m for text in example_texts(example) for m in [PLACEHOLDER.search(text)] if m), None)
        if found:
            self.placeholder_rows += 1
            self.placeholder_first = self.placeholder_first or (row, found.group(0))

    def _long_message(self, chars: int) -> str:
        tokens = chars // CHARS_PER_TOKEN
        return (f"The example has {chars:,} characters, about {tokens:,} tokens or more, far longer than a "
                f"{self.context:,}-token context: training sees only its first {self.context:,} tokens (about "
                f"{self.context / tokens:.0%} of it). Split it into smaller examples.")

    def warnings(self) -> list[dict]:
        found = list(self.long)
        if self.placeholder_first:
            row, placeholder = self.placeholder_first
            rows = f"{self.placeholder_rows:,} rows contain" if self.placeholder_rows > 1 else "1 row contains"
            found.append({"row": row, "kind": "placeholder", "message": (
                f"{rows} template placeholders such as {placeholder} (the first is this row); they are trained as "
                "written, braces included. If they stand for values to fill in, fill them before uploading; if "
                "they are meant literally (template code), nothing needs doing.")})
        return found

    def counts(self) -> dict[str, int]:
        counts = {"long_example": self.long_rows, "placeholder": self.placeholder_rows}
        return {kind: n for kind, n in counts.items() if n}

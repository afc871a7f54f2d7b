"""Chat templates a user may choose for a base model that has none (issue 34): a few well-known formats, by name.

The choice travels with the job as the plan field "chat_template"; training sets it on the tokenizer when the model
has no template of its own (a model's own template is never replaced), and the adapter folder saves that tokenizer,
so the merged model and evaluations render chats the way training did. Pure Python: the web process lists them.

Zephyr ends every turn with the model's own end-of-sequence token, so a model learns to stop with a token it already
has; ChatML and Llama-3 use their own markers, which a tokenizer without them splits into ordinary pieces.
"""
from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token or '' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + (eos_token or '') + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# name: (label shown on the train page, Jinja template in the Hugging Face tokenizer format)
CHAT_TEMPLATES = {
    "zephyr": ("Zephyr (<|user|> ... end-of-sequence): stops on the model's own EOS", ZEPHYR),
    "chatml": ("ChatML (<|im_start|> ... <|im_end|>): Qwen, SmolLM, many others", CHATML),
    "llama3": ("Llama 3 (<|start_header_id|> ... <|eot_id|>)", LLAMA3),
}


def chat_template_choice(name) -> str:
    """The template name, normalised; "" for the model's own. Raises ValueError in the user's terms."""
    name = str(name or "").strip().lower()
    if name in ("", "auto", "model"):
        return ""
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown chat template {name!r}; choose one of {', '.join(CHAT_TEMPLATES)} (or leave it "
                         "empty to use the model's own).")
    return name


def apply_chat_template_choice(tokenizer, name) -> bool:
    """Sets the chosen template on a tokenizer that has none; True when it did. A model's own template stays."""
    name = chat_template_choice(name)
    if not name or getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = CHAT_TEMPLATES[name][1]
    return True


def with_adapter_template(tokenizer, adapter_dir):
    """The tokenizer as an adapter was trained with it: a base tokenizer without a template gets the template the
    adapter folder saved (the one chosen for training), on a copy, so the base model's own rendering is unchanged."""
    import copy

    saved = Path(adapter_dir) / "chat_template.jinja" if adapter_dir else None
    if getattr(tokenizer, "chat_template", None) or saved is None or not saved.is_file():
        return tokenizer
    adapted = copy.copy(tokenizer)
    adapted.chat_template = saved.read_text(encoding="utf-8")
    return adapted

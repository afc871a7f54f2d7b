"""The dataset layouts: one section per layout, its normaliser and its register_layout(...) entry.

To add a layout, add a section here: a function turning one row (a dict, fields read through `fields` so
column_map works) into a normalised example, raising RowProblem for a bad row, and one register_layout call saying
which fields identify its rows and which training schema it yields. conversation.py has the building blocks
(message lists, turn order, single_turn). Detection, schema=, column_map, the upload form and the REST API's
schema check all read the registry.

    messages           {"messages": [{"role", "content"}, ...]}       roles system/user/assistant/tool; an
                       assistant turn may carry OpenAI "tool_calls" (its content may then be empty)
    sharegpt           {"conversations": [{"from", "value"}, ...]}   from human/user, gpt/assistant/model, system,
                       function_call (an assistant tool call: value is JSON {"name", "arguments"}), observation
                       (a tool result); LLaMA-Factory's layout, with optional "system" and "tools"
    prompt_completion  {"prompt", "completion"} (+ optional "system")
    alpaca             {"instruction", "input" (optional), "output"} (+ optional "system", "history": [[q, a], ...])
    text               {"text"}
    preference         {"prompt", "chosen", "rejected"}; prompt a string or a message list, chosen/rejected strings,
                       message lists ending in the assistant's answer, or one message object. Also LLaMA-Factory's
                       layouts: "conversations"/"messages" (ending with the user) + "chosen"/"rejected" message
                       objects, and alpaca's "instruction" (+ "input", "system", "history") + chosen/rejected text.
    preference_implicit  {"chosen", "rejected"} with no prompt column: each holds the whole conversation, prompt
                       included (Anthropic hh-rlhf's "\n\nHuman: ...\n\nAssistant: ..." text, TRL/torchtune message
                       lists); split into the prompt they share and the two final answers.
    kto                any chat layout above (messages, conversations, instruction/output, prompt/completion)
                       plus "kto_tag" or "label": true (a desirable answer) or false (an undesirable one)

Column aliases (fields.ALIASES): where a file has no column of our name, "query" is read as instruction, "context"
as input, "response" or "answer" as output (alpaca) and completion (prompt_completion).
Message turns may carry "weight"/"loss_weight" 0 or 1 (conversation.py); content may be a list of text parts.

Every chat layout may carry "tools" (a list of function definitions, or that list as JSON text). In CSV/TSV/Parquet
a message-list field may hold the list as JSON text. Registration order is the order users see the schemas in;
`precedence` is the order detection prefers on a tie (the more specific layout first).
"""
from __future__ import annotations

from .conversation import (
    answer_text,
    check_assistant_content,
    check_turn_order,
    message_list,
    normalise_conversation,
    parse_turn,
    single_turn,
    with_system_column,
    without_weights,
)
from .dialogue import shared_prompt_split
from .fields import MISSING, Fields, maybe_json_list, required_value, text_field
from .problems import RowProblem, type_name
from .registry import chat_layouts, register_layout

# ------------------------------------------------------------------------------------------------ messages, sharegpt


def _normalise_messages(record, fields):
    return normalise_conversation(record, fields, "messages")


def _normalise_sharegpt(record, fields):
    return normalise_conversation(record, fields, "conversations")


register_layout("messages", required=("messages",), optional=("tools",), normalise=_normalise_messages,
                yields="chat", chat=True, precedence=30)
register_layout("sharegpt", required=("conversations",), optional=("system", "tools"), normalise=_normalise_sharegpt,
                yields="chat", chat=True, precedence=40)


# ------------------------------------------------------------------------------------------------ prompt_completion


def _normalise_prompt_completion(record, fields):
    prompt = text_field(record, fields, "prompt")
    completion = answer_text(record, fields, "completion")
    if not prompt.strip():
        raise RowProblem("missing_field", f"The {fields.label('prompt')} field is empty.")
    return single_turn(text_field(record, fields, "system", optional=True), prompt, completion)


register_layout("prompt_completion", required=("prompt", "completion"), optional=("system",),
                normalise=_normalise_prompt_completion, yields="chat", chat=True, precedence=60)


# ------------------------------------------------------------------------------------------------ alpaca


def _alpaca_prompt(record, fields) -> list[dict]:
    """System, the history's [question, answer] pairs, then instruction + input as the last user turn."""
    instruction = text_field(record, fields, "instruction")
    extra = text_field(record, fields, "input", optional=True)
    if not instruction.strip() and not extra.strip():
        raise RowProblem("missing_field", f"The {fields.label('instruction')} field is empty.")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    system = text_field(record, fields, "system", optional=True)
    turns = [{"role": "system", "content": system}] if system.strip() else []
    return turns + _alpaca_history(record, fields) + [{"role": "user", "content": prompt}]


def _alpaca_history(record, fields) -> list[dict]:
    history = maybe_json_list(fields.get(record, "history"))
    if history is MISSING or history is None or history == "":
        return []
    label = fields.label("history")
    if not isinstance(history, list):
        raise RowProblem("wrong_type", f"The {label} field should be a list of [question, answer] pairs, but it "
                                       f"is {type_name(history)}.")
    turns = []
    for number, pair in enumerate(history, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RowProblem("wrong_type", f"Entry {number} of {label} should be a [question, answer] pair of "
                                           f"texts, but it is {type_name(pair)}.")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


def _normalise_alpaca(record, fields):
    turns = _alpaca_prompt(record, fields) + [{"role": "assistant", "content": answer_text(record, fields, "output")}]
    check_assistant_content(turns, fields.label("history"))
    return {"messages": turns}


register_layout("alpaca", required=("instruction", "output"), optional=("input", "system", "history"),
                normalise=_normalise_alpaca, yields="chat", chat=True, precedence=50)


# ------------------------------------------------------------------------------------------------ text


def _normalise_text(record, fields):
    text = text_field(record, fields, "text")
    if not text.strip():
        raise RowProblem("missing_field", f"The {fields.label('text')} field is empty.")
    return {"text": text}


register_layout("text", required=("text",), normalise=_normalise_text, yields="text", precedence=70)


# ------------------------------------------------------------------------------------------------ preference


def _preference_prompt(record: dict, fields: Fields) -> list[dict]:
    for name in ("messages", "conversations"):  # LLaMA-Factory: the conversation up to the user's last turn
        if fields.get(record, "prompt") is MISSING and fields.get(record, name) is not MISSING:
            turns = with_system_column(message_list(record, fields, name), record, fields)
            check_turn_order(turns, fields.label(name), last="user")
            return without_weights(turns)
    if fields.get(record, "prompt") is MISSING and fields.get(record, "instruction") is not MISSING:
        return _alpaca_prompt(record, fields)
    value = maybe_json_list(required_value(record, fields, "prompt"))
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem("missing_field", f"The {fields.label('prompt')} field is empty.")
        return [{"role": "user", "content": value}]
    turns = message_list(record, fields, "prompt")
    check_turn_order(turns, fields.label("prompt"), last="user")
    return without_weights(turns)


def _preference_answer(record: dict, fields: Fields, name: str) -> str:
    value = maybe_json_list(required_value(record, fields, name))
    label = fields.label(name)
    if isinstance(value, dict):
        value = [value]  # LLaMA-Factory: one message object {"from": "gpt", "value": ...}
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)) and value:
        turns = [parse_turn(turn, i, label) for i, turn in enumerate(value, start=1)]
        if turns[-1]["role"] != "assistant":
            raise RowProblem("turn_order", f"{label} must end with the assistant's answer, but its last turn is "
                                           f"from the {turns[-1]['role']}.")
        text = turns[-1]["content"]
    else:
        raise RowProblem("wrong_type", f"The {label} field should be text or a list of messages ending in the "
                                       f"assistant's answer, but it is {type_name(value)}.")
    if not text.strip():
        raise RowProblem("empty_assistant", f"The {label} answer is empty.")
    return text


def _normalise_preference(record, fields):
    prompt = _preference_prompt(record, fields)
    return {
        "prompt": prompt,
        "chosen": _preference_answer(record, fields, "chosen"),
        "rejected": _preference_answer(record, fields, "rejected"),
    }


def _is_preference(has) -> bool:
    """prompt/chosen/rejected, or LLaMA-Factory's chosen/rejected beside a conversation or an alpaca instruction."""
    if has("prompt") and has("chosen") and has("rejected"):
        return True
    return has("chosen") and has("rejected") and (has("messages") or has("conversations") or has("instruction"))


register_layout("preference", required=("prompt", "chosen", "rejected"), detect=_is_preference,
                optional=("messages", "conversations", "instruction", "input", "system", "history"),
                normalise=_normalise_preference, yields="preference", precedence=10)


# ------------------------------------------------------------------------------------------------ preference_implicit


def _normalise_implicit_preference(record, fields):
    split = shared_prompt_split(record, fields)
    split["prompt"] = with_system_column(split["prompt"], record, fields)
    return split


def _is_implicit_preference(has) -> bool:
    """chosen and rejected with nothing else holding the prompt (else it is the preference layout)."""
    return has("chosen") and has("rejected") and not any(
        has(name) for name in ("prompt", "messages", "conversations", "instruction"))


register_layout("preference_implicit", required=("chosen", "rejected"), optional=("system",),
                detect=_is_implicit_preference, normalise=_normalise_implicit_preference, yields="preference",
                expects="chosen and rejected, each the whole conversation (prompt included), no prompt column",
                precedence=15)


# ------------------------------------------------------------------------------------------------ kto


def _kto_label(record, fields) -> bool:
    name = "kto_tag" if fields.get(record, "kto_tag") is not MISSING else "label"
    value = required_value(record, fields, name)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")  # CSV cells
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise RowProblem("wrong_type", f"The {fields.label(name)} field should be true (a desirable answer) or false "
                                   f"(an undesirable one), but it is {type_name(value)}.")


def _chat_layout_of(has):
    return next((layout for layout in chat_layouts() if layout.fits(has)), None)


def _normalise_kto(record, fields):
    """A chat row plus its KTO label; the chat may be in any of the chat layouts."""
    layout = _chat_layout_of(lambda name: fields.column(name) in record)
    if layout is None:
        raise RowProblem("missing_field", "The row has a KTO label but no conversation (messages, conversations, "
                                          "instruction/output or prompt/completion).")
    example = layout.normalise(record, fields)
    example["label"] = _kto_label(record, fields)
    return example


def _is_kto(has) -> bool:
    return (has("kto_tag") or has("label")) and _chat_layout_of(has) is not None


register_layout("kto", optional=("kto_tag", "label"), detect=_is_kto, expects="a chat layout plus kto_tag or label",
                normalise=_normalise_kto, yields="kto", precedence=20)

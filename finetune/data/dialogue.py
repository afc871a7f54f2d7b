"""Preference pairs whose prompt is inside both answers: Anthropic hh-rlhf's "\\n\\nHuman: ...\\n\\nAssistant: ..."
text, or TRL/torchtune message lists where chosen and rejected repeat the same first turns. Both are read as turns
and split where they part: the turns they share are the prompt, and their last assistant turns the two answers.
Only the last turn may differ; a pair that parts earlier is not one prompt with two answers, and is refused.
"""
from __future__ import annotations

import re

from .conversation import check_turn_order, parse_turn, without_weights
from .fields import Fields, maybe_json_list, required_value
from .problems import RowProblem, type_name

# A speaker marker opens the text or follows a blank line; a marker inside a line is text.
_MARKER = re.compile(r"\n\n(Human|Assistant):[ \t]?")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def marked_dialogue(text: str) -> list[dict] | None:
    """The turns of "\\n\\nHuman: ...\\n\\nAssistant: ..." text, or None when the text is not laid out so."""
    pieces = _MARKER.split("\n\n" + text.lstrip("\n"))
    if len(pieces) < 3 or pieces[0].strip():
        return None
    return [{"role": _ROLES[role], "content": content.strip()} for role, content in zip(pieces[1::2], pieces[2::2])]


def _side_turns(record: dict, fields: Fields, name: str) -> list[dict]:
    label = fields.label(name)
    value = maybe_json_list(required_value(record, fields, name))
    if isinstance(value, str):
        turns = marked_dialogue(value)
        if turns is None:
            raise RowProblem("missing_field", f"The row has no prompt: there is no 'prompt' column, and {label} is "
                                              "plain text without \"\\n\\nHuman:\" / \"\\n\\nAssistant:\" turns to "
                                              "take one from. Add a prompt column (the preference layout), or give "
                                              "chosen and rejected as whole conversations.")
        return turns
    if isinstance(value, (list, tuple)) and value:
        return [parse_turn(turn, number, label) for number, turn in enumerate(value, start=1)]
    raise RowProblem("wrong_type", f"The {label} field should be a conversation (a list of messages, or "
                                   f"Human:/Assistant: text) ending in the assistant's answer, but it is "
                                   f"{type_name(value)}.")


def _same_turn(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"].strip() == b["content"].strip()


def shared_prompt_split(record: dict, fields: Fields) -> dict:
    """{"prompt": the turns chosen and rejected share, "chosen": str, "rejected": str}; raises RowProblem."""
    chosen, rejected = _side_turns(record, fields, "chosen"), _side_turns(record, fields, "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise RowProblem("turn_order", f"{fields.label(name)} must end with the assistant's answer, but its "
                                           f"last turn is from the {turns[-1]['role']}.")
        if not turns[-1]["content"].strip():
            raise RowProblem("empty_assistant", f"The last answer of {fields.label(name)} is empty.")
    prompt = chosen[:-1]
    for number, (a, b) in enumerate(zip(prompt, rejected[:-1]), start=1):
        if not _same_turn(a, b):
            raise RowProblem("turn_order", f"'chosen' and 'rejected' differ at turn {number}, before their last "
                                           "answers; only the final assistant answer may differ between them.")
    if len(prompt) != len(rejected) - 1:
        longer = "chosen" if len(prompt) > len(rejected) - 1 else "rejected"
        raise RowProblem("turn_order", f"{fields.label(longer)} has more turns than the other side; only the "
                                       "final assistant answer may differ between chosen and rejected.")
    if not prompt:
        raise RowProblem("missing_field", f"{fields.label('chosen')} holds only the answer, with no user turn "
                                          "before it to take the prompt from.")
    check_turn_order(prompt, "the shared prompt", last="user")
    return {"prompt": without_weights(prompt), "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}

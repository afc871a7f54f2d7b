"""Building blocks of chat layouts: a message list parsed turn by turn, tool calls and definitions, per-turn loss
weights, the turn order checks, and the single-turn chat most simple layouts become. Every check raises RowProblem
in the user's terms.

Per-turn weights: OpenAI's chat fine-tuning format marks an assistant turn `"weight": 0` to leave it untrained
(1 trains it), LLaMA-Factory's `"loss_weight"` does the same. A weighted-out assistant turn is normalised with
`"weight": 0` (trained turns carry no weight key) and gets IGNORE labels in finetune/tokenize.py. Only 0 and 1 are
accepted: the loss mask trains a token or does not.
"""
from __future__ import annotations

import json

from .fields import MISSING, Fields, maybe_json_list, required_value, text_field
from .problems import RowProblem, type_name

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "function_call": "assistant",  # LLaMA-Factory: an assistant turn that calls a tool
    "tool": "tool",
    "observation": "tool",  # LLaMA-Factory: a tool's result
    "function": "tool",  # OpenAI's older name for a tool result
}


def message_list(record: dict, fields: Fields, name: str) -> list[dict]:
    raw = required_value(record, fields, name)
    value = maybe_json_list(raw)
    if isinstance(value, str) and value.lstrip().startswith("["):
        raise RowProblem("malformed_json", f"The {fields.label(name)} field holds text that starts like a JSON "
                                           "list of messages but is not valid JSON.")
    if not isinstance(value, (list, tuple)):
        raise RowProblem("wrong_type", f"The {fields.label(name)} field should be a list of messages, but it is "
                                       f"{type_name(value)}.")
    if not value:
        raise RowProblem("turn_order", f"The {fields.label(name)} list is empty: a conversation needs a user turn "
                                       "and an assistant answer.")
    return [parse_turn(turn, i, fields.label(name)) for i, turn in enumerate(value, start=1)]


def parse_turn(turn, number: int, label: str) -> dict:
    """One turn, normalised: role, content (text), tool calls or a tool's name, and weight 0 if left untrained."""
    parsed = _parse_turn(turn, number, label)
    if parsed["role"] == "assistant" and _turn_weight(turn, number, label) == 0:
        parsed["weight"] = 0
    return parsed


def _parse_turn(turn, number: int, label: str) -> dict:
    if not isinstance(turn, dict):
        raise RowProblem("wrong_type", f"Turn {number} of {label} is {type_name(turn)}, but each turn must be an "
                                       "object with a role and content.")
    role_key = "role" if "role" in turn else "from" if "from" in turn else None
    if role_key is None:
        raise RowProblem("missing_field", f"Turn {number} of {label} has no 'role' (or 'from') field.")
    role = turn[role_key]
    if not isinstance(role, str):
        raise RowProblem("wrong_type", f"Turn {number} of {label} has a '{role_key}' that is {type_name(role)}, "
                                       "not text.")
    normal = ROLE_ALIASES.get(role.strip().lower())
    if normal is None:
        raise RowProblem("unknown_role", f"Turn {number} of {label} has the role {role!r}; expected system, user "
                                         "or assistant (or human, gpt, model).")
    content_key = "content" if "content" in turn else "value" if "value" in turn else None
    if role.strip().lower() == "function_call":
        return {"role": "assistant", "content": "",
                "tool_calls": [_tool_call(turn.get(content_key), number, label)]}
    if normal == "assistant" and turn.get("tool_calls"):
        calls = turn["tool_calls"]
        if not isinstance(calls, list):
            raise RowProblem("wrong_type", f"Turn {number} of {label} has 'tool_calls' that is {type_name(calls)}, "
                                           "not a list.")
        content = turn.get(content_key) if content_key else None
        text = "" if content is None else _turn_text(content, number, label, normal)
        return {"role": "assistant", "content": text, "tool_calls": [_tool_call(c, number, label) for c in calls]}
    if content_key is None:
        raise RowProblem("missing_field", f"Turn {number} of {label} ({normal}) has no 'content' (or 'value') "
                                          "field.")
    content = _turn_text(turn[content_key], number, label, normal)
    if normal == "tool" and isinstance(turn.get("name"), str):
        return {"role": "tool", "name": turn["name"], "content": content}
    return {"role": normal, "content": content}


WEIGHT_KEYS = ("weight", "loss_weight")  # OpenAI's, LLaMA-Factory's


def _turn_weight(turn: dict, number: int, label: str) -> int:
    """1 (trained, also when unset) or 0 (left out of the loss)."""
    weights = {key: turn[key] for key in WEIGHT_KEYS if turn.get(key) is not None}
    for key, value in weights.items():
        if not isinstance(value, (bool, int, float)) or value not in (0, 1):
            raise RowProblem("wrong_type", f"Turn {number} of {label} has {key} {value!r}; only 0 (not trained) "
                                           "and 1 (trained) are supported.")
    if len(set(weights.values())) > 1:
        raise RowProblem("wrong_type", f"Turn {number} of {label} has both weight and loss_weight, and they "
                                       "differ.")
    return int(next(iter(weights.values()), 1))


def _tool_call(call, number: int, label: str) -> dict:
    """An OpenAI tool call {"type": "function", "function": {"name", "arguments"}}, from that form, from
    {"name", "arguments"}, or from that object as JSON text (LLaMA-Factory's function_call turn)."""
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except (ValueError, RecursionError):
            raise RowProblem("malformed_json", f"Turn {number} of {label} is a tool call whose text is not JSON "
                                               '{"name": ..., "arguments": ...}.') from None
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RowProblem("wrong_type", f"Turn {number} of {label} has a tool call without a function name; "
                                       'expected {"name": ..., "arguments": {...}}.')
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            raise RowProblem("malformed_json", f"Turn {number} of {label} calls {function['name']!r} with "
                                               "arguments that are not valid JSON.") from None
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _tools(record: dict, fields: Fields) -> list[dict] | None:
    """Tool definitions: a list (or its JSON text) of OpenAI {"type": "function", "function": {...}} entries or
    bare {"name", "description", "parameters"} ones (LLaMA-Factory); None when the row has none."""
    raw = fields.get(record, "tools")
    if raw is MISSING or raw is None or raw == "" or raw == []:
        return None
    value = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            raise RowProblem("malformed_json", f"The {fields.label('tools')} field is not a JSON list of tool "
                                               "definitions.") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowProblem("wrong_type", f"The {fields.label('tools')} field should be a list of tool definitions, "
                                       f"but it is {type_name(value)}.")
    tools = []
    for tool in value:
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowProblem("wrong_type", f"A tool in {fields.label('tools')} has no name.")
        tools.append({"type": "function", "function": function})
    return tools


def _turn_text(content, number: int, label: str, role: str) -> str:
    if content is None:
        if role == "assistant":
            raise RowProblem("empty_assistant", f"Turn {number} of {label} is an assistant turn with no content "
                                                "(null).")
        raise RowProblem("missing_field", f"Turn {number} of {label} ({role}) has no content (null).")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        return _content_parts(content, number, label, role)
    raise RowProblem("wrong_type", f"Turn {number} of {label} ({role}) has content that is {type_name(content)}; "
                                   "it should be text or a list of text parts.")


MEDIA_PART_TYPES = {"image": "an image", "image_url": "an image", "input_image": "an image", "audio": "audio",
                    "input_audio": "audio", "video": "a video", "video_url": "a video", "file": "a file"}


def _content_parts(parts: list[dict], number: int, label: str, role: str) -> str:
    """Content parts joined into text: OpenAI's {"type": "text", "text"}, or "value" for "text" (some exports).
    A part that is an image, audio or video is refused by name: the model would learn the turn without it."""
    texts = []
    for index, part in enumerate(parts, start=1):
        kind = part.get("type", "text")
        if kind in MEDIA_PART_TYPES or any(part.get(key) is not None for key in ("image", "image_url", "audio",
                                                                                 "video")):
            what = MEDIA_PART_TYPES.get(kind, "an image")
            raise RowProblem("unsupported", f"Turn {number} of {label} ({role}) has {what} (content part {index}, "
                                            f"type {kind!r}): the file has media, and Tunedeck trains text-only "
                                            "models, so it would learn this turn with the media missing. Remove "
                                            "the media parts or these rows.")
        text = part.get("text", part.get("value"))
        if kind != "text" or not isinstance(text, str):
            found = "no text" if text is None else f"its text is {type_name(text)}"
            raise RowProblem("wrong_type", f"Content part {index} of turn {number} of {label} ({role}) is not a "
                                           f"text part (type {kind!r}, {found}); expected "
                                           '{"type": "text", "text": ...}.')
        texts.append(text)
    return "".join(texts)


def check_assistant_content(turns: list[dict], label: str):
    answers = [turn for turn in turns if turn["role"] == "assistant"]
    for number, turn in enumerate(turns, start=1):
        if turn["role"] == "assistant" and not turn["content"].strip() and not turn.get("tool_calls"):
            raise RowProblem("empty_assistant", f"Turn {number} of {label} is an assistant turn with empty content.")
    if answers and all(turn.get("weight") == 0 for turn in answers):
        raise RowProblem("empty_assistant", f"Every assistant turn of {label} has weight 0, so nothing in the row "
                                            "would be trained.")


def without_weights(turns: list[dict]) -> list[dict]:
    """The turns of a prompt, which is never trained: a weight there means nothing."""
    return [{k: v for k, v in turn.items() if k != "weight"} for turn in turns]


def check_turn_order(turns: list[dict], label: str, *, last: str):
    """System only first, then user/assistant alternating from the user, ending with `last`."""
    for number, turn in enumerate(turns[1:], start=2):
        if turn["role"] == "system":
            raise RowProblem("turn_order", f"Turn {number} of {label} is a system message; a system message may "
                                           "only come first.")
    dialogue = turns[1:] if turns[0]["role"] == "system" else turns
    offset = len(turns) - len(dialogue)
    if not dialogue:
        raise RowProblem("turn_order", f"{label} has only a system message and no user or assistant turns.")
    if dialogue[0]["role"] != "user":
        raise RowProblem("turn_order", f"Turn {offset + 1} of {label} is from the assistant; the conversation must "
                                       "start with the user.")
    for i in range(1, len(dialogue)):
        role, before = dialogue[i]["role"], dialogue[i - 1]["role"]
        if role == "tool":
            if before == "tool" or dialogue[i - 1].get("tool_calls"):
                continue  # results of the previous turn's tool calls
            raise RowProblem("turn_order", f"Turn {offset + i + 1} of {label} is a tool result that does not follow "
                                           "an assistant turn with tool calls.")
        if dialogue[i - 1].get("tool_calls"):
            raise RowProblem("turn_order", f"Turn {offset + i} of {label} calls a tool, but turn {offset + i + 1} "
                                           "is not the tool's result.")
        if role == before or (role == "user" and before == "tool"):
            raise RowProblem("turn_order", f"Turns {offset + i} and {offset + i + 1} of {label} are both from the "
                                           f"{role if role == before else 'user side'}; user and assistant turns "
                                           "must alternate.")
    if dialogue[-1]["role"] != last:
        if last == "assistant" and len(dialogue) == 1:
            raise RowProblem("turn_order", f"{label} has no assistant turn to learn from.")
        raise RowProblem("turn_order", f"{label} ends with a {dialogue[-1]['role']} turn; the last turn must be "
                                       f"the {last}'s.")


def with_system_column(turns: list[dict], record: dict, fields: Fields) -> list[dict]:
    """LLaMA-Factory keeps the system prompt in its own column beside the conversation."""
    system = text_field(record, fields, "system", optional=True)
    if system.strip() and turns[0]["role"] != "system":
        return [{"role": "system", "content": system}, *turns]
    return turns


def with_tools(example: dict, record: dict, fields: Fields) -> dict:
    tools = _tools(record, fields)
    if tools:
        example["tools"] = tools
    return example


def normalise_conversation(record: dict, fields: Fields, name: str) -> dict:
    turns = with_system_column(message_list(record, fields, name), record, fields)
    label = fields.label(name)
    check_assistant_content(turns, label)
    check_turn_order(turns, label, last="assistant")
    return with_tools({"messages": turns}, record, fields)


def single_turn(system: str, prompt: str, answer: str) -> dict:
    turns = [{"role": "system", "content": system}] if system.strip() else []
    turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": turns}


def answer_text(record: dict, fields: Fields, name: str) -> str:
    value = text_field(record, fields, name)
    if not value.strip():
        raise RowProblem("empty_assistant", f"The {fields.label(name)} field (the assistant's answer) is empty.")
    return value


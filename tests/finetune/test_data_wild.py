"""finetune.data on files as people really write them: single JSON objects, plain text, LLaMA-Factory's alpaca,
sharegpt, preference and KTO layouts, OpenAI tool calls, media columns, cp1252 CSVs, mixed layouts, zips, gzip
bombs and the row/time budget. Every file is built here, in the shape the projects document (no fetched data)."""
import gzip
import json

import pytest

from finetune.data import check_options, iter_examples, process_dataset, token_lengths
from finetune.errors import DatasetError
from finetune.tokenize import IGNORE, encode_example, supports_tools


def run(tmp_path, content, name="upload.bin", **kwargs):
    src = tmp_path / name
    src.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "normalised.jsonl"
    report = process_dataset(src, out, **kwargs)
    return report, (list(iter_examples(out)) if out.exists() else [])


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------------------------ single JSON object


def test_pretty_printed_single_example_is_one_row(tmp_path):
    report, rows = run(tmp_path, json.dumps({"messages": [user("hi"), assistant("hello")]}, indent=2))
    assert report.status == "ready" and report.format == "json" and report.schema == "messages"
    assert rows == [{"messages": [user("hi"), assistant("hello")]}]


def test_single_object_holding_the_examples_under_one_key(tmp_path):
    body = {"version": 2, "data": [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]}
    report, rows = run(tmp_path, json.dumps(body, indent=2))
    assert report.status == "ready" and report.schema == "alpaca" and report.valid_rows == 3
    assert rows[2]["messages"] == [user("q2"), assistant("a2")]


def test_single_object_with_two_lists_names_them(tmp_path):
    body = {"train": [{"text": "a"}], "test": [{"text": "b"}]}
    with pytest.raises(DatasetError, match="'train', 'test'"):
        run(tmp_path, json.dumps(body, indent=2))


def test_garbage_starting_with_a_brace_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="neither JSON Lines .* nor one JSON object: .* line 1, column 3"):
        run(tmp_path, "{ this is not json\n  at all\n")


# ------------------------------------------------------------------------------------------------ plain text


def test_txt_is_plain_text_split_at_blank_lines(tmp_path):
    text = "Title, with a comma\nsecond line\n\n\nAnother document\r\n\r\nthird,one\n"
    report, rows = run(tmp_path, text, name="notes.txt", file_name="notes.txt")
    assert report.status == "ready" and report.format == "txt" and report.schema == "text"
    assert rows == [{"text": "Title, with a comma\nsecond line"}, {"text": "Another document"},
                    {"text": "third,one"}]


def test_schema_text_reads_a_headerless_file_as_plain_text(tmp_path):
    report, rows = run(tmp_path, "a,a\nb,c\n", schema="text")
    assert report.status == "ready" and report.format == "txt" and rows == [{"text": "a,a\nb,c"}]


def test_txt_with_bad_bytes_names_the_document_line(tmp_path):
    report, _ = run(tmp_path, b"fine\n\ncaf\xe9\n", name="d.txt", file_name="d.txt")
    assert report.status == "invalid"
    assert report.errors[0]["row"] == 3 and report.errors[0]["kind"] == "non_utf8"


# ------------------------------------------------------------------------------------------------ LLaMA-Factory


def test_alpaca_with_system_and_history(tmp_path):
    row = {"instruction": "And France?", "input": "", "output": "Paris", "system": "Be brief.",
           "history": [["Capital of Italy?", "Rome"]]}
    report, rows = run(tmp_path, json.dumps([row]))
    assert report.schema == "alpaca" and report.status == "ready"
    assert rows[0]["messages"] == [{"role": "system", "content": "Be brief."}, user("Capital of Italy?"),
                                   assistant("Rome"), user("And France?"), assistant("Paris")]


def test_sharegpt_with_function_call_observation_and_tools(tmp_path):
    tools = [{"name": "weather", "description": "Weather in a city", "parameters": {"type": "object"}}]
    row = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "It is sunny."},
    ], "system": "You help.", "tools": json.dumps(tools)}
    report, rows = run(tmp_path, json.dumps([row]))
    assert report.schema == "sharegpt" and report.status == "ready" and report.tool_rows == 1
    messages = rows[0]["messages"]
    assert messages[0] == {"role": "system", "content": "You help."}
    assert messages[2]["tool_calls"] == [{"type": "function",
                                          "function": {"name": "weather", "arguments": {"city": "Paris"}}}]
    assert messages[3] == {"role": "tool", "content": "sunny"}
    assert rows[0]["tools"] == [{"type": "function", "function": tools[0]}]


def test_sharegpt_preference_with_message_objects_is_detected(tmp_path):
    row = {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                             {"from": "human", "value": "q2"}],
           "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}
    report, rows = run(tmp_path, json.dumps([row, row | {"chosen": {"from": "gpt", "value": "fine"}}]))
    assert report.schema == "preference" and report.schema_detected == "preference" and report.valid_rows == 2
    assert rows[0] == {"prompt": [user("q1"), assistant("a1"), user("q2")], "chosen": "good", "rejected": "bad"}


def test_alpaca_preference_with_text_answers(tmp_path):
    row = {"instruction": "Summarise", "input": "long text", "chosen": "short", "rejected": "long"}
    report, rows = run(tmp_path, json.dumps([row]))
    assert report.schema == "preference"
    assert rows == [{"prompt": [user("Summarise\n\nlong text")], "chosen": "short", "rejected": "long"}]


@pytest.mark.parametrize("layout", ["alpaca_kto_tag", "messages_label", "prompt_completion_label_csv"])
def test_kto_layouts_keep_their_labels(tmp_path, layout):
    if layout == "alpaca_kto_tag":
        content = json.dumps([{"instruction": "q", "output": "a", "kto_tag": True},
                              {"instruction": "q", "output": "b", "kto_tag": False}])
    elif layout == "messages_label":
        content = "".join(json.dumps({"messages": [user("q"), assistant(a)], "label": label}) + "\n"
                          for a, label in (("a", True), ("b", False)))
    else:
        content = "prompt,completion,label\nq,a,true\nq,b,false\n"
    report, rows = run(tmp_path, content)
    assert report.schema == "kto" and report.status == "ready"
    assert report.kto_labels == {"desirable": 1, "undesirable": 1}
    assert [(r["messages"][-1]["content"], r["label"]) for r in rows] == [("a", True), ("b", False)]


def test_kto_label_that_is_not_a_boolean_is_a_row_problem(tmp_path):
    report, _ = run(tmp_path, json.dumps([{"instruction": "q", "output": "a", "kto_tag": "maybe"}]))
    assert report.status == "invalid" and "'kto_tag'" in report.errors[0]["message"]
    assert "true" in report.errors[0]["message"]


# ------------------------------------------------------------------------------------------------ OpenAI tools


def test_openai_tool_calls_and_tool_turns(tmp_path):
    row = {"messages": [
        user("Weather?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "snow"},
        assistant("Snow."),
    ], "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}]}
    report, rows = run(tmp_path, json.dumps(row) + "\n")
    assert report.status == "ready" and report.tool_rows == 1
    assert rows[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}


def test_tool_call_without_its_result_is_a_turn_order_problem(tmp_path):
    row = {"messages": [user("Weather?"), {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "w", "arguments": {}}}]}, assistant("done")]}
    report, _ = run(tmp_path, json.dumps(row) + "\n")
    assert report.status == "invalid" and report.problem_counts == {"turn_order": 1}
    assert "not the tool's result" in report.errors[0]["message"]


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<call>{{ c['function'] | tojson }}</call>"
    "{% endfor %}{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tools_render_through_a_template_that_supports_them(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not supports_tools(tok)  # the tiny model's plain ChatML template
    tok.chat_template = TOOLS_TEMPLATE
    assert supports_tools(tok)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    example = {"messages": [user("Weather?"), {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "snow"}, assistant("Snow.")], "tools": tools}
    encoded = encode_example(example, tok, 512)
    text = tok.decode(encoded.input_ids)
    assert "Tools:" in text and "weather" in text and "<call>" in text
    learned = tok.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE])
    assert "<call>" in learned and "Snow." in learned  # the call and the answer are learned
    assert "snow" not in learned.replace("Snow.", "")  # the tool's result is context, not learned
    (length,) = token_lengths([example], tok)
    assert length == len(encoded.input_ids)


# ------------------------------------------------------------------------------------------------ refusals and errors


@pytest.mark.parametrize("column", ["images", "audio", "videos"])
def test_media_rows_are_refused_naming_the_column(tmp_path, column):
    rows = [{"instruction": "<image>What is it?", "output": "a cat", column: ["x.png"]}]
    report, _ = run(tmp_path, json.dumps(rows))
    assert report.status == "invalid" and report.problem_counts == {"unsupported": 1}
    assert f"'{column}'" in report.errors[0]["message"] and "text-only" in report.errors[0]["message"]


def test_zip_gets_its_own_message(tmp_path):
    with pytest.raises(DatasetError, match="zip archives are not supported; upload the .jsonl/.csv inside"):
        run(tmp_path, b"PK\x03\x04\x14\x00\x00\x00rest of a zip")


def test_cp1252_csv_names_column_line_and_encoding(tmp_path):
    content = "prompt,completion\nhello,fine\nbonjour,caf\xe9 cr\xe8me\n".encode("cp1252")
    report, _ = run(tmp_path, content, drop_invalid=True)
    (error,) = report.errors
    assert error["row"] == 3 and error["kind"] == "non_utf8"
    assert "Column 'completion' on line 3" in error["message"] and "Windows-1252" in error["message"]
    assert "[0]" not in error["message"]


def test_mixed_layouts_are_reported_as_mixed(tmp_path):
    content = "".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(3))
    content += json.dumps({"messages": [user("q"), assistant("a")]}) + "\n"
    report, _ = run(tmp_path, content)
    message = report.errors[0]["message"]
    assert report.errors[0]["row"] == 4 and "laid out as messages" in message and "alpaca" in message


def test_unknown_column_map_key_is_refused_with_its_name():
    with pytest.raises(DatasetError, match="'answer_column'"):
        check_options(None, {"answer_column": "a"})


def test_gzip_bomb_stops_while_streaming_and_names_no_setting(tmp_path):
    rows = b"".join(json.dumps({"text": "x" * 100}).encode() + b"\n" for _ in range(10))
    bomb = gzip.compress(rows + b"\n" * (80 * 1024 * 1024))  # 80 MiB of blank lines: about 80 KiB compressed
    with pytest.raises(DatasetError) as caught:
        run(tmp_path, bomb, max_decompressed_bytes=8 * 1024 * 1024)
    message = str(caught.value)
    assert "gzip bomb" in message and "max_decompressed_bytes" not in message


def test_row_and_time_budgets_stop_the_reading(tmp_path):
    content = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(2000))
    with pytest.raises(DatasetError, match="more than 1,000 rows"):
        run(tmp_path, content, max_rows=1000)
    with pytest.raises(DatasetError, match="longer than 0 minutes .* split it"):
        run(tmp_path, content, max_seconds=0.0)

"""finetune.data, round three (issue 35): the 59 real files a user uploaded, each case rebuilt here as a small file
in the same layout (written by the test, nothing fetched): plain text with one document per line, per-turn loss
weights, preference pairs with the prompt inside chosen/rejected, content parts with `value` or media, column
aliases, limits that act early (gzip, rows, NUL bytes), truncation counted per example, template placeholders and
a preview that shows what each layout trains on."""
import csv
import gzip
import io
import json

import pytest

from autotune.select import truncated_count
from finetune.data import LAYOUTS, iter_examples, process_dataset, token_lengths, token_stats
from finetune.data.lines import READ_CHUNK
from finetune.data.opening import DecompressedTooLarge
from finetune.errors import DatasetError
from finetune.tokenize import IGNORE, encode_example, preview_segments


def run(tmp_path, content, name="upload.bin", **kwargs):
    src = tmp_path / name
    src.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "normalised.jsonl"
    out.unlink(missing_ok=True)
    report = process_dataset(src, out, **kwargs)
    return report, (list(iter_examples(out)) if out.exists() else [])


def jsonl(*rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def kinds(entries):
    return [entry["kind"] for entry in entries]


# ------------------------------------------------------------------------------------------------ plain text


def wiki_lines(n):
    return [f"Article {i}: " + " ".join(f"word{i}_{j}" for j in range(40)) for i in range(n)]


def test_text_without_blank_lines_is_one_document_per_line_and_the_report_says_so(tmp_path):
    lines = wiki_lines(12)
    report, rows = run(tmp_path, "\n".join(lines) + "\n\n\n", "wiki_demo.txt", file_name="wiki_demo.txt")
    assert report.status == "ready" and report.schema == "text" and report.total_rows == 12
    assert rows == [{"text": line} for line in lines]
    (note,) = [w for w in report.warnings if w["kind"] == "note"]
    assert note["row"] is None and "each line is read as one document" in note["message"]
    assert report.problem_counts == {}  # a note, not a problem


def test_text_with_blank_lines_or_few_lines_keeps_its_documents_whole(tmp_path):
    report, rows = run(tmp_path, "\n".join(wiki_lines(10)[:3]) + "\n\n" + "\n".join(wiki_lines(10)[3:]),
                       "d.txt", file_name="d.txt")
    assert len(rows) == 2 and rows[0]["text"].count("\n") == 2 and "note" not in kinds(report.warnings)
    report, rows = run(tmp_path, "a poem\nof four\nshort\nlines\n", "p.txt", file_name="p.txt")
    assert rows == [{"text": "a poem\nof four\nshort\nlines"}] and report.warnings == []


def test_an_example_far_longer_than_the_context_is_a_warning_naming_its_row(tmp_path):
    lines = wiki_lines(9)
    lines[4] = "long " * 20_000  # 100,000 characters: about 25,000 tokens
    report, _ = run(tmp_path, "\n".join(lines), "c.txt", file_name="c.txt", context_tokens=2048)
    assert report.status == "ready" and report.warning_counts == {"long_example": 1}
    (long,) = [w for w in report.warnings if w["kind"] == "long_example"]
    assert long["row"] == 5 and "100,000 characters" in long["message"] and "2,048-token context" in long["message"]
    report, _ = run(tmp_path, "\n".join(lines), "c.txt", file_name="c.txt", context_tokens=32768)
    assert report.warning_counts == {}  # not far longer than a larger context


# ------------------------------------------------------------------------------------------------ per-turn weights


def weighted_chat():
    return {"messages": [user("Hi"), assistant("Old answer.", weight=0), user("Again?"), assistant("New answer.",
                                                                                                  weight=1)]}


def test_openai_weight_0_turn_is_carried_in_the_normalised_example(tmp_path):
    report, rows = run(tmp_path, jsonl(weighted_chat()))
    assert report.status == "ready"
    assert rows == [{"messages": [user("Hi"), assistant("Old answer.", weight=0), user("Again?"),
                                  assistant("New answer.")]}]


def test_llama_factory_loss_weight_on_sharegpt_turns(tmp_path):
    row = {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1", "loss_weight": 0.0},
                             {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2", "loss_weight": 1.0}]}
    report, rows = run(tmp_path, jsonl(row))
    assert report.status == "ready" and report.schema == "sharegpt"
    assert rows[0]["messages"][1] == assistant("A1", weight=0) and "weight" not in rows[0]["messages"][3]


def test_weights_that_leave_nothing_or_are_not_0_or_1_are_row_problems(tmp_path):
    nothing = {"messages": [user("Q"), assistant("A", weight=0)]}
    half = {"messages": [user("Q"), assistant("A", weight=0.5)]}
    report, _ = run(tmp_path, jsonl(weighted_chat(), nothing, half))
    assert report.status == "invalid" and report.problem_counts == {"empty_assistant": 1, "wrong_type": 1}
    by_row = {e["row"]: e["message"] for e in report.errors}
    assert "weight 0, so nothing in the row would be trained" in by_row[2]
    assert "weight 0.5; only 0 (not trained) and 1 (trained)" in by_row[3]


def learned_text(tok, encoded):
    return tok.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE])


def test_a_weighted_out_turn_gets_ignore_labels(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    _, (example,) = run(tmp_path, jsonl(weighted_chat()))
    encoded = encode_example(example, tok, 512)
    assert "New answer." in learned_text(tok, encoded) and "Old answer." not in learned_text(tok, encoded)
    assert "Old answer." in tok.decode(encoded.input_ids)  # still there, as context
    everything = encode_example(example, tok, 512, completion_only=False)
    assert "Hi" in learned_text(tok, everything) and "Old answer." not in learned_text(tok, everything)
    plain = encode_example({"messages": [user("Hi"), assistant("Old answer."), user("Again?"),
                                         assistant("New answer.")]}, tok, 512)
    assert plain.input_ids == encoded.input_ids  # the weight is not rendered into the text
    assert list(token_lengths([example], tok)) == [len(encoded.input_ids)]  # and counted as training renders it


# ------------------------------------------------------------------------------------------------ implicit prompts


def hh(*turns):
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


def test_hh_rlhf_text_is_split_into_prompt_chosen_and_rejected(tmp_path):
    shared = [("Human", "Hi there"), ("Assistant", "Hello!"), ("Human", "Capital of France?")]
    rows = [{"chosen": hh(*shared, ("Assistant", "Paris.")), "rejected": hh(*shared, ("Assistant", "Lyon."))},
            {"chosen": hh(("Human", "2+2?"), ("Assistant", "4.\n\nIt is four.")),
             "rejected": hh(("Human", "2+2?"), ("Assistant", "5."))}]
    report, examples = run(tmp_path, jsonl(*rows))
    assert report.status == "ready" and report.schema == report.schema_detected == "preference_implicit"
    assert LAYOUTS[report.schema].yields == "preference"
    assert examples == [
        {"prompt": [user("Hi there"), assistant("Hello!"), user("Capital of France?")], "chosen": "Paris.",
         "rejected": "Lyon."},
        {"prompt": [user("2+2?")], "chosen": "4.\n\nIt is four.", "rejected": "5."},
    ]


def test_trl_message_lists_sharing_their_first_turns_are_split(tmp_path):
    rows = [{"chosen": [user("Q"), assistant("Good.")], "rejected": [user("Q"), assistant("Bad.")], "score": 8}]
    report, examples = run(tmp_path, jsonl(*rows))
    assert report.schema == "preference_implicit"
    assert examples == [{"prompt": [user("Q")], "chosen": "Good.", "rejected": "Bad."}]
    # the same as CSV cells holding the lists as JSON text
    out = io.StringIO()
    csv.writer(out).writerows([["chosen", "rejected"], [json.dumps(rows[0]["chosen"]), json.dumps(rows[0]["rejected"])]])
    report, csv_examples = run(tmp_path, out.getvalue())
    assert report.format == "csv" and csv_examples == examples


def test_pairs_that_part_before_their_last_answer_or_hold_no_prompt_are_row_problems(tmp_path):
    rows = [{"chosen": [user("Q"), assistant("A")], "rejected": [user("Q"), assistant("B")]},
            {"chosen": [user("Q1"), assistant("A")], "rejected": [user("Q2"), assistant("B")]},
            {"chosen": "Just an answer.", "rejected": "Another answer."}]
    report, _ = run(tmp_path, jsonl(*rows))
    assert report.schema == "preference_implicit" and report.status == "invalid"
    by_row = {e["row"]: e for e in report.errors}
    assert by_row[2]["kind"] == "turn_order" and "differ at turn 1" in by_row[2]["message"]
    assert by_row[3]["kind"] == "missing_field" and "Human:" in by_row[3]["message"]


def test_a_prompt_column_keeps_the_explicit_preference_layout(tmp_path):
    report, _ = run(tmp_path, jsonl({"prompt": "Q", "chosen": "A", "rejected": "B"}))
    assert report.schema == "preference" and report.schema_candidates == ["preference"]


# ------------------------------------------------------------------------------------------------ content parts


def test_content_parts_with_value_are_text_and_media_parts_are_named(tmp_path):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "value": "Describe "},
                                                        {"type": "text", "value": "it."}]},
                          {"role": "assistant", "content": [{"type": "text", "value": "A cat.", "image": None}]}]}
    report, rows = run(tmp_path, jsonl(parts))
    assert report.status == "ready" and rows == [{"messages": [user("Describe it."), assistant("A cat.")]}]
    picture = {"messages": [{"role": "user", "content": [{"type": "image", "value": None},
                                                          {"type": "text", "value": "What is this?"}]},
                            assistant("A dog.")]}
    report, _ = run(tmp_path, jsonl(picture, picture))
    assert report.problem_counts == {"unsupported": 2}
    message = report.errors[0]["message"]
    assert "has an image (content part 1, type 'image')" in message and "text-only" in message


# ------------------------------------------------------------------------------------------------ column aliases


@pytest.mark.parametrize("row,schema,expected", [
    ({"query": "2+2?", "response": "4"}, "alpaca", [user("2+2?"), assistant("4")]),  # MetaMathQA
    ({"instruction": "Summarise", "context": "Long text.", "response": "Short."}, "alpaca",  # Dolly
     [user("Summarise\n\nLong text."), assistant("Short.")]),
    ({"instruction": "Name a colour", "answer": "Blue."}, "alpaca", [user("Name a colour"), assistant("Blue.")]),
    ({"prompt": "Hi", "response": "Hello."}, "prompt_completion", [user("Hi"), assistant("Hello.")]),
    ({"prompt": "Hi", "answer": "Hello."}, "prompt_completion", [user("Hi"), assistant("Hello.")]),
])
def test_common_column_names_are_read_as_our_fields_with_a_note(tmp_path, row, schema, expected):
    report, rows = run(tmp_path, jsonl(row))
    assert report.status == "ready" and report.schema == report.schema_detected == schema
    assert rows == [{"messages": expected}]
    (note,) = [w["message"] for w in report.warnings if w["kind"] == "note"]
    assert note.startswith("Columns read by their common names:") and "column_map" in note
    assert ("'response' as" in note) == ("response" in row)


def test_aliases_never_guess_and_never_override_the_users_columns(tmp_path):
    with pytest.raises(DatasetError, match="match no known schema"):  # response and answer: which is the answer?
        run(tmp_path, jsonl({"query": "Q", "response": "R", "answer": "A"}))
    report, rows = run(tmp_path, jsonl({"query": "Q", "response": "R", "answer": "A"}),
                       column_map={"output": "answer"})
    assert report.schema == "alpaca" and rows == [{"messages": [user("Q"), assistant("A")]}]
    report, rows = run(tmp_path, jsonl({"instruction": "I", "output": "O", "response": "R"}))
    assert rows == [{"messages": [user("I"), assistant("O")]}] and report.warnings == []


def test_an_aliased_column_is_named_in_row_problems(tmp_path):
    report, _ = run(tmp_path, jsonl({"query": "Q", "response": "R"}, {"query": "Q2", "response": ""}))
    assert report.errors[0]["message"] == "The 'response' (used as output) field (the assistant's answer) is empty."


# ------------------------------------------------------------------------------------------------ limits


def test_a_gzip_bomb_stops_at_the_cap_before_any_row_is_read(tmp_path):
    cap = 3 * 1024 * 1024
    first = gzip.compress(b'{"text": "not even json"\n' + b"\n" * (200 * 1024 * 1024))  # about 200 KiB
    last = gzip.compress(b'{"text": "a small last member"}\n')  # its trailer says 33 bytes
    with pytest.raises(DecompressedTooLarge, match="gzip bomb") as caught:
        run(tmp_path, first + last, max_decompressed_bytes=cap)
    assert cap < caught.value.bytes_read <= cap + READ_CHUNK
    assert not (tmp_path / "normalised.jsonl").exists()


def test_a_line_over_the_row_cap_is_that_rows_problem_and_the_rest_is_read(tmp_path):
    rows = jsonl({"text": "one"}) + json.dumps({"text": "x" * 5000}) + "\n" + jsonl({"text": "three"})
    report, _ = run(tmp_path, rows, max_row_bytes=1000)
    assert report.total_rows == 3 and report.valid_rows == 2 and report.problem_counts == {"too_long": 1}
    (problem,) = report.errors
    assert problem["row"] == 2 and "4.9 KiB, more than the 1000 bytes one row may have" in problem["message"]
    report, rows = run(tmp_path, rows, max_row_bytes=1000, drop_invalid=True)
    assert report.status == "ready" and rows == [{"text": "one"}, {"text": "three"}]


@pytest.mark.parametrize("fmt", ["txt", "csv", "json"])
def test_the_row_cap_holds_in_other_formats(tmp_path, fmt):
    texts = ["short one", "y" * 3000, "short three"]
    if fmt == "txt":
        content, kwargs = "\n\n".join(texts), {"file_name": "d.txt"}
    elif fmt == "csv":
        content, kwargs = "text\n" + "\n".join(texts) + "\n", {}
    else:
        content, kwargs = json.dumps([{"text": t} for t in texts]), {}
    report, _ = run(tmp_path, content, max_row_bytes=1000, **kwargs)
    assert report.format == fmt and report.problem_counts == {"too_long": 1} and report.valid_rows == 2
    assert report.errors[0]["row"] == {"txt": 3, "csv": 3, "json": 2}[fmt]


def test_the_default_row_cap_is_a_mebibyte(tmp_path):
    report, _ = run(tmp_path, jsonl({"text": "fine"}, {"text": "z" * (1024 * 1024 + 10)}))
    assert report.problem_counts == {"too_long": 1} and report.errors[0]["row"] == 2


@pytest.mark.parametrize("fmt,content,row", [
    ("jsonl", b'{"text": "a"}\n{"text": "b\x00c"}\n{"text": "d"}\n', 2),
    ("txt", b"first document\n\nsecond \x00 document\n\nthird\n", 3),
    ("csv", b"prompt,completion\nhi,there\nbad\x00cell,x\nok,fine\n", 3),
    ("json", b'[{"text": "a"}, {"text": "b\x00c"}, {"text": "d"}]', 2),
])
def test_a_nul_byte_in_one_row_is_that_rows_problem(tmp_path, fmt, content, row):
    report, _ = run(tmp_path, content, **({"file_name": "d.txt"} if fmt == "txt" else {}))
    assert report.format == fmt and report.problem_counts == {"nul_byte": 1} and report.valid_rows == 2
    (problem,) = report.errors
    assert problem["row"] == row and "NUL byte" in problem["message"]


def test_binary_and_utf16_files_are_still_refused_whole(tmp_path):
    with pytest.raises(DatasetError, match="binary"):
        run(tmp_path, b"\x00\x01\x02\x03garbage")
    with pytest.raises(DatasetError, match="binary"):
        run(tmp_path, jsonl({"text": "hello"}).encode("utf-16-le"))
    with pytest.raises(DatasetError, match="UTF-16 text; save it as UTF-8"):
        run(tmp_path, jsonl({"text": "hello"}).encode("utf-16"))
    with pytest.raises(DatasetError, match="UTF-16 text; save it as UTF-8"):  # a .txt name skips sniffing, not this
        run(tmp_path, "Some notes.\n".encode("utf-16"), "notes.txt", file_name="notes.txt")


def test_truncation_is_counted_per_example_not_interpolated():
    lengths = [230_243] + [300 + 10 * i for i in range(45)]  # the wiki_demo file: one huge example among 46
    stats = token_stats(lengths)
    assert stats["longest"][:2] == [230_243, 740] and len(stats["longest"]) == 46
    assert truncated_count(stats, 8192) == 1 and truncated_count(stats, 8000) == 1
    assert truncated_count(stats, 500) == 25
    many = token_stats([5000] * 1500 + [100] * 1500)  # more long examples than are kept: the cut-offs still count
    assert len(many["longest"]) == 1000 and truncated_count(many, 4096) == 1500


# ------------------------------------------------------------------------------------------------ placeholders


def test_template_placeholders_are_a_warning_with_a_count_and_an_example(tmp_path):
    rows = [{"prompt": "Hello", "completion": "Hi."},
            {"prompt": "Write to {{customer_name}} about {{ order.id }}", "completion": "Dear customer..."},
            {"prompt": "Hi {{name}}", "completion": "Hello."}]
    report, _ = run(tmp_path, jsonl(*rows))
    assert report.status == "ready" and report.warning_counts == {"placeholder": 2}
    (warning,) = [w for w in report.warnings if w["kind"] == "placeholder"]
    assert warning["row"] == 2 and warning["message"].startswith("2 rows contain template placeholders such as "
                                                                "{{customer_name}}")


# ------------------------------------------------------------------------------------------------ preview


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trained(segments, **marks):
    return "".join(s["text"] for s in segments if s["trained"] and all(s.get(k) == v for k, v in marks.items()))


def test_preview_of_a_pair_shows_both_answers(tok):
    example = {"prompt": [user("Capital of France?")], "chosen": "Paris.", "rejected": "Lyon."}
    segments = preview_segments(example, tok)
    assert "Paris." in trained(segments) and "Lyon." not in trained(segments, rejected=None)
    assert "Lyon." in trained(segments, rejected=True)
    notes = [s["text"] for s in segments if s.get("note")]
    assert notes[0].startswith("Chosen answer") and notes[1].strip().startswith("Rejected answer")
    text = "".join(s["text"] for s in segments)
    assert text.count("Capital of France?") == 1  # the shared prompt is shown once


def test_preview_shows_the_kto_label_and_turns_excluded_by_weight(tok):
    kto = {"messages": [user("Q"), assistant("A bad answer.")], "label": False}
    segments = preview_segments(kto, tok)
    assert segments[0] == {"text": "KTO label: undesirable (this answer is made less likely)\n", "trained": False,
                           "note": True}
    weighted = {"messages": [user("Hi"), assistant("Old answer.", weight=0), user("Again?"),
                             assistant("New answer.")]}
    segments = preview_segments(weighted, tok)
    excluded = "".join(s["text"] for s in segments if s.get("excluded"))
    assert "Old answer." in excluded and "Old answer." not in trained(segments)
    assert "New answer." in trained(segments) and not any(s.get("excluded") and s["trained"] for s in segments)

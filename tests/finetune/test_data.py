"""finetune.data: formats, schemas, row problems, drop policy, split, duplicates, overlap and token statistics."""
import csv
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune.data import (
    dedup,
    iter_examples,
    overlap_report,
    process_dataset,
    split_dataset,
    token_lengths,
    token_stats,
)
from finetune.errors import DatasetError

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------ helpers


def chat(*pairs, system=None):
    turns = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return turns


def encode_rows(rows, fmt):
    """Serialise dict rows in `fmt`; nested values become JSON text in CSV/TSV cells."""
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == "json":
        return json.dumps(rows, indent=1).encode()
    if fmt in ("csv", "tsv"):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        out = io.StringIO()
        writer = csv.writer(out, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow([v if isinstance(v, str) else json.dumps(v) for v in (r.get(c, "") for c in columns)])
        return out.getvalue().encode()
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        return sink.getvalue()
    raise ValueError(fmt)


def write(path, rows, fmt, gz=False):
    payload = encode_rows(rows, fmt)
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def run(tmp_path, content, **kwargs):
    src = tmp_path / "upload.bin"
    src.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "normalised.jsonl"
    return process_dataset(src, out, **kwargs), out


def rows_of(report, kind):
    return [e["row"] for e in report.errors + report.warnings if e["kind"] == kind]


def only_problem(report, kind):
    assert report.problem_counts == {kind: 1}, report.to_dict()
    (problem,) = [e for e in report.errors + report.warnings if e["kind"] == kind]
    return problem


# Rows per schema, each with the normalised examples they must produce.
SCHEMA_CASES = {
    "messages": (
        [{"messages": chat(("hi", "hello"), system="be brief")}, {"messages": chat(("a", "b"), ("c", "d"))}],
        [{"messages": chat(("hi", "hello"), system="be brief")}, {"messages": chat(("a", "b"), ("c", "d"))}],
    ),
    "sharegpt": (
        [{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                            {"from": "gpt", "value": "a"}]},
         {"conversations": [{"from": "user", "value": "q2"}, {"from": "model", "value": "a2"}]}],
        [{"messages": chat(("q", "a"), system="s")}, {"messages": chat(("q2", "a2"))}],
    ),
    "prompt_completion": (
        [{"prompt": "2+2?", "completion": "4"}, {"prompt": "Capital of France?", "completion": "Paris"}],
        [{"messages": chat(("2+2?", "4"))}, {"messages": chat(("Capital of France?", "Paris"))}],
    ),
    "alpaca": (
        [{"instruction": "Translate", "input": "cat", "output": "chat"},
         {"instruction": "Say hi", "input": "", "output": "hi"}],
        [{"messages": chat(("Translate\n\ncat", "chat"))}, {"messages": chat(("Say hi", "hi"))}],
    ),
    "text": (
        [{"text": "The quick brown fox."}, {"text": "Jumps over the lazy dog."}],
        [{"text": "The quick brown fox."}, {"text": "Jumps over the lazy dog."}],
    ),
    "preference": (
        [{"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No."},
         {"prompt": "Is fire cold?", "chosen": "No.", "rejected": "Yes."}],
        [{"prompt": [{"role": "user", "content": "Is the sky blue?"}], "chosen": "Yes.", "rejected": "No."},
         {"prompt": [{"role": "user", "content": "Is fire cold?"}], "chosen": "No.", "rejected": "Yes."}],
    ),
}


# ------------------------------------------------------------------------------------------------ formats x schemas


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet"])
@pytest.mark.parametrize("schema", list(SCHEMA_CASES))
def test_every_format_and_schema_normalises(tmp_path, fmt, gz, schema):
    rows, expected = SCHEMA_CASES[schema]
    rows = [dict(r, id=i) for i, r in enumerate(rows)]  # an extra column, ignored; it also makes TSV tell-able
    src = write(tmp_path / "data.upload", rows, fmt, gz)
    report = process_dataset(src, tmp_path / "out.jsonl")
    assert report.status == "ready", report.to_dict()
    assert (report.format, report.compressed) == (fmt, gz)
    assert report.schema == report.schema_detected == schema
    assert schema in report.schema_candidates
    assert report.total_rows == report.valid_rows == 2
    assert list(iter_examples(tmp_path / "out.jsonl")) == expected


def test_report_to_dict_is_json_serialisable(tmp_path):
    rows, _ = SCHEMA_CASES["messages"]
    report = process_dataset(write(tmp_path / "d", rows, "jsonl"), tmp_path / "o.jsonl")
    d = json.loads(json.dumps(report.to_dict()))
    for key in ("status", "format", "compressed", "schema", "schema_detected", "schema_candidates", "columns",
                "total_rows", "valid_rows", "dropped_rows", "problem_counts", "errors", "warnings",
                "near_duplicates"):
        assert key in d
    assert d["columns"] == ["messages"]


def test_format_is_sniffed_from_content_not_name(tmp_path):
    rows, expected = SCHEMA_CASES["prompt_completion"]
    report = process_dataset(write(tmp_path / "really.csv", rows, "jsonl"), tmp_path / "o.jsonl")
    assert report.format == "jsonl" and report.status == "ready"
    report = process_dataset(write(tmp_path / "really.jsonl", rows, "csv"), tmp_path / "o.jsonl")
    assert report.format == "csv" and report.status == "ready"
    report = process_dataset(write(tmp_path / "data.txt", rows, "parquet", gz=True), tmp_path / "o.jsonl")
    assert (report.format, report.compressed) == ("parquet", True)
    assert list(iter_examples(tmp_path / "o.jsonl")) == expected


def test_bom_crlf_and_trailing_blank_lines_are_accepted(tmp_path):
    lines = [json.dumps({"prompt": "p", "completion": "c"}), json.dumps({"prompt": "q", "completion": "d"})]
    report, _ = run(tmp_path, b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n\r\n  \r\n\n")
    assert report.status == "ready" and report.total_rows == 2 and not report.problem_counts

    report, out = run(tmp_path, b"\xef\xbb\xbfprompt,completion\r\nhello,world\r\n\"multi\r\nline\",x\r\n\r\n\r\n")
    assert report.format == "csv" and report.status == "ready", report.to_dict()
    assert report.columns == ["prompt", "completion"]
    assert [e["messages"][0]["content"] for e in iter_examples(out)] == ["hello", "multi\r\nline"]

    report, _ = run(tmp_path, b"\xef\xbb\xbf[\r\n" + json.dumps({"text": "a"}).encode() + b"\r\n]\r\n\r\n")
    assert report.format == "json" and report.status == "ready"


def test_completion_only_csv_single_column_text(tmp_path):
    report, out = run(tmp_path, "text\nfirst line\nsecond line\n")
    assert report.schema == "text" and report.valid_rows == 2
    assert [e["text"] for e in iter_examples(out)] == ["first line", "second line"]


def test_messages_as_json_text_in_csv_cells(tmp_path):
    rows = [{"messages": json.dumps(chat(("q", "a")))}]
    report = process_dataset(write(tmp_path / "d", rows, "csv"), tmp_path / "o.jsonl")
    assert report.status == "ready" and report.schema == "messages"
    report, _ = run(tmp_path, 'messages\n"[{""role"": ""user"", ""content"": ""q""},"\n')
    assert only_problem(report, "malformed_json")["row"] == 2


def test_openai_content_parts_are_joined(tmp_path):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "y"}]},
                        {"role": "assistant", "content": "hi"}]}
    report, out = run(tmp_path, json.dumps(row) + "\n")
    assert report.status == "ready"
    assert next(iter_examples(out))["messages"][0]["content"] == "hey"


def test_preference_with_message_lists(tmp_path):
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    row = {"prompt": prompt, "chosen": prompt + [{"role": "assistant", "content": "good"}],
           "rejected": [{"role": "assistant", "content": "bad"}]}
    report, out = run(tmp_path, json.dumps(row) + "\n")
    assert report.status == "ready" and report.schema == "preference"
    assert list(iter_examples(out)) == [{"prompt": prompt, "chosen": "good", "rejected": "bad"}]

    row["rejected"] = prompt  # ends with the user, not an answer
    report, _ = run(tmp_path, json.dumps(row) + "\n")
    assert "'rejected'" in only_problem(report, "turn_order")["message"]


def test_alpaca_optional_system_and_missing_input(tmp_path):
    row = {"instruction": "Do it", "output": "done", "system": "you are terse"}
    report, out = run(tmp_path, json.dumps(row) + "\n")
    assert list(iter_examples(out)) == [{"messages": chat(("Do it", "done"), system="you are terse")}]


def test_large_json_array_streams_across_chunks(tmp_path):
    rows = [{"prompt": f"question {i} " + "x" * 200, "completion": str(i), "score": 12345.678} for i in range(15000)]
    src = write(tmp_path / "big.json", rows, "json")
    assert src.stat().st_size > 3 * 1024 * 1024  # several read chunks
    report = process_dataset(src, tmp_path / "o.jsonl")
    assert report.status == "ready" and report.valid_rows == 15000
    assert next(iter_examples(tmp_path / "o.jsonl"))["messages"][1]["content"] == "0"


# ------------------------------------------------------------------------------------------------ whole-file errors


@pytest.mark.parametrize("content", [b"", b"\n\n  \r\n", b"\xef\xbb\xbf", gzip.compress(b""), b"[]", b"[ \n ]"],
                         ids=["zero-bytes", "blank-lines", "bom-only", "empty-gzip", "empty-array", "spaced-array"])
def test_empty_file_is_a_clear_error(tmp_path, content):
    with pytest.raises(DatasetError, match="empty"):
        run(tmp_path, content)
    assert not (tmp_path / "normalised.jsonl").exists()


def test_header_only_csv_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="header row but no data rows"):
        run(tmp_path, "prompt,completion\n\n")


def test_gzip_bomb_is_refused_with_explicit_cap(tmp_path):
    payload = (json.dumps({"text": "a" * 100}) + "\n").encode() * 20000  # ~2 MB, compresses ~200x
    with pytest.raises(DatasetError, match="gzip bomb"):
        run(tmp_path, gzip.compress(payload), max_decompressed_bytes=1_000_000)
    report, _ = run(tmp_path, gzip.compress(payload), max_decompressed_bytes=10_000_000)
    assert report.total_rows == 20000


def test_gzip_bomb_is_refused_by_default(tmp_path):
    src = tmp_path / "bomb.jsonl.gz"
    with gzip.open(src, "wb", compresslevel=9) as f:
        f.write(b'{"text": "a"}\n')
        for _ in range(70):  # 70 MiB of blank lines: over the 64 MiB floor and over 100x the compressed size
            f.write(b" " * (1024 * 1024 - 1) + b"\n")
    assert src.stat().st_size < 500_000
    with pytest.raises(DatasetError, match="gzip bomb"):
        process_dataset(src, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()
    assert list(tmp_path.iterdir()) == [src]  # no temporary output left behind


def test_corrupt_gzip_is_a_dataset_error(tmp_path):
    payload = gzip.compress(b'{"text": "hello"}\n' * 1000)
    with pytest.raises(DatasetError, match="gzip"):
        run(tmp_path, payload[: len(payload) // 2])


def test_binary_and_unknown_content(tmp_path):
    with pytest.raises(DatasetError, match="binary"):
        run(tmp_path, b"\x00\x01\x02\x03garbage")
    with pytest.raises(DatasetError, match="Parquet"):
        run(tmp_path, b"PAR1 not really parquet")


def test_malformed_json_array_is_a_dataset_error_naming_the_record(tmp_path):
    with pytest.raises(DatasetError, match="record 2"):
        run(tmp_path, b'[{"text": "a"}, {"text": ]')
    with pytest.raises(DatasetError, match="record 1"):
        run(tmp_path, b'[{"text": "a"}')


def test_unrecognised_columns_name_the_columns_and_suggest_column_map(tmp_path):
    with pytest.raises(DatasetError, match="'question', 'answer'.*column_map"):
        run(tmp_path, "question,answer\nq,a\n")


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="Unknown schema"):
        run(tmp_path, '{"text": "a"}\n', schema="chatml")
    with pytest.raises(DatasetError, match="'answerz'"):
        run(tmp_path, '{"text": "a"}\n', column_map={"answerz": "x"})


# ------------------------------------------------------------------------------------------------ row problems


def line(obj):
    return json.dumps(obj) + "\n"


GOOD = line({"messages": chat(("q", "a"))})


@pytest.mark.parametrize(
    "bad_line,kind,phrases",
    [
        ("{not json\n", "malformed_json", ["not valid JSON"]),
        (line([1, 2]), "wrong_type", ["JSON object", "a list"]),
        (line({"messages": "hello"}), "wrong_type", ["'messages'", "list of messages", "text"]),
        (line({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}), "wrong_type",
         ["Turn 1", "number"]),
        (line({"messages": ["hi"]}), "wrong_type", ["Turn 1", "object"]),
        (line({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}), "missing_field",
         ["Turn 1", "'role'"]),
        (line({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}), "missing_field",
         ["Turn 1", "content"]),
        (line({"messages": chat(("q", "a")) + [{"role": "narrator", "content": "x"}]}), "unknown_role",
         ["Turn 3", "'narrator'"]),
        (line({"messages": chat(("q", "a")) + [{"role": "tool", "content": "x"}]}), "turn_order",
         ["Turn 3", "tool result", "tool calls"]),
        (line({"messages": chat(("q", "  "))}), "empty_assistant", ["Turn 2", "empty"]),
        (line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}),
         "empty_assistant", ["Turn 2"]),
        (line({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                            {"role": "assistant", "content": "a"}]}), "turn_order", ["Turns 1 and 2", "user"]),
        (line({"messages": chat(("q", "a")) + [{"role": "system", "content": "s"}]}), "turn_order",
         ["Turn 3", "system", "only come first"]),
        (line({"messages": chat(("q", "a")) + [{"role": "user", "content": "more"}]}), "turn_order",
         ["ends with a user turn"]),
        (line({"messages": [{"role": "user", "content": "q"}]}), "turn_order", ["no assistant turn"]),
        (line({"messages": [{"role": "assistant", "content": "hi"}]}), "turn_order", ["start with the user"]),
        (line({"messages": []}), "turn_order", ["empty"]),
        (line({"messages": [{"role": "system", "content": "s"}]}), "turn_order", ["only a system message"]),
        (line({"other": 1}), "missing_field", ["'messages'"]),
        (line({"messages": [{"role": "user", "content": "caf\udce9"}, {"role": "assistant", "content": "a"}]}),
         "non_utf8", ["UTF-8"]),
    ],
)
def test_each_row_problem_has_its_kind_row_and_message(tmp_path, bad_line, kind, phrases):
    report, out = run(tmp_path, GOOD + GOOD.replace('"a"', '"b"') + bad_line + GOOD.replace('"q"', '"z"'))
    problem = only_problem(report, kind)
    assert problem["row"] == 3
    for phrase in phrases:
        assert phrase in problem["message"], problem["message"]
    assert report.status == "invalid" and "1 of 4 rows" in report.reason
    assert not out.exists()


def test_non_utf8_bytes_in_a_jsonl_line(tmp_path):
    content = GOOD.encode() + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
    report, _ = run(tmp_path, content)
    problem = only_problem(report, "non_utf8")
    assert problem["row"] == 2 and "UTF-8" in problem["message"] and "byte" in problem["message"]


def test_non_utf8_bytes_in_csv_and_json_array(tmp_path):
    report, _ = run(tmp_path, b"prompt,completion\nok,fine\ncaf\xe9,au lait\n")
    assert only_problem(report, "non_utf8")["row"] == 3
    report, _ = run(tmp_path, b'[{"text": "ok"}, {"text": "caf\xe9"}]')
    assert only_problem(report, "non_utf8")["row"] == 2


def test_csv_row_numbers_are_physical_lines_of_the_record_start(tmp_path):
    content = 'prompt,completion\n"two\nlines",a\n\n"three\n\nlines",\nlast,b\nx,y,z\n'
    report, _ = run(tmp_path, content)
    assert rows_of(report, "empty_assistant") == [5]
    assert rows_of(report, "wrong_type") == [9]
    assert "3 values" in report.errors[-1]["message"]
    assert report.total_rows == 4


def test_json_array_and_parquet_rows_are_record_indexes(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}, {"prompt": "d", "completion": "e"}]
    for fmt in ("json", "parquet"):
        report = process_dataset(write(tmp_path / f"d.{fmt}", rows, fmt), tmp_path / "o.jsonl")
        assert rows_of(report, "empty_assistant") == [2]


def test_missing_field_names_the_users_column_when_mapped(tmp_path):
    content = line({"question": "q", "answer": "a"}) + line({"question": "q2"})
    report, out = run(tmp_path, content, column_map={"prompt": "question", "completion": "answer"})
    assert report.schema_detected == "prompt_completion"
    problem = only_problem(report, "missing_field")
    assert problem["row"] == 2 and "'answer' (used as completion)" in problem["message"]


def test_wrong_type_for_a_number_answer(tmp_path):
    report, _ = run(tmp_path, line({"prompt": "2+2", "completion": 4}))
    problem = only_problem(report, "wrong_type")
    assert "'completion'" in problem["message"] and "number (4)" in problem["message"]


def test_problem_examples_are_capped_per_kind_but_counted_in_full(tmp_path):
    content = GOOD + "oops\n" * 12 + line({"messages": chat(("q", ""))}) * 3
    report, _ = run(tmp_path, content, max_problem_examples=2)
    assert report.problem_counts == {"malformed_json": 12, "empty_assistant": 3}
    assert [e["row"] for e in report.errors] == [2, 3, 14, 15]


def test_schema_override_and_candidates(tmp_path):
    content = line({"prompt": "p", "completion": "c", "text": "t"})
    report, out = run(tmp_path, content)
    assert report.schema_detected == "prompt_completion"
    assert report.schema_candidates == ["prompt_completion", "text"]
    report, out = run(tmp_path, content, schema="text")
    assert (report.schema, report.schema_detected) == ("text", "prompt_completion")
    assert list(iter_examples(out)) == [{"text": "t"}]


# ------------------------------------------------------------------------------------------------ drop policy


def test_drop_invalid_drops_and_counts_by_kind(tmp_path):
    content = GOOD + "oops\n" + line({"messages": chat(("q", ""))}) + GOOD.replace('"a"', '"b"') + "bad\n"
    report, out = run(tmp_path, content, drop_invalid=True)
    assert report.status == "ready" and report.reason is None
    assert report.total_rows == 5 and report.valid_rows == 2 and report.dropped_rows == 3
    assert report.dropped_counts == {"malformed_json": 2, "empty_assistant": 1}
    assert report.problem_counts == {"malformed_json": 2, "empty_assistant": 1}
    assert len(list(iter_examples(out))) == 2


def test_duplicates_are_warnings_kept_unless_dropped(tmp_path):
    content = GOOD + GOOD.replace('"q"', '"other"') + GOOD
    report, out = run(tmp_path, content)
    assert report.status == "ready" and report.valid_rows == 3 and report.dropped_rows == 0
    assert report.warnings == [{"row": 3, "kind": "duplicate",
                                "message": "The row is an exact duplicate of row 1 (after normalisation)."}]
    assert report.errors == []
    report, out = run(tmp_path, content, drop_duplicates=True)
    assert report.valid_rows == 2 and report.dropped_counts == {"duplicate": 1}
    assert len(list(iter_examples(out))) == 2


def test_duplicates_are_detected_after_normalisation(tmp_path):
    a = line({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    b = line({"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}], "id": 7})
    report, _ = run(tmp_path, a + b)
    assert rows_of(report, "duplicate") == [2]


def test_no_valid_rows_is_invalid_even_when_dropping(tmp_path):
    report, out = run(tmp_path, "{oops\n{nope\n", drop_invalid=True)
    assert report.status == "invalid" and report.valid_rows == 0 and report.dropped_rows == 2
    assert report.reason.startswith("No row is usable")
    assert report.schema is None
    assert not out.exists()


def test_failure_leaves_no_partial_output(tmp_path):
    src = tmp_path / "d.json"
    src.write_text("[" + ", ".join(json.dumps({"text": f"row {i}"}) for i in range(200)) + ', {"text": ')
    out = tmp_path / "out" / "normalised.jsonl"
    with pytest.raises(DatasetError):
        process_dataset(src, out)
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_progress_is_reported_and_ends_at_one(tmp_path):
    seen = []
    content = "".join(line({"text": f"row {i}"}) for i in range(10000))
    run(tmp_path, content, progress=seen.append)
    assert len(seen) > 2 and seen[-1] == 1.0
    assert all(0 <= f <= 1 for f in seen) and seen == sorted(seen)


# ------------------------------------------------------------------------------------------------ near duplicates


LONG = ("The committee met on Tuesday to discuss the budget for next year, including new hires, office space, "
        "travel costs and a plan to replace the ageing servers in the basement before winter arrives.")


def test_near_duplicates_within_a_file(tmp_path):
    rows = [{"text": LONG}, {"text": "Something else entirely, about cats and the way they sleep all day long."},
            {"text": LONG.upper().replace(",", "") + "!!"}, {"text": LONG + " Soon."}]
    report, _ = run(tmp_path, "".join(line(r) for r in rows))
    near = report.near_duplicates
    assert near["count"] == 2 and near["threshold"] == 0.8
    assert [(e["row"], e["similar_to_row"]) for e in near["examples"]] == [(3, 1), (4, 1)]
    assert near["rows_examined"] == 4 and near["rows_not_examined"] == 0 and near["note"] is None
    assert report.problem_counts == {}  # near duplicates are information, not problems


def test_near_duplicate_cap_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(dedup, "NEAR_DUPLICATE_MAX_ROWS", 3)
    report, _ = run(tmp_path, "".join(line({"text": f"row number {i}"}) for i in range(10)))
    near = report.near_duplicates
    assert near["rows_examined"] == 3 and near["rows_not_examined"] == 7 and "first 3" in near["note"]


# ------------------------------------------------------------------------------------------------ split and overlap


def write_normalised(path, n):
    path.write_text("".join(line({"messages": chat((f"question {i}", f"answer {i}"))}) for i in range(n)))
    return path


def test_split_is_deterministic_and_sized(tmp_path):
    src = write_normalised(tmp_path / "all.jsonl", 200)
    a = split_dataset(src, tmp_path / "t1", tmp_path / "v1", fraction=0.1, seed=7)
    b = split_dataset(src, tmp_path / "t2", tmp_path / "v2", fraction=0.1, seed=7)
    c = split_dataset(src, tmp_path / "t3", tmp_path / "v3", fraction=0.1, seed=8)
    assert a == b == c == (180, 20)
    assert (tmp_path / "v1").read_text() == (tmp_path / "v2").read_text() != (tmp_path / "v3").read_text()
    train, val = list(iter_examples(tmp_path / "t1")), list(iter_examples(tmp_path / "v1"))
    assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, iter_examples(src)))
    original = [json.dumps(e) for e in iter_examples(src)]
    assert [json.dumps(e) for e in train] == [x for x in original if x in set(map(json.dumps, train))]  # order kept


def test_split_keeps_a_training_row_and_handles_edges(tmp_path):
    one = write_normalised(tmp_path / "one.jsonl", 1)
    assert split_dataset(one, tmp_path / "t", tmp_path / "v", fraction=0.5, seed=0) == (1, 0)
    two = write_normalised(tmp_path / "two.jsonl", 2)
    assert split_dataset(two, tmp_path / "t", tmp_path / "v", fraction=0.9, seed=0) == (1, 1)
    assert split_dataset(two, tmp_path / "t", tmp_path / "v", fraction=0.01, seed=0) == (1, 1)
    assert split_dataset(two, tmp_path / "t", tmp_path / "v", fraction=0, seed=0) == (2, 0)
    assert (tmp_path / "v").read_text() == ""
    with pytest.raises(DatasetError, match="below 1"):
        split_dataset(two, tmp_path / "t", tmp_path / "v", fraction=1.0, seed=0)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetError, match="no rows"):
        split_dataset(tmp_path / "empty.jsonl", tmp_path / "t", tmp_path / "v", fraction=0.1, seed=0)


def test_identical_rows_land_on_the_same_side(tmp_path):
    rows = [line({"text": f"row {i % 50}"}) for i in range(500)]
    src = tmp_path / "all.jsonl"
    src.write_text("".join(rows))
    split_dataset(src, tmp_path / "t", tmp_path / "v", fraction=0.2, seed=3)
    train, val = set((tmp_path / "t").read_text().splitlines()), set((tmp_path / "v").read_text().splitlines())
    assert len(train & val) <= 1  # only the boundary hash can straddle


def test_overlap_report_counts_exact_and_near(tmp_path):
    train = tmp_path / "train.jsonl"
    val = tmp_path / "val.jsonl"
    train.write_text(line({"text": LONG}) + line({"text": "alpha beta gamma delta"}) + line({"text": "other"}))
    val.write_text(line({"text": "alpha beta gamma delta"}) + line({"text": "Note: " + LONG})
                   + line({"text": "fresh words only here"}))
    report = overlap_report(train, val)
    assert (report["exact"], report["near"]) == (1, 1)
    assert report["validation_rows"] == 3 and report["train_rows"] == 3
    kinds = {(e["kind"], e["train_row"], e["validation_row"]) for e in report["examples"]}
    assert kinds == {("exact", 2, 1), ("near", 1, 2)}


# ------------------------------------------------------------------------------------------------ token statistics


def test_token_stats_on_known_input():
    stats = token_stats(range(1, 101), truncation_points=(50, 99, 100))
    assert (stats["count"], stats["min"], stats["max"]) == (100, 1, 100)
    assert (stats["p50"], stats["p95"], stats["p99"]) == (50, 95, 99)
    assert stats["mean"] == 50.5
    assert stats["truncated"] == {"50": 50, "99": 1, "100": 0}
    assert stats["histogram"]["edges"] == list(range(1, 102, 5))
    assert stats["histogram"]["counts"] == [5] * 20
    json.dumps(stats)


def test_token_stats_edge_cases():
    same = token_stats([7, 7, 7])
    assert same["histogram"] == {"edges": [7, 8], "counts": [3]}
    assert same["p50"] == same["p99"] == 7 and same["truncated"]["256"] == 0
    empty = token_stats([])
    assert empty["count"] == 0 and empty["histogram"]["counts"] == []
    odd = token_stats([1, 1000])
    assert sum(odd["histogram"]["counts"]) == 2 and len(odd["histogram"]["counts"]) <= 20
    assert odd["histogram"]["edges"][-1] > 1000


def test_token_lengths_render_like_training(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = chat(("What is the capital of France?", "Paris"), system="You are a helpful assistant.")
    examples = [
        {"messages": messages},
        {"text": "The quick brown fox"},
        {"prompt": messages[:2], "chosen": "Paris", "rejected": "Lyon"},
    ] * 3
    lengths = list(token_lengths(examples, tok, batch_size=2))
    chat_len = len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])
    text_len = len(tok("The quick brown fox")["input_ids"])
    rejected = messages[:2] + [{"role": "assistant", "content": "Lyon"}]
    rejected_len = len(tok(tok.apply_chat_template(rejected, tokenize=False), add_special_tokens=False)["input_ids"])
    # A preference pair counts the longer of prompt + chosen and prompt + rejected: training runs both.
    assert rejected_len > chat_len
    assert lengths == [chat_len, text_len, rejected_len] * 3
    assert chat_len > text_len > 0


def test_module_does_not_import_torch_or_transformers():
    code = "import sys, finetune.data; print(any(m in sys.modules for m in ('torch', 'transformers', 'django')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class WhitespaceTokenizer:
    """No chat template and no Rust backend: exercises the plain fallbacks."""

    chat_template = None

    def __call__(self, texts, add_special_tokens=True, return_attention_mask=False):
        extra = 1 if add_special_tokens else 0
        return {"input_ids": [t.split() + ["<s>"] * extra for t in texts]}


def test_token_lengths_without_template_or_fast_backend():
    examples = [{"messages": chat(("one two", "three"))}, {"text": "a b c"}]
    # "user: one two\nassistant: three" -> 5 words; text gets one special token
    assert list(token_lengths(examples, WhitespaceTokenizer())) == [5, 4]


def test_minhash_signatures_do_not_depend_on_the_batch():
    index = dedup.MinHashIndex(10)
    texts = [["a"], ["x", "y"], "the quick brown fox jumps".split(), ["p", "q", "r"], []]
    together = index.signatures(texts)
    for i, words in enumerate(texts):
        assert (index.signatures([words])[0] == together[i]).all()

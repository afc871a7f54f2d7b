"""Fuzzing finetune.data.process_dataset: whatever the bytes, it returns a report or raises DatasetError, quickly."""
import csv
import gzip
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.data import iter_examples, process_dataset
from finetune.errors import DatasetError

FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(["messages", "conversations", "prompt", "completion", "chosen", "rejected",
                               "instruction", "input", "output", "text", "role", "content", "from", "value", "x"])
roles = st.sampled_from(["system", "user", "assistant", "human", "gpt", "model", "tool", "", 3])
turns = st.fixed_dictionaries({}, optional={"role": roles, "content": json_values | st.text(max_size=10),
                                            "from": roles, "value": st.text(max_size=10)})
schema_like = st.dictionaries(field_names, json_values | st.lists(turns, max_size=4) | st.text(max_size=30),
                              max_size=4)


def check(payload: bytes, **kwargs):
    with tempfile.TemporaryDirectory() as folder:
        src, out = Path(folder) / "upload", Path(folder) / "out.jsonl"
        src.write_bytes(payload)
        try:
            report = process_dataset(src, out, **kwargs)
        except DatasetError as exc:
            assert str(exc)
            assert not out.exists()
            return
        d = report.to_dict()
        json.dumps(d)
        assert d["status"] in ("ready", "invalid")
        assert d["total_rows"] >= d["valid_rows"] >= 0
        if d["status"] == "ready":
            assert sum(1 for _ in iter_examples(out)) == d["valid_rows"]
        else:
            assert not out.exists()


@FUZZ
@given(st.binary(max_size=2000), st.booleans())
def test_random_bytes(payload, compress):
    check(gzip.compress(payload) if compress else payload)


@FUZZ
@given(st.lists(schema_like | json_values, min_size=1, max_size=20), st.booleans(), st.booleans())
def test_random_json_rows(rows, as_array, drop_invalid):
    if as_array:
        payload = json.dumps(rows).encode()
    else:
        payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
    check(payload, drop_invalid=drop_invalid)


@FUZZ
@given(st.lists(st.text(max_size=200), min_size=1, max_size=20), st.sampled_from(["", "\xef\xbb\xbf"]))
def test_random_jsonl_lines(lines, prefix):
    check((prefix + "\n".join(lines)).encode("utf-8", "surrogatepass"))


@FUZZ
@given(
    st.lists(field_names, min_size=1, max_size=4, unique=True),
    st.lists(st.lists(st.text(max_size=30), max_size=6), min_size=0, max_size=15),
    st.sampled_from([",", "\t"]),
    st.sampled_from([None, "text", "prompt_completion", "messages", "preference"]),
)
def test_random_csv(header, rows, delimiter, schema):
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter)
    writer.writerow(header)
    writer.writerows(rows)
    check(out.getvalue().encode("utf-8", "surrogatepass"), schema=schema)


@FUZZ
@given(st.binary(min_size=1, max_size=300), st.integers(min_value=0, max_value=400))
def test_corrupted_valid_files(noise, position):
    good = b"".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}).encode() + b"\n" for i in range(20))
    position = min(position, len(good))
    check(good[:position] + noise + good[position:])
    check(gzip.compress(good)[: position // 2 + 10] + noise)

"""Adding a dataset layout is one register_layout(...) entry (docs/internals.md "Where to add"): a layout registered
here, in the test and not in the product, is detected, normalised, accepted as schema= and in column_map, and can
carry a KTO label, exactly like the built-in layouts of finetune/data/layouts.py."""
import json

import pytest

from finetune.data import LAYOUTS, SCHEMAS, check_options, iter_examples, process_dataset, register_layout
from finetune.data.conversation import answer_text, single_turn
from finetune.data.fields import text_field
from finetune.errors import DatasetError


def normalise_faq(record, fields):
    """{"question", "answer"} -> a one-turn chat; fields are read through `fields` so column_map works."""
    return single_turn("", text_field(record, fields, "question"), answer_text(record, fields, "answer"))


@pytest.fixture
def faq_layout():
    layout = register_layout("faq", required=("question", "answer"), normalise=normalise_faq, yields="chat",
                             chat=True)
    yield layout
    del LAYOUTS["faq"]  # the registry is process-wide: leave it as the product has it


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def faq_chat(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_a_registered_layout_is_detected_and_normalises_rows(tmp_path, faq_layout):
    src = write_rows(tmp_path / "faq.jsonl", [{"question": "Capital of France?", "answer": "Paris."},
                                              {"question": "2 + 2?", "answer": "4"}])
    report = process_dataset(src, tmp_path / "out.jsonl")
    assert report.status == "ready" and report.schema == "faq" and report.schema_detected == "faq"
    assert list(iter_examples(tmp_path / "out.jsonl")) == [faq_chat("Capital of France?", "Paris."),
                                                          faq_chat("2 + 2?", "4")]


def test_a_registered_layout_reports_row_problems_in_the_users_terms(tmp_path, faq_layout):
    src = write_rows(tmp_path / "faq.jsonl", [{"question": "Q1", "answer": "A1"}, {"question": "Q2"},
                                              {"question": "Q3", "answer": "   "}])
    report = process_dataset(src, tmp_path / "out.jsonl")
    assert report.status == "invalid" and report.schema == "faq"
    assert report.problem_counts == {"missing_field": 1, "empty_assistant": 1}
    assert report.errors[0]["row"] == 2 and "'answer'" in report.errors[0]["message"]


def test_a_registered_layout_is_a_schema_with_mappable_fields(tmp_path, faq_layout):
    assert "faq" in SCHEMAS
    check_options("faq", {"question": "q", "answer": "a"})  # known schema and fields: nothing raised
    src = write_rows(tmp_path / "mapped.jsonl", [{"q": "Why?", "a": "Because.", "text": "ignored"}])
    report = process_dataset(src, tmp_path / "out.jsonl", schema="faq", column_map={"question": "q", "answer": "a"})
    assert report.status == "ready" and report.schema == "faq" and report.schema_detected == "text"
    assert list(iter_examples(tmp_path / "out.jsonl")) == [faq_chat("Why?", "Because.")]


def test_a_registered_chat_layout_carries_kto_labels(tmp_path, faq_layout):
    src = write_rows(tmp_path / "kto.jsonl", [{"question": "Q", "answer": "Good.", "label": True},
                                              {"question": "Q", "answer": "Bad.", "label": False}])
    report = process_dataset(src, tmp_path / "out.jsonl")
    assert report.status == "ready" and report.schema == "kto"
    assert report.kto_labels == {"desirable": 1, "undesirable": 1}
    assert [e["label"] for e in iter_examples(tmp_path / "out.jsonl")] == [True, False]


def test_built_in_layouts_win_ties_unless_a_layout_says_otherwise(tmp_path, faq_layout):
    rows = [{"question": "Q", "answer": "A", "text": "Some text."}]  # fits both faq and text
    report = process_dataset(write_rows(tmp_path / "both.jsonl", rows), tmp_path / "out.jsonl")
    assert report.schema == "text" and report.schema_candidates == ["text", "faq"]


def test_an_unregistered_layout_is_refused_and_registration_is_checked(faq_layout):
    with pytest.raises(ValueError, match="already registered"):
        register_layout("faq", required=("question",), normalise=normalise_faq, yields="chat")
    with pytest.raises(ValueError, match="must yield one of"):
        register_layout("faq2", required=("question",), normalise=normalise_faq, yields="conversation")
    with pytest.raises(DatasetError, match="Unknown schema 'faq3'"):
        check_options("faq3", None)
    assert "faq2" not in SCHEMAS

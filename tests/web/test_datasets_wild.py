"""Datasets from the wild through the REST API and a real Celery worker: every upload ends ready or invalid with
a message, any dataset can be retried and deleted, a dead worker's dataset is found, and the new layouts (single
JSON object, plain text, LLaMA-Factory, KTO, tools, media) come back with the report the page shows."""
import json
from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from .conftest import api_session, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def api(live_server, user, tiny_base_model):
    return api_session(live_server)


def upload(api, content, filename="data.jsonl", **fields):
    return api.post(f"{api.base}/datasets", files={"file": (filename, content)}, data=fields)


def settled(api, response, worker):
    assert response.status_code in (200, 201, 202), response.text
    dataset_id = response.json()["id"]
    return wait_for(
        lambda: (d := api.get(f"{api.base}/datasets/{dataset_id}").json())["status"] != "validating" and d,
        what="dataset processing", log_proc=worker,
    )


def chat(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_pretty_printed_object_is_ready_and_reupload_takes_the_new_name(api, celery_worker):
    content = json.dumps({"data": [{"messages": chat(f"q{i}", f"a{i}")} for i in range(6)]}, indent=2).encode()
    dataset = settled(api, upload(api, content, "export.json"), celery_worker)
    assert dataset["status"] == "ready" and dataset["rows"] == 6 and dataset["format"] == "json", dataset
    again = upload(api, content, "export.json", name="support v2")
    assert again.status_code == 200 and again.json()["id"] == dataset["id"]
    assert again.json()["name"] == "support v2"
    assert api.get(f"{api.base}/datasets/{dataset['id']}").json()["name"] == "support v2"


def test_txt_is_plain_text_and_zip_is_named(api, celery_worker):
    text = settled(api, upload(api, b"First, document.\n\nSecond; document\n", "notes.txt"), celery_worker)
    assert text["status"] == "ready" and text["format"] == "txt" and text["schema"] == "text" and text["rows"] == 2
    zipped = settled(api, upload(api, b"PK\x03\x04\x14\x00rest", "data.zip"), celery_worker)
    assert zipped["status"] == "invalid"
    assert zipped["error"].startswith("zip archives are not supported; upload the .jsonl/.csv inside")


def test_kto_dataset_plans_kto_and_refuses_sft(api, celery_worker):
    rows = [{"instruction": q, "output": a, "kto_tag": good}
            for q, a, good in [("ping", "pong", True), ("ping", "no", False)] * 5]
    dataset = settled(api, upload(api, json.dumps(rows).encode(), "kto.json"), celery_worker)
    assert dataset["status"] == "ready" and dataset["schema"] == "kto", dataset
    detail = api.get(f"{api.base}/datasets/{dataset['id']}").json()
    assert detail["report"]["kto_labels"] == {"desirable": 5, "undesirable": 5}
    plan = api.post(f"{api.base}/plans", json={"dataset": dataset["id"]}).json()
    assert plan["method"] == "kto" and plan["kto_beta"] > 0, plan
    refused = api.post(f"{api.base}/plans", json={"dataset": dataset["id"], "method": "lora"})
    assert refused.status_code == 400 and "kto_tag/label" in refused.json()["error"]["message"]


def test_preference_token_stats_count_the_longer_answer(api, celery_worker):
    rows = [{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "ok"},
             "rejected": {"from": "gpt", "value": "a much longer rejected answer " * 8}} for _ in range(4)]
    rows += [dict(rows[0], conversations=[{"from": "human", "value": f"q{i}"}]) for i in range(4)]
    dataset = settled(api, upload(api, json.dumps(rows).encode(), "pref.json"), celery_worker)
    assert dataset["status"] == "ready" and dataset["schema"] == "preference", dataset
    assert dataset["token_stats"]["min"] > 50  # the rejected answer alone is ~50 tokens; "ok" is one or two


def test_tools_refused_by_a_template_without_tools_support_and_media_refused(api, celery_worker):
    row = {"messages": [{"role": "user", "content": "Weather?"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                        {"role": "tool", "content": "sun"}, {"role": "assistant", "content": "Sunny."}],
           "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}]}
    tools = settled(api, upload(api, (json.dumps(row) + "\n").encode(), "tools.jsonl"), celery_worker)
    assert tools["status"] == "invalid"
    assert "'tools' column" in tools["error"] and "no tools support" in tools["error"]
    images = [{"instruction": "<image>What?", "output": "cat", "images": ["cat.png"]}]
    media = settled(api, upload(api, json.dumps(images).encode(), "mm.json"), celery_worker)
    assert media["status"] == "invalid" and "'images'" in media["errors"][0]["message"]


def test_cp1252_csv_error_names_column_and_line(api, celery_worker):
    content = "prompt,completion\nhi,caf\xe9\nyo,ok\n".encode("cp1252")
    dataset = settled(api, upload(api, content, "export.csv"), celery_worker)
    assert dataset["status"] == "invalid"
    (error,) = dataset["errors"]
    assert error["row"] == 2 and "Column 'completion' on line 2" in error["message"]


def test_unknown_column_map_key_is_refused_at_upload(api):
    response = upload(api, b'{"q": "a", "r": "b"}\n', column_map=json.dumps({"question": "q"}))
    error = response.json()["error"]
    assert response.status_code == 400 and "'question'" in error["message"] and error["details"]["field"] == "column_map"


def test_retry_and_delete_any_dataset(api, celery_worker):
    dataset = settled(api, upload(api, b"PK\x03\x04\x14\x00rest", "data.zip"), celery_worker)
    assert dataset["status"] == "invalid"
    retried = api.post(f"{api.base}/datasets/{dataset['id']}/retry")
    assert retried.status_code == 202 and retried.json()["status"] == "validating"
    again = settled(api, retried, celery_worker)
    assert again["status"] == "invalid" and "zip" in again["error"]
    assert api.delete(f"{api.base}/datasets/{dataset['id']}").status_code == 204
    assert api.get(f"{api.base}/datasets/{dataset['id']}").status_code == 404


def test_delete_while_validating_is_allowed_and_not_brought_back(api):
    from jobs.models import Dataset
    from jobs.services.dataset_processing import _mark_dataset_invalid

    response = upload(api, b'{"text": "x"}\n', "one.jsonl")
    dataset = Dataset.objects.get(pk=response.json()["id"])
    Dataset.objects.filter(pk=dataset.pk).update(status="validating")
    assert api.delete(f"{api.base}/datasets/{dataset.pk}").status_code == 204
    _mark_dataset_invalid(dataset, "late result of a worker", {})  # what a worker finishing afterwards does
    assert not Dataset.objects.filter(pk=dataset.pk).exists()


def test_a_live_worker_blocks_retry_with_409(api, celery_worker):
    from jobs.models import Dataset

    response = upload(api, b'{"text": "x"}\n', "one.jsonl")
    settled(api, response, celery_worker)
    Dataset.objects.filter(pk=response.json()["id"]).update(status="validating", heartbeat_at=timezone.now())
    refused = api.post(f"{api.base}/datasets/{response.json()['id']}/retry")
    assert refused.status_code == 409 and "being processed" in refused.json()["error"]["message"]


def test_unexpected_failure_marks_the_dataset_invalid_with_the_reason(user, tiny_base_model, tmp_path,
                                                                      monkeypatch, settings):
    from finetune import data
    from jobs.models import Dataset
    from jobs.services.dataset_processing import process_dataset

    source = tmp_path / "source"
    source.write_text("".join(json.dumps({"messages": chat(f"q{i}", "a")}) + "\n" for i in range(4)))
    dataset = Dataset.objects.create(owner=user, name="d", content_hash="h", file_path=str(source), size_bytes=10)

    def broken_split(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(data, "split_dataset", broken_split)  # a fault injected into a real processing run
    process_dataset(dataset.pk)
    dataset.refresh_from_db()
    assert dataset.status == "invalid" and dataset.heartbeat_at is None
    assert "RuntimeError: disk on fire" in dataset.error and "Retry" in dataset.error


def test_dead_workers_datasets_are_requeued_then_failed(api, celery_worker, settings):
    from jobs.models import Dataset
    from jobs.services.dataset_processing import recover_stuck_datasets

    response = upload(api, b'{"text": "fine"}\n{"text": "also fine"}\n', "orphan.jsonl")
    first = settled(api, response, celery_worker)
    long_ago = timezone.now() - timedelta(seconds=settings.DATASET_LEASE_SECONDS + 60)
    # As a worker that died mid-way leaves it: validating, an old lease, one attempt made.
    Dataset.objects.filter(pk=first["id"]).update(status="validating", heartbeat_at=long_ago, attempts=1)
    assert recover_stuck_datasets()["requeued"] == [first["id"]]
    assert settled(api, response, celery_worker)["status"] == "ready"

    Dataset.objects.filter(pk=first["id"]).update(status="validating", heartbeat_at=long_ago, attempts=2)
    assert recover_stuck_datasets()["failed"] == [first["id"]]
    failed = api.get(f"{api.base}/datasets/{first['id']}").json()
    assert failed["status"] == "invalid" and "stopped 2 times" in failed["error"]


def test_large_files_go_to_their_own_queue(user, tiny_base_model):
    from jobs.models import Dataset
    from jobs.queue import dataset_queue, send_dataset_processing
    from tunedeck.celery import app

    with override_settings(DATASET_LARGE_BYTES=1000, DATASET_LARGE_QUEUE="datasets-large-test22"):
        assert dataset_queue(999) == "default" and dataset_queue(1001) == "datasets-large-test22"
        dataset = Dataset.objects.create(owner=user, name="big", content_hash="b", file_path="/nonexistent",
                                         size_bytes=5000)
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            channel.queue_declare("datasets-large-test22", durable=True, auto_delete=False)
            channel.queue_purge("datasets-large-test22")
            send_dataset_processing(dataset.pk, dataset.size_bytes)
            assert channel.queue_declare("datasets-large-test22", passive=True).message_count == 1
            channel.queue_purge("datasets-large-test22")


def test_retry_and_delete_of_another_users_dataset_are_404(api, other_user, client):
    from jobs.models import Dataset

    theirs = Dataset.objects.create(owner=other_user, name="theirs", content_hash="t", file_path="/nonexistent",
                                    status="invalid")
    assert api.post(f"{api.base}/datasets/{theirs.pk}/retry").status_code == 404
    assert api.delete(f"{api.base}/datasets/{theirs.pk}").status_code == 404
    client.login(username="alice", password="alice-pw")
    assert client.post(f"/datasets/{theirs.pk}/retry").status_code == 404
    assert client.post(f"/datasets/{theirs.pk}/delete").status_code == 404
    assert Dataset.objects.filter(pk=theirs.pk, status="invalid").exists()


def test_token_statistics_stop_at_their_time_limit_and_say_so(tiny_model_dir, tmp_path, settings):
    from transformers import AutoTokenizer

    from finetune import data
    from jobs.services.dataset_processing import _bounded_token_stats

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": chat(f"q{i}", "a")}) + "\n" for i in range(2500)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    settings.DATASET_TOKEN_STATS_SECONDS = 0
    stats = _bounded_token_stats(data, path, tokenizer, 2500)
    assert stats["counted"] == 1000 and stats["rows"] == 2500 and "first 1,000 of 2,500 rows" in stats["note"]
    settings.DATASET_TOKEN_STATS_SECONDS = 600
    assert _bounded_token_stats(data, path, tokenizer, 2500)["counted"] == 2500

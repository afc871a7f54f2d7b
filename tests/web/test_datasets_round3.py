"""Issue 35's layouts through the REST API, a real Celery worker and the dataset page: the report's notes and
warnings reach the API and the page (file-level ones too), and the preview shows what each layout trains on
(both answers of a pair, a turn left out by its weight)."""
import json

import pytest

from .test_datasets_wild import api, settled, upload  # noqa: F401  (api is a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def hh(*turns):
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


def test_implicit_prompt_pairs_preview_both_answers_on_the_page(api, celery_worker, client, user):  # noqa: F811
    rows = [{"chosen": hh(("Human", f"Capital of country {i}?"), ("Assistant", f"City {i}.")),
             "rejected": hh(("Human", f"Capital of country {i}?"), ("Assistant", f"Nowhere {i}."))}
            for i in range(6)]
    dataset = settled(api, upload(api, "".join(json.dumps(r) + "\n" for r in rows).encode(), "hh.jsonl"),
                      celery_worker)
    assert dataset["status"] == "ready" and dataset["schema"] == "preference_implicit", dataset
    detail = api.get(f"{api.base}/datasets/{dataset['id']}").json()
    first = detail["preview"][0]
    assert any(s.get("rejected") and "Nowhere" in s["text"] for s in first)
    assert any(s["trained"] and not s.get("rejected") and "City" in s["text"] for s in first)
    client.force_login(user)
    page = client.get(f"/datasets/{dataset['id']}/").content.decode()
    assert "Rejected answer to the same prompt" in page and 'class="rejected"' in page

    plan = api.post(f"{api.base}/plans", json={"dataset": dataset["id"]}).json()  # the layout yields preference pairs
    assert plan["method"] == "dpo", plan
    refused = api.post(f"{api.base}/plans", json={"dataset": dataset["id"], "method": "lora"})
    assert refused.status_code == 400 and "dpo" in refused.json()["error"]["message"]


def test_notes_and_weights_reach_the_report_and_the_page(api, celery_worker, client, user):  # noqa: F811
    corpus = "".join(f"Document {i} says something different about topic {i}.\n" for i in range(12))
    text = settled(api, upload(api, corpus.encode(), "wiki_demo.txt"), celery_worker)
    assert text["status"] == "ready" and text["rows"] == 12, text
    report = api.get(f"{api.base}/datasets/{text['id']}").json()["report"]
    assert report["warnings"][0]["row"] is None and "one document per line" in report["warnings"][0]["message"]
    client.force_login(user)
    page = client.get(f"/datasets/{text['id']}/").content.decode()
    assert "<td>file</td><td>note</td>" in page and "each line is read as one document" in page

    chats = [{"messages": [{"role": "user", "content": f"Hi {i}"},
                           {"role": "assistant", "content": f"Draft {i}.", "weight": 0},
                           {"role": "user", "content": "Better?"},
                           {"role": "assistant", "content": f"Final {i}.", "weight": 1}]} for i in range(6)]
    weighted = settled(api, upload(api, "".join(json.dumps(c) + "\n" for c in chats).encode(), "openai.jsonl"),
                       celery_worker)
    assert weighted["status"] == "ready", weighted
    preview = api.get(f"{api.base}/datasets/{weighted['id']}").json()["preview"][0]
    assert any(s.get("excluded") and "Draft" in s["text"] for s in preview)
    assert not any(s["trained"] and "Draft" in s["text"] for s in preview)
    page = client.get(f"/datasets/{weighted['id']}/").content.decode()
    assert 'title="weight 0: this answer is context, not trained"' in page

"""Issue 35, column mapping in the browser and the API: a CSV whose columns match no layout comes out invalid with
its columns recorded, the dataset page offers a select per field with those columns and previews the first rows
under the chosen mapping, and processing again with the mapping makes the same dataset ready without a re-upload.
Only the owner may preview or reprocess; a column the file lacks or a field the layout lacks is a 400 naming it."""
import pytest
import requests

from jobs.models import Dataset, FineTuneJob

from .test_datasets_wild import api, settled, upload  # noqa: F401  (api is a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

CSV = ("question,reply\n" + "".join(f"What is {i} plus {i}?,It is {2 * i}.\n" for i in range(8))).encode()
MAPPING = {"prompt": "question", "completion": "reply"}


def unrecognised(api, worker, filename="faq.csv"):  # noqa: F811
    dataset = settled(api, upload(api, CSV, filename), worker)
    assert dataset["status"] == "invalid", dataset
    return dataset


def test_the_page_maps_the_columns_previews_and_processes_again(api, celery_worker, client, user):  # noqa: F811
    dataset = unrecognised(api, celery_worker)
    report = api.get(f"{api.base}/datasets/{dataset['id']}").json()["report"]
    assert report["columns"] == ["question", "reply"]
    assert report["sample_rows"][0] == {"row": 2, "record": {"question": "What is 0 plus 0?", "reply": "It is 0."}}
    assert "Map your columns" in dataset["error"] and f"/api/v1/datasets/{dataset['id']}/reprocess" in dataset["error"]

    client.force_login(user)
    page = client.get(f"/datasets/{dataset['id']}/").content.decode()
    assert 'id="column-mapping"' in page and 'name="map-prompt"' in page and 'name="map-completion"' in page
    assert '<option value="question">question</option>' in page and '<option value="reply">reply</option>' in page
    assert '<option value="prompt_completion" selected>' in page  # nothing fits: the simplest layout to start

    url = f"/datasets/{dataset['id']}/mapping"
    half = client.get(url, {"schema": "prompt_completion", "map-prompt": "question"}, HTTP_HX_REQUEST="true")
    assert half.status_code == 200 and "The row has no &#x27;completion&#x27; field." in half.content.decode()
    preview = client.get(url, {"schema": "prompt_completion", "map-prompt": "question", "map-completion": "reply"},
                         HTTP_HX_REQUEST="true").content.decode()
    assert "<dt>user</dt><dd>What is 1 plus 1?</dd>" in preview and "<dt>assistant</dt><dd>It is 2.</dd>" in preview
    assert '<option value="reply" selected>' in preview and "<html" not in preview  # the partial only

    refused = client.post(url, {"schema": "prompt_completion", "map-prompt": "question", "map-completion": "answer"})
    assert refused.status_code == 400 and "the file has no column &#x27;answer&#x27;" in refused.content.decode()

    files_before = Dataset.objects.count()
    sent = client.post(url, {"schema": "prompt_completion", "map-prompt": "question", "map-completion": "reply",
                             "map-system": ""})
    assert sent.status_code == 302 and sent.url == f"/datasets/{dataset['id']}/"
    ready = settled(api, api.get(f"{api.base}/datasets/{dataset['id']}"), celery_worker)
    assert ready["status"] == "ready" and ready["rows"] == 8 and ready["schema"] == "prompt_completion", ready
    assert ready["content_hash"] == dataset["content_hash"] and Dataset.objects.count() == files_before
    stored = Dataset.objects.get(pk=dataset["id"])
    assert stored.column_map == MAPPING and stored.schema_override == "prompt_completion"
    page = client.get(f"/datasets/{dataset['id']}/").content.decode()
    assert 'id="column-mapping"' not in page and 'id="train-button"' in page


def test_the_api_previews_and_reprocesses_only_for_the_owner(api, celery_worker, live_server, client,  # noqa: F811
                                                              other_user):
    dataset = unrecognised(api, celery_worker, "pairs.csv")
    base = f"{api.base}/datasets/{dataset['id']}"
    body = {"schema": "prompt_completion", "column_map": MAPPING}
    preview = api.post(f"{base}/mapping-preview", json=body)
    assert preview.status_code == 200, preview.text
    assert preview.json()["rows"][0] == {"row": 2, "example": {"messages": [
        {"role": "user", "content": "What is 0 plus 0?"}, {"role": "assistant", "content": "It is 0."}]}}

    bob = requests.Session()
    token = bob.post(f"{live_server.url}/api/v1/auth/token", json={"username": "bob", "password": "bob-pw"}).json()
    bob.headers["Authorization"] = f"Bearer {token['token']}"
    for path in ("mapping-preview", "reprocess"):
        assert bob.post(f"{base}/{path}", json=body).status_code == 404
    client.force_login(other_user)
    page = f"/datasets/{dataset['id']}/mapping"
    assert client.get(page, {"schema": "prompt_completion"}).status_code == 404
    assert client.post(page, {"schema": "prompt_completion", "map-prompt": "question"}).status_code == 404

    bad_column = api.post(f"{base}/reprocess", json={"schema": "prompt_completion",
                                                     "column_map": {"prompt": "question", "completion": "answer"}})
    assert bad_column.status_code == 400 and "'answer'" in bad_column.json()["error"]["message"]
    assert bad_column.json()["error"]["details"]["field"] == "column_map"
    bad_field = api.post(f"{base}/reprocess", json={"schema": "text", "column_map": {"prompt": "question"}})
    assert bad_field.status_code == 400 and "no field 'prompt'" in bad_field.json()["error"]["message"]
    incomplete = api.post(f"{base}/reprocess", json={"schema": "prompt_completion",
                                                     "column_map": {"prompt": "question"}})
    assert incomplete.status_code == 400 and "needs prompt, completion" in incomplete.json()["error"]["message"]
    assert api.post(f"{base}/reprocess", json={**body, "colum_map": {}}).status_code == 400

    again = api.post(f"{base}/reprocess", json=body)
    assert again.status_code == 202 and again.json()["id"] == dataset["id"], again.text
    ready = settled(api, again, celery_worker)
    assert ready["status"] == "ready" and ready["rows"] == 8, ready


def test_a_dataset_jobs_used_is_mapped_as_a_new_version(api, celery_worker, user, tiny_base_model):  # noqa: F811
    dataset = unrecognised(api, celery_worker, "used.csv")
    FineTuneJob.objects.create(owner=user, base_model=tiny_base_model, dataset_id=dataset["id"], plan={},
                               adapter_name="kept", status="failed")  # its lineage names this version
    response = api.post(f"{api.base}/datasets/{dataset['id']}/reprocess",
                        json={"schema": "prompt_completion", "column_map": MAPPING})
    assert response.status_code == 202 and response.json()["id"] != dataset["id"], response.text
    new = settled(api, response, celery_worker)
    assert new["status"] == "ready" and new["content_hash"] == dataset["content_hash"], new
    old = Dataset.objects.get(pk=dataset["id"])
    assert old.column_map == {} and old.status == "invalid"
    same = api.post(f"{api.base}/datasets/{dataset['id']}/reprocess",
                    json={"schema": "prompt_completion", "column_map": MAPPING})
    assert same.json()["id"] == new["id"]  # that mapping has its version already

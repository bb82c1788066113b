"""Feedback sessions through the real app: create, generation outcome, labeler keys and their
scope, assignment, labels, agreement, export, cancel.

The sample job's output is written into the real storage here the way the trainer publishes it
(``samples.jsonl``, then ``manifest.json``), and the job is moved to its end state in the DB; the
session then settles on its next read. tests/e2e/test_feedback.py runs the real trainer.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.api.conftest import Harness, auth
from tests.conftest import ADMIN_KEY
from tuneforge.storage import MANIFEST, file_key
from tuneforge.types import JobStatus, SampleRecord
from tuneforge_api.feedback.ingest import SAMPLES_FILE, samples_prefix
from tuneforge_api.feedback.labels import shuffled_for
from tuneforge_api.store import jobs

TINY = "tuneforge/tiny-llama"
PROMPTS = [
    {"prompt": "Name the capital of Tuneland."},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<script>x</script>?"},
        ]
    },
    {"prompt": "Where does the river go?"},
]


def prompts_file(api: Harness, key: str = ADMIN_KEY, rows: list[dict[str, Any]] = PROMPTS) -> str:
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    return api.upload(key=key, data=data, name="prompts.jsonl")["id"]


def create(api: Harness, key: str = ADMIN_KEY, **body: Any) -> Any:
    return api.http.post("/v1/feedback/sessions", json=body, headers=auth(key))


def new_session(api: Harness, key: str = ADMIN_KEY, k: int = 3, labels_per_item: int = 1) -> dict[str, Any]:
    r = create(
        api,
        key,
        model=TINY,
        prompts_file=prompts_file(api, key),
        k=k,
        labels_per_item=labels_per_item,
        sampling={"temperature": 0.7, "max_new_tokens": 16, "seed": 5},
    )
    assert r.status_code == 201, r.text
    return r.json()


def end_job(api: Harness, job_id: str, to: JobStatus, **values: Any) -> None:
    async def go() -> None:
        async with api.app.state.services.sessions() as session:
            assert await jobs.transition(session, job_id, (JobStatus.validating_files,), to, **values)
            await session.commit()

    api.http.portal.call(go)


def finish_generation(
    api: Harness, fbs: dict[str, Any], answers: list[list[str]] | None = None
) -> dict[str, Any]:
    """Publish the samples as the trainer does, end the job, and read the session (which ingests them)."""
    job = api.http.get(f"/v1/fine_tuning/jobs/{fbs['job_id']}", headers=auth(ADMIN_KEY)).json()
    project = job["organization_id"]
    storage = api.app.state.services.storage
    prompts = [p.get("prompt", p.get("messages")) for p in PROMPTS]
    answers = answers or [[f"answer {i}.{j}" for j in range(fbs["k"])] for i in range(len(prompts))]
    lines = [
        SampleRecord(index=i, prompt=p, answers=a).model_dump_json()
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
    ]
    prefix = samples_prefix(project, fbs["job_id"])
    storage.put_bytes(prefix + SAMPLES_FILE, ("\n".join(lines) + "\n").encode())
    storage.put_bytes(prefix + MANIFEST, b'{"manifest_version": 1}')
    end_job(api, fbs["job_id"], JobStatus.succeeded)
    return api.http.get(f"/v1/feedback/sessions/{fbs['id']}", headers=auth(ADMIN_KEY)).json()


def labeler(api: Harness, name: str, key: str = ADMIN_KEY) -> dict[str, Any]:
    r = api.http.post("/v1/feedback/labeler_keys", json={"name": name}, headers=auth(key))
    assert r.status_code == 201, r.text
    return r.json()


def next_item(api: Harness, fbs: dict[str, Any], key: str) -> dict[str, Any]:
    r = api.http.get(f"/v1/feedback/sessions/{fbs['id']}/next_item", headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()


def post_label(api: Harness, fbs: dict[str, Any], item_id: str, key: str, **body: Any) -> Any:
    return api.http.post(
        f"/v1/feedback/sessions/{fbs['id']}/items/{item_id}/labels", json=body, headers=auth(key)
    )


def best_first(item: dict[str, Any]) -> list[list[str]]:
    """Rank by answer text: '... .0' best (a stable, known order for the assertions)."""
    return [[a["id"]] for a in sorted(item["answers"], key=lambda a: a["text"])]


def test_create_get_list(api: Harness, other_key: str) -> None:
    fbs = new_session(api, k=4, labels_per_item=2)
    assert fbs["id"].startswith("fbs-") and fbs["object"] == "feedback.session"
    assert fbs["status"] == "generating" and fbs["k"] == 4 and fbs["labels_per_item"] == 2
    assert fbs["sampling"] == {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 16, "seed": 5}
    assert fbs["progress"] == {
        "prompts_total": 3,
        "prompts_generated": 0,
        "items_total": 0,
        "labels_needed": 0,
        "labels_done": 0,
    }
    assert (
        fbs["agreement"] == {"mean_kendall_tau": None, "items_with_multiple_labels": 0}
        and fbs["labelers"] == []
    )
    # The generation is a job of the project, with the internal method "sample".
    job = api.http.get(f"/v1/fine_tuning/jobs/{fbs['job_id']}", headers=auth(ADMIN_KEY)).json()
    assert job["method"]["type"] == "sample" and job["method"]["sample"]["k"] == 4 and job["seed"] == 5
    assert job["training_file"] == fbs["prompts_file"]
    got = api.http.get(f"/v1/feedback/sessions/{fbs['id']}", headers=auth(ADMIN_KEY)).json()
    assert got == fbs
    second = new_session(api)
    page = api.http.get("/v1/feedback/sessions", params={"limit": 1}, headers=auth(ADMIN_KEY)).json()
    assert [s["id"] for s in page["data"]] == [second["id"]] and page["has_more"]
    rest = api.http.get(
        "/v1/feedback/sessions", params={"after": second["id"]}, headers=auth(ADMIN_KEY)
    ).json()
    assert [s["id"] for s in rest["data"]] == [fbs["id"]]
    r = api.http.get(f"/v1/feedback/sessions/{fbs['id']}/next_item", headers=auth(ADMIN_KEY))
    assert r.status_code == 409 and r.json()["error"]["code"] == "session_not_ready"
    # Another project sees none of it.
    for method, path in [
        ("GET", f"/v1/feedback/sessions/{fbs['id']}"),
        ("GET", f"/v1/feedback/sessions/{fbs['id']}/next_item"),
        ("POST", f"/v1/feedback/sessions/{fbs['id']}/cancel"),
        ("POST", f"/v1/feedback/sessions/{fbs['id']}/export"),
    ]:
        r = api.http.request(method, path, headers=auth(other_key), json={} if method == "POST" else None)
        assert r.status_code == 404 and r.json()["error"]["code"] == "feedback_session_not_found", path
    assert api.http.get("/v1/feedback/sessions", headers=auth(other_key)).json()["data"] == []
    r = api.http.get("/v1/feedback/sessions", params={"after": fbs["id"]}, headers=auth(other_key))
    assert r.status_code == 400


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"k": 1}, "invalid_request"),
        ({"k": 10}, "invalid_request"),
        ({"labels_per_item": 0}, "invalid_request"),
        ({"sampling": {"temperature": 0}}, "invalid_request"),
        ({"sampling": {"top_k": 3}}, "invalid_request"),
        ({"model": "nobody/nothing"}, "model_not_found"),
        ({"model": "ft:tuneforge/tiny-llama:proj-x::ftjob-nope"}, "model_not_found"),
        ({"prompts_file": "file-missing"}, "file_not_found"),
        ({"resources": {"gpus": 2}}, "invalid_resources"),
    ],
)
def test_create_refuses_bad_input(api: Harness, change: dict[str, Any], code: str) -> None:
    body = {"model": TINY, "prompts_file": prompts_file(api), "k": 3, **change}
    r = create(api, **body)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text


def test_create_refuses_other_files(api: Harness, other_key: str) -> None:
    chat = api.upload()["id"]  # chat examples, not prompts
    r = create(api, model=TINY, prompts_file=chat, k=2)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file_format"
    theirs = prompts_file(api, other_key)
    r = create(api, model=TINY, prompts_file=theirs, k=2)
    assert r.status_code == 400 and r.json()["error"]["code"] == "file_not_found"
    # And nobody can start a sample job directly.
    r = api.http.post(
        "/v1/fine_tuning/jobs",
        json={"model": TINY, "training_file": theirs, "method": {"type": "sample", "sample": {"k": 2}}},
        headers=auth(other_key),
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_method"


def test_create_is_idempotent(api: Harness) -> None:
    body = {"model": TINY, "prompts_file": prompts_file(api), "k": 2}
    headers = {**auth(ADMIN_KEY), "Idempotency-Key": "fbs-once"}
    first = api.http.post("/v1/feedback/sessions", json=body, headers=headers)
    again = api.http.post("/v1/feedback/sessions", json=body, headers=headers)
    assert first.status_code == again.status_code == 201 and first.json()["id"] == again.json()["id"]
    jobs_page = api.http.get("/v1/fine_tuning/jobs", headers=auth(ADMIN_KEY)).json()
    assert len(jobs_page["data"]) == 1


def test_generation_outcome_reaches_the_session(api: Harness) -> None:
    ready = finish_generation(api, new_session(api, k=2, labels_per_item=3))
    assert ready["status"] == "ready" and ready["error"] is None
    assert ready["progress"] == {
        "prompts_total": 3,
        "prompts_generated": 3,
        "items_total": 3,
        "labels_needed": 9,
        "labels_done": 0,
    }
    again = api.http.get(f"/v1/feedback/sessions/{ready['id']}", headers=auth(ADMIN_KEY)).json()
    assert again["progress"]["items_total"] == 3  # settling twice ingests once

    failed = new_session(api)
    error = {"code": "invalid_training_file", "message": "bad prompts", "param": "training_file"}
    end_job(api, failed["job_id"], JobStatus.failed, error=error)
    got = api.http.get(f"/v1/feedback/sessions/{failed['id']}", headers=auth(ADMIN_KEY)).json()
    assert got["status"] == "failed" and got["error"]["code"] == "invalid_training_file"
    r = api.http.post(f"/v1/feedback/sessions/{failed['id']}/cancel", headers=auth(ADMIN_KEY))
    assert r.status_code == 400 and r.json()["error"]["code"] == "session_not_cancellable"

    # A succeeded job whose samples are not published (no manifest) fails the session.
    lost = new_session(api)
    end_job(api, lost["job_id"], JobStatus.succeeded)
    got = api.http.get(f"/v1/feedback/sessions/{lost['id']}", headers=auth(ADMIN_KEY)).json()
    assert got["status"] == "failed" and got["error"]["code"] == "samples_missing"


def test_cancel(api: Harness) -> None:
    fbs = new_session(api)
    r = api.http.post(f"/v1/feedback/sessions/{fbs['id']}/cancel", headers=auth(ADMIN_KEY))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    job = api.http.get(f"/v1/fine_tuning/jobs/{fbs['job_id']}", headers=auth(ADMIN_KEY)).json()
    assert job["status"] == "cancelled"  # not started yet: cancelled at once
    assert (
        api.http.post(f"/v1/feedback/sessions/{fbs['id']}/cancel", headers=auth(ADMIN_KEY)).json()["status"]
        == "cancelled"
    )
    # A ready session closes to new labels.
    ready = finish_generation(api, new_session(api))
    api.http.post(f"/v1/feedback/sessions/{ready['id']}/cancel", headers=auth(ADMIN_KEY))
    r = api.http.get(f"/v1/feedback/sessions/{ready['id']}/next_item", headers=auth(ADMIN_KEY))
    assert r.status_code == 409 and r.json()["error"]["code"] == "session_closed"


def test_labeler_keys_only_rank(api: Harness, other_key: str) -> None:
    ready = finish_generation(api, new_session(api))
    key = labeler(api, "ann")
    assert key["role"] == "labeler" and key["name"] == "ann" and key["key"] and key["id"].startswith("key-")
    lk = key["key"]
    job = ready["job_id"]
    forbidden = [
        ("GET", "/v1/fine_tuning/jobs"),
        ("GET", f"/v1/fine_tuning/jobs/{job}"),
        ("GET", f"/v1/fine_tuning/jobs/{job}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job}/adapter"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/files"),
        ("GET", f"/v1/files/{ready['prompts_file']}"),
        ("GET", f"/v1/files/{ready['prompts_file']}/content"),
        ("GET", "/v1/models"),
        ("GET", "/v1/webhooks"),
        ("GET", "/v1/admin/projects"),
        ("GET", "/v1/feedback/sessions"),
        ("POST", "/v1/feedback/sessions"),
        ("POST", f"/v1/feedback/sessions/{ready['id']}/cancel"),
        ("POST", f"/v1/feedback/sessions/{ready['id']}/export"),
        ("POST", "/v1/feedback/labeler_keys"),
    ]
    for method, path in forbidden:
        r = api.http.request(method, path, headers=auth(lk), json={} if method == "POST" else None)
        assert r.status_code == 403 and r.json()["error"]["code"] == "labeler_forbidden", (path, r.text)
    assert api.http.get(f"/v1/feedback/sessions/{ready['id']}", headers=auth(lk)).status_code == 200
    item = next_item(api, ready, lk)["item"]
    assert post_label(api, ready, item["id"], lk, ranking=best_first(item)).status_code == 200
    # A labeler of another project: the session does not exist for it.
    theirs = labeler(api, "bob", key=other_key)["key"]
    for path in (f"/v1/feedback/sessions/{ready['id']}", f"/v1/feedback/sessions/{ready['id']}/next_item"):
        assert api.http.get(path, headers=auth(theirs)).status_code == 404
    r = post_label(api, ready, item["id"], theirs, ranking=best_first(item))
    assert r.status_code == 404
    r = api.http.post("/v1/feedback/labeler_keys", json={"name": ""}, headers=auth(ADMIN_KEY))
    assert r.status_code == 400


def test_assignment_reload_and_labels(api: Harness) -> None:
    ready = finish_generation(api, new_session(api, k=3, labels_per_item=2))
    a, b, c = (labeler(api, n)["key"] for n in "abc")
    first = next_item(api, ready, a)
    item = first["item"]
    assert item["id"].startswith("fbi-") and item["index"] == 0 and item["label"] is None
    assert item["messages"] == [{"role": "user", "content": "Name the capital of Tuneland."}]
    assert first["progress"] == {"done_by_me": 0, "remaining_for_me": 3, "items_total": 3}
    # A reload gives the same item, answers in the same (per-labeler) order.
    assert next_item(api, ready, a)["item"] == item
    by_text = sorted(item["answers"], key=lambda x: x["text"])
    assert [x["text"] for x in by_text] == ["answer 0.0", "answer 0.1", "answer 0.2"]
    assert item["answers"] == shuffled_for(by_text, item["id"], _key_id(api, a))
    # Item 0 goes to two labelers: b gets it too, c the next one.
    assert next_item(api, ready, b)["item"]["id"] == item["id"]
    item_c = next_item(api, ready, c)["item"]
    assert item_c["index"] == 1
    assert item_c["messages"][1]["content"] == "<script>x</script>?"  # data, escaped by the page
    # Bad rankings.
    ids = [x["id"] for x in by_text]
    for bad, param in [
        ([[ids[0]], [ids[1]]], "ranking"),  # misses one
        ([[ids[0]], [ids[0]], [ids[1], ids[2]]], "ranking"),  # twice
        ([[ids[0]], [ids[1]], [ids[2]], ["fba-invented"]], "ranking"),
        ([[ids[0]], [], [ids[1], ids[2]]], "ranking"),
    ]:
        r = post_label(api, ready, item["id"], a, ranking=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, bad
    r = post_label(api, ready, item["id"], a, ranking=[[i] for i in ids], unsafe=["fba-nope"])
    assert r.status_code == 400 and r.json()["error"]["param"] == "unsafe"
    assert (
        post_label(api, ready, item["id"], a, ranking=[[i] for i in ids], note="x" * 2001).status_code == 400
    )
    # A tie, an unsafe flag and a note; posting again replaces the label.
    r = post_label(
        api, ready, item["id"], a, ranking=[[ids[0], ids[1]], [ids[2]]], unsafe=[ids[2]], note="meh"
    )
    assert r.status_code == 200
    saved = r.json()
    assert (
        saved["ranking"] == [[ids[0], ids[1]], [ids[2]]]
        and saved["unsafe"] == [ids[2]]
        and not saved["skipped"]
    )
    assert saved["labeler"] == _key_id(api, a) and saved["item_id"] == item["id"] and saved["note"] == "meh"
    again = post_label(api, ready, item["id"], a, ranking=[[i] for i in ids]).json()
    assert again["ranking"] == [[i] for i in ids] and again["unsafe"] == [] and again["note"] == ""
    # a moves on; b labels item 0 too, so it is full: c may not label it.
    after = next_item(api, ready, a)
    assert after["item"]["index"] == 1 and after["progress"]["done_by_me"] == 1
    assert post_label(api, ready, item["id"], b, ranking=[[i] for i in reversed(ids)]).status_code == 200
    r = post_label(api, ready, item["id"], c, ranking=[[i] for i in ids])
    assert r.status_code == 409 and r.json()["error"]["code"] == "item_fully_labelled"
    # A skip: c never gets item 1 again, and the slot goes to someone else.
    assert post_label(api, ready, item_c["id"], c, skipped=True).json()["skipped"] is True
    assert next_item(api, ready, c)["item"]["index"] == 2
    assert next_item(api, ready, b)["item"]["index"] == 1
    # Everyone's totals.
    session = api.http.get(f"/v1/feedback/sessions/{ready['id']}", headers=auth(ADMIN_KEY)).json()
    assert session["progress"]["labels_done"] == 2 and session["progress"]["labels_needed"] == 6
    stats = {s["name"]: (s["labels"], s["skips"]) for s in session["labelers"]}
    assert stats == {"a": (1, 0), "b": (1, 0), "c": (0, 1)}
    assert session["agreement"] == {"mean_kendall_tau": -1.0, "items_with_multiple_labels": 1}


def test_labeller_runs_out_of_items(api: Harness) -> None:
    ready = finish_generation(api, new_session(api, k=2))
    for _ in range(3):
        item = next_item(api, ready, ADMIN_KEY)["item"]  # a member key labels too
        assert post_label(api, ready, item["id"], ADMIN_KEY, ranking=best_first(item)).status_code == 200
    done = next_item(api, ready, ADMIN_KEY)
    assert done == {"item": None, "progress": {"done_by_me": 3, "remaining_for_me": 0, "items_total": 3}}
    other = labeler(api, "late")["key"]
    assert next_item(api, ready, other)["item"] is None  # one label per item, all given


def _key_id(api: Harness, key: str) -> str:
    async def go() -> str:
        from tuneforge_api.store import projects

        async with api.app.state.services.sessions() as session:
            principal = await projects.authenticate(session, key)
            assert principal is not None
            return principal.key_id

    return api.http.portal.call(go)


def test_export_trains_a_reward_model_job(api: Harness) -> None:
    answers = [["good", "fine", "bad", "   "], ["ok", "ok", "meh", "worst"], ["x", "y", "z", "w"]]
    ready = finish_generation(api, new_session(api, k=4, labels_per_item=2), answers)
    a, b = labeler(api, "a")["key"], labeler(api, "b")["key"]
    texts: dict[str, dict[str, str]] = {}
    for key in (a, b):
        for _ in range(3):
            item = next_item(api, ready, key)["item"]
            ids = {x["text"]: x["id"] for x in item["answers"]}
            texts[item["id"]] = ids
            if item["index"] == 0:  # a tie between fine and bad, an unsafe flag on good from b only
                ranking = [[ids["good"]], [ids["fine"], ids["bad"]], [ids["   "]]]
                unsafe = [ids["good"]] if key == b else []
                body = {"ranking": ranking, "unsafe": unsafe}
            elif item["index"] == 1:  # two answers share the text "ok"; b ties them below "meh"
                oks = [x["id"] for x in item["answers"] if x["text"] == "ok"]
                if key == a:
                    body = {"ranking": [[oks[0]], [oks[1]], [ids["meh"]], [ids["worst"]]]}
                else:
                    body = {"ranking": [[ids["meh"]], oks, [ids["worst"]]]}
            else:  # skipped by b: only a's label
                body = {"ranking": [[ids[t]] for t in "xyzw"]} if key == a else {"skipped": True}
            assert post_label(api, ready, item["id"], key, **body).status_code == 200
    r = api.http.post(f"/v1/feedback/sessions/{ready['id']}/export", json={}, headers=auth(ADMIN_KEY))
    assert r.status_code == 201, r.text
    export = r.json()
    assert export["object"] == "file" and export["purpose"] == "fine-tune" and export["status"] == "processed"
    assert export["validation"]["format"] == "rankings" and export["validation"]["n_problems"] == 0
    content = api.http.get(f"/v1/files/{export['id']}/content", headers=auth(ADMIN_KEY)).content
    lines = [json.loads(x) for x in content.splitlines()]
    assert len(lines) == 3
    # Item 0: good is unsafe (b) so last; fine/bad tied in both labels -> fine (generated first) stays;
    # the blank answer is left out.
    assert lines[0] == {
        "prompt": "Name the capital of Tuneland.",
        "responses": ["good", "fine"],
        "ranking": [1, 0],
    }
    assert lines[1]["messages"][1]["content"] == "<script>x</script>?"
    # Mean places: ok 1.75, meh 2, the other ok 2.25 (a duplicate text: left out), worst 4.
    assert lines[1]["responses"] == ["ok", "meh", "worst"] and lines[1]["ranking"] == [0, 1, 2]
    assert lines[2] == {
        "prompt": "Where does the river go?",
        "responses": ["x", "y", "z", "w"],
        "ranking": [0, 1, 2, 3],
    }
    # min_labels=2 leaves out item 2 (one ranking label).
    two = api.http.post(
        f"/v1/feedback/sessions/{ready['id']}/export", json={"min_labels": 2}, headers=auth(ADMIN_KEY)
    ).json()
    assert two["validation"]["n_examples"] == 2
    r = api.http.post(
        f"/v1/feedback/sessions/{ready['id']}/export", json={"min_labels": 3}, headers=auth(ADMIN_KEY)
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_export"
    # The export is the training file of a reward_model job, unchanged.
    r = api.http.post(
        "/v1/fine_tuning/jobs",
        json={"model": TINY, "training_file": export["id"], "method": {"type": "reward_model"}},
        headers=auth(ADMIN_KEY),
    )
    assert r.status_code == 200, r.text
    stored = api.app.state.services.storage.get_bytes(file_key(r.json()["organization_id"], export["id"]))
    assert stored == content


def test_sdk_feedback_resource(api: Harness, live_url: str) -> None:
    """The sync and async clients over a real server: create, wait, label, export."""
    import asyncio

    from tuneforge import AsyncClient, Client
    from tuneforge.errors import ConflictError, PermissionDeniedError

    owner = Client(base_url=live_url, api_key=ADMIN_KEY, max_retries=0)
    fbs = owner.feedback.create_session(model=TINY, prompts_file=prompts_file(api), k=2, sampling={"seed": 1})
    assert fbs.status == "generating" and fbs.sampling.seed == 1
    finish_generation(api, fbs.model_dump())
    assert owner.feedback.wait_until_ready(fbs.id, timeout=10, poll_interval=0.1).status == "ready"
    key = owner.feedback.create_labeler_key("sdk").key or ""
    labeler_client = Client(base_url=live_url, api_key=key, max_retries=0)
    with pytest.raises(PermissionDeniedError) as denied:
        labeler_client.jobs.list()
    assert denied.value.code == "labeler_forbidden"

    async def label_all() -> int:
        async with AsyncClient(base_url=live_url, api_key=key, max_retries=0) as client:
            n = 0
            while (nxt := await client.feedback.next_item(fbs.id)).item is not None:
                ranking = [[a.id] for a in nxt.item.answers]
                saved = await client.feedback.label(fbs.id, nxt.item.id, ranking=ranking, note="ok")
                assert saved.ranking == ranking and saved.note == "ok"
                n += 1
            return n

    assert asyncio.run(label_all()) == 3
    session = owner.feedback.get_session(fbs.id)
    assert session.progress.labels_done == 3 and session.labelers[0].name == "sdk"
    assert [s.id for s in owner.feedback.list_sessions().data] == [fbs.id]
    export = owner.feedback.export(fbs.id)
    assert export.validation is not None and export.validation.format == "rankings"
    assert owner.feedback.cancel_session(fbs.id).status == "cancelled"
    with pytest.raises(ConflictError):
        labeler_client.feedback.next_item(fbs.id)


def test_sample_jobs_do_not_break_the_openai_listing(api: Harness, live_url: str) -> None:
    """Sample jobs are listed with the project's jobs (they use the same executor capacity); the
    unmodified openai package reads them."""
    import openai

    oai = openai.OpenAI(base_url=f"{live_url}/v1", api_key=ADMIN_KEY, max_retries=0)
    fbs = finish_generation(api, new_session(api))
    listed = list(oai.fine_tuning.jobs.list())
    assert [j.id for j in listed] == [fbs["job_id"]]
    job = oai.fine_tuning.jobs.retrieve(fbs["job_id"])
    assert job.status == "succeeded" and job.fine_tuned_model is None and job.method.type == "sample"


def resume(api: Harness, fbs: dict[str, Any], key: str) -> dict[str, Any]:
    """next_item as the ranking page asks it on load."""
    r = api.http.get(f"/v1/feedback/sessions/{fbs['id']}/next_item?resume=true", headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()


def test_a_reload_resumes_the_labelled_item_until_the_labeler_moves_on(api: Harness) -> None:
    ready = finish_generation(api, new_session(api, k=3, labels_per_item=1))
    a = labeler(api, "a")["key"]
    item = next_item(api, ready, a)["item"]
    assert resume(api, ready, a)["item"] == item  # opened, not labelled: the same item
    ranking = best_first(item)
    assert post_label(api, ready, item["id"], a, ranking=ranking, note="first").status_code == 200
    # The page autosaved a complete ranking; a reload shows it again, with the label to revise.
    got = resume(api, ready, a)
    assert got["item"]["id"] == item["id"] and got["item"]["answers"] == item["answers"]
    assert got["item"]["label"]["ranking"] == ranking and got["item"]["label"]["note"] == "first"
    assert got["progress"]["done_by_me"] == 1
    assert post_label(api, ready, item["id"], a, ranking=ranking[::-1]).status_code == 200
    assert resume(api, ready, a)["item"]["label"]["ranking"] == ranking[::-1]
    # The plain call moves on; a reload then resumes the new item.
    moved = next_item(api, ready, a)["item"]
    assert moved["index"] == 1 and moved["label"] is None
    assert resume(api, ready, a)["item"] == moved
    assert post_label(api, ready, moved["id"], a, skipped=True).status_code == 200
    assert resume(api, ready, a)["item"]["label"]["skipped"] is True
    # A labeler who never labelled resumes nothing: they get the next free item.
    b = labeler(api, "b")["key"]
    assert resume(api, ready, b)["item"]["index"] == 1  # a's skip freed item 1
    r = api.http.get(f"/v1/feedback/sessions/{ready['id']}/next_item?resume=maybe", headers=auth(a))
    assert r.status_code == 400 and r.json()["error"]["param"] == "resume"


def _lapse_lease(api: Harness, item_id: str, key: str) -> None:
    from sqlalchemy import update

    from tuneforge_api.db.tables import FeedbackLabelRow
    from tuneforge_api.store.feedback import LEASE_S

    key_id = _key_id(api, key)

    async def go() -> None:
        async with api.app.state.services.sessions() as session:
            await session.execute(
                update(FeedbackLabelRow)
                .where(FeedbackLabelRow.item_id == item_id, FeedbackLabelRow.labeler == key_id)
                .values(opened_at=FeedbackLabelRow.opened_at - LEASE_S - 1)
            )
            await session.commit()

    api.http.portal.call(go)


def test_a_lapsed_lease_cannot_overfill_an_item(api: Harness) -> None:
    ready = finish_generation(api, new_session(api, k=2, labels_per_item=1))
    a, b = labeler(api, "a")["key"], labeler(api, "b")["key"]
    item = next_item(api, ready, a)["item"]
    _lapse_lease(api, item["id"], a)  # a walked away for more than 30 minutes
    assert next_item(api, ready, b)["item"]["id"] == item["id"]
    assert post_label(api, ready, item["id"], b, ranking=best_first(item)).status_code == 200
    r = post_label(api, ready, item["id"], a, ranking=best_first(item))
    assert r.status_code == 409 and r.json()["error"]["code"] == "item_fully_labelled"
    session = api.http.get(f"/v1/feedback/sessions/{ready['id']}", headers=auth(ADMIN_KEY)).json()
    assert [s["name"] for s in session["labelers"]] == ["b"]
    assert next_item(api, ready, a)["item"]["index"] == 1


def test_concurrent_labels_cannot_both_take_the_last_slot(api: Harness) -> None:
    """PostgreSQL: b's label waits for a's transaction (the session row's lock), then sees the
    item full. Without the lock, b's check reads around a's uncommitted label."""
    import asyncio

    import httpx
    from sqlalchemy import text

    from tuneforge_api.store import feedback

    if not api.settings.resolved_database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer: no race to lose")
    ready = finish_generation(api, new_session(api, k=2, labels_per_item=1))
    a, b = labeler(api, "a")["key"], labeler(api, "b")["key"]
    item = next_item(api, ready, a)["item"]
    _lapse_lease(api, item["id"], a)  # only a's label, not its lease, will hold the slot
    a_id, project = _key_id(api, a), api.client().admin.list_projects()[0].id
    services = api.app.state.services

    async def go() -> int:
        async with services.sessions() as held, services.sessions() as probe:
            row = await feedback.get_row(held, project, ready["id"])
            assert row is not None
            await feedback.lock_session(held, row)  # a's post_label, in the middle of its transaction
            await feedback.save_label(
                held, row, item["id"], a_id, ranking=best_first(item), skipped=False, unsafe=[], note=""
            )
            transport = httpx.ASGITransport(app=api.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                url = f"/v1/feedback/sessions/{ready['id']}/items/{item['id']}/labels"
                body = {"ranking": best_first(item)}
                posted = asyncio.ensure_future(client.post(url, json=body, headers=auth(b)))
                waiting = text("select count(*) from pg_locks where not granted")
                while not posted.done() and not await probe.scalar(waiting):
                    await probe.rollback()  # a fresh snapshot of pg_locks each time
                    await asyncio.sleep(0.02)
                await held.commit()
                return (await posted).status_code

    assert api.http.portal.call(go) == 409
    session = api.http.get(f"/v1/feedback/sessions/{ready['id']}", headers=auth(ADMIN_KEY)).json()
    assert session["progress"]["labels_done"] == 1


def test_export_respects_the_storage_quota(api: Harness) -> None:
    ready = finish_generation(api, new_session(api, k=2))
    for _ in range(3):
        item = next_item(api, ready, ADMIN_KEY)["item"]
        assert post_label(api, ready, item["id"], ADMIN_KEY, ranking=best_first(item)).status_code == 200
    listed = api.http.get("/v1/files", headers=auth(ADMIN_KEY)).json()["data"]
    stored = sum(f["bytes"] for f in listed)
    api.app.state.services.settings.max_storage_bytes = stored + 10  # less than the export
    url = f"/v1/feedback/sessions/{ready['id']}/export"
    r = api.http.post(url, json={}, headers=auth(ADMIN_KEY))
    assert r.status_code == 429 and r.json()["error"]["code"] == "storage_limit"
    assert api.http.get("/v1/files", headers=auth(ADMIN_KEY)).json()["data"] == listed
    api.app.state.services.settings.max_storage_bytes = 0  # no limit
    assert api.http.post(url, json={}, headers=auth(ADMIN_KEY)).status_code == 201


def test_malformed_samples_fail_the_session_once(api: Harness) -> None:
    fbs = new_session(api)
    job = api.http.get(f"/v1/fine_tuning/jobs/{fbs['job_id']}", headers=auth(ADMIN_KEY)).json()
    prefix = samples_prefix(job["organization_id"], fbs["job_id"])
    storage = api.app.state.services.storage
    good = SampleRecord(index=0, prompt="hi", answers=["a", "b", "c"]).model_dump_json()
    storage.put_bytes(prefix + SAMPLES_FILE, f'{good}\n{{"index": "x"}}\n'.encode())
    storage.put_bytes(prefix + MANIFEST, b'{"manifest_version": 1}')
    end_job(api, fbs["job_id"], JobStatus.succeeded)
    got = api.http.get(f"/v1/feedback/sessions/{fbs['id']}", headers=auth(ADMIN_KEY))
    assert got.status_code == 200, got.text
    assert got.json()["status"] == "failed" and got.json()["error"]["code"] == "samples_invalid"
    assert "Line 2" in got.json()["error"]["message"]
    listed = api.http.get("/v1/feedback/sessions", headers=auth(ADMIN_KEY))
    assert listed.status_code == 200 and listed.json()["data"][0]["status"] == "failed"


def test_settling_a_session_settled_elsewhere_answers_its_new_state(api: Harness) -> None:
    from tuneforge_api.feedback.ingest import settle
    from tuneforge_api.store import feedback

    fbs = new_session(api)
    project = api.client().admin.list_projects()[0].id
    services = api.app.state.services

    async def stale_then_settled() -> tuple[bool, str]:
        async with services.sessions() as mine:
            row = await feedback.get_row(mine, project, fbs["id"])
            assert row is not None and row.status == "generating"
            await mine.commit()
            async with services.sessions() as other:  # the scheduler settles it meanwhile
                theirs = await feedback.get_row(other, project, fbs["id"])
                assert theirs is not None and await settle(other, services.storage, theirs)
            moved = await settle(mine, services.storage, row)
            return moved, row.status

    end_job(api, fbs["job_id"], JobStatus.cancelled)
    assert api.http.portal.call(stale_then_settled) == (False, "cancelled")

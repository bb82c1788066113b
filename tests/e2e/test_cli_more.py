"""The CLI's webhooks, keys revoke, jobs validate and feedback commands against the running
service: tables for people, --json for scripts, and the exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY
from tests.e2e.conftest import Service, wait_until
from tests.e2e.test_cli import DATA, TUNEFORGE, cli, ok
from tuneforge import Client

pytestmark = pytest.mark.e2e
TINY = "tuneforge/tiny-llama"


def failed(result, code: int, text: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert text in result.stderr and "Traceback" not in result.stderr


def table(result) -> tuple[list[str], list[str]]:
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    return header.split(), rows


def test_cli_webhooks(service: Service) -> None:
    url = "http://127.0.0.1:9/hook"  # loopback is allowed on this service; nothing listens there
    made = cli(service, "webhooks", "create", url, "--events", "fine_tuning.job.cancelled")
    hook = ok(made)
    assert hook["secret"].startswith("whsec_") and hook["events"] == ["fine_tuning.job.cancelled"]
    assert "shown this once" in made.stderr
    person = cli(service, "webhooks", "create", url, human=True)
    assert person.returncode == 0, person.stderr
    lines = person.stdout.splitlines()
    assert any(line.startswith("secret: whsec_") for line in lines)
    other_id = next(line.removeprefix("id: ") for line in lines if line.startswith("id: "))

    listed = ok(cli(service, "webhooks", "list"))
    assert {h["id"] for h in listed} >= {hook["id"], other_id}
    assert all(h["secret"] is None for h in listed)
    header, rows = table(cli(service, "webhooks", "list", human=True))
    assert header == ["ID", "URL", "EVENTS", "CREATED_AT"]
    assert any(row.startswith(hook["id"]) for row in rows)

    assert ok(cli(service, "webhooks", "deliveries", hook["id"])) == []
    f = ok(cli(service, "files", "upload", str(DATA)))
    job = ok(cli(service, "jobs", "create", "--model", TINY, "--training-file", f["id"]))
    assert cli(service, "jobs", "cancel", job["id"]).returncode == 0
    assert cli(service, "jobs", "wait", job["id"]).returncode == 3  # cancelled
    [delivery] = ok(cli(service, "webhooks", "deliveries", hook["id"]))
    assert delivery["event_type"] == "fine_tuning.job.cancelled" and delivery["data"]["id"] == job["id"]
    header, rows = table(cli(service, "webhooks", "deliveries", hook["id"], human=True))
    assert header == ["ID", "EVENT_TYPE", "STATUS", "ATTEMPTS", "LAST_STATUS_CODE", "CREATED_AT"]
    assert [row.split()[0] for row in rows] == [delivery["id"]]

    for hook_id in (hook["id"], other_id):
        assert ok(cli(service, "webhooks", "delete", hook_id)) == {"deleted": True}
    assert not {hook["id"], other_id} & {h["id"] for h in ok(cli(service, "webhooks", "list"))}
    failed(cli(service, "webhooks", "delete", hook["id"]), 1, "webhook_not_found")
    failed(cli(service, "webhooks", "deliveries", hook["id"]), 1, "webhook_not_found")
    failed(cli(service, "webhooks", "create", "ftp://example.com/x"), 1, "invalid_url")
    failed(cli(service, "webhooks", "create", url, "--events", "bogus"), 1, "invalid_event")
    failed(cli(service, "webhooks", "create"), 2, "url")  # argparse: a missing argument


def test_cli_keys_revoke(service: Service) -> None:
    project = ok(cli(service, "projects", "create", f"revoke-{uuid.uuid4().hex[:6]}"))
    key = ok(cli(service, "keys", "create", project["id"], "--name", "ci"))
    assert ok(cli(service, "files", "list", key=key["key"])) == []
    assert ok(cli(service, "keys", "revoke", project["id"], key["id"])) == {"deleted": True}
    failed(cli(service, "files", "list", key=key["key"]), 1, "invalid_api_key")
    person = cli(service, "keys", "revoke", project["id"], key["id"], human=True)  # again: harmless
    assert person.returncode == 0 and person.stdout.splitlines() == ["deleted: True"]
    failed(cli(service, "keys", "revoke", project["id"], "key-nope"), 1, "api_key_not_found")
    failed(cli(service, "keys", "revoke", project["id"], key["id"], key=key["key"]), 1, "invalid_api_key")


def test_cli_jobs_validate(service: Service) -> None:
    f = ok(cli(service, "files", "upload", str(DATA)))
    before = {j["id"] for j in ok(cli(service, "jobs", "list"))}
    flags = ["--model", TINY, "--training-file", f["id"], "--hyperparameters", '{"n_epochs": 2}']
    report = ok(cli(service, "jobs", "validate", *flags, "--suffix", "dry"))
    assert report["object"] == "fine_tuning.job.validation" and report["model"] == TINY
    assert report["training_file"]["id"] == f["id"] and report["hyperparameters"]["n_epochs"] == 2
    person = cli(service, "jobs", "validate", *flags, human=True)
    assert person.returncode == 0, person.stderr
    assert f"model: {TINY}" in person.stdout.splitlines()
    assert {j["id"] for j in ok(cli(service, "jobs", "list"))} == before  # a dry run creates nothing
    failed(cli(service, "jobs", "validate", "--model", TINY, "--training-file", "file-nope"), 1, "file")
    failed(cli(service, "jobs", "validate", *flags[:4], "--extra", "{bad"), 2, "JSON")


def test_cli_feedback(service: Service, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    questions = ["What is the capital of Tuneland?", "Name the river of Tuneland."]
    prompts.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in questions)
    )
    pf = ok(cli(service, "files", "upload", str(prompts)))
    failed(
        cli(service, "feedback", "create", "--model", TINY, "--prompts-file", pf["id"], "--k", "1"),
        2,
        "greater than or equal to 2",
    )
    session = ok(
        cli(
            service,
            "feedback",
            "create",
            "--model",
            TINY,
            "--prompts-file",
            pf["id"],
            "--k",
            "2",
            "--temperature",
            "0.9",
            "--max-new-tokens",
            "4",
            "--seed",
            "3",
            "--wait",
            "--timeout",
            "600",
        )
    )
    assert session["status"] == "ready", session
    assert (
        session["k"] == 2 and session["sampling"]["max_new_tokens"] == 4 and session["sampling"]["seed"] == 3
    )
    assert session["sampling"]["temperature"] == 0.9
    assert ok(cli(service, "feedback", "get", session["id"]))["progress"]["items_total"] == len(questions)
    assert session["id"] in [s["id"] for s in ok(cli(service, "feedback", "list"))]
    header, rows = table(cli(service, "feedback", "list", human=True))
    assert header == ["ID", "MODEL", "STATUS", "K", "LABELS_PER_ITEM", "JOB_ID", "CREATED_AT"]
    assert any(row.startswith(session["id"]) and " ready " in row for row in rows)

    made = cli(service, "feedback", "labeler-key", "cli-labeler")
    labeler_key = ok(made)
    assert labeler_key["key"] and labeler_key["role"] == "labeler" and "shown this once" in made.stderr
    failed(cli(service, "feedback", "export", session["id"]), 1, "nothing_to_export")
    labeler = Client(base_url=service.url, api_key=labeler_key["key"], timeout=30)
    while (nxt := labeler.feedback.next_item(session["id"])).item is not None:
        first, second = (a.id for a in nxt.item.answers)
        labeler.feedback.label(session["id"], nxt.item.id, ranking=[[first], [second]])
    failed(cli(service, "feedback", "export", session["id"], "--min-labels", "2"), 1, "nothing_to_export")
    export = ok(cli(service, "feedback", "export", session["id"], "--min-labels", "1"))
    assert export["id"].startswith("file-") and export["status"] == "processed"

    cancelled = ok(cli(service, "feedback", "cancel", session["id"]))
    assert cancelled["status"] == "cancelled"
    person = cli(service, "feedback", "get", session["id"], human=True)
    assert person.returncode == 0 and "status: cancelled" in person.stdout.splitlines()
    failed(cli(service, "feedback", "get", "fbs-nope"), 1, "not_found")


def test_cli_feedback_wait_exits_3_when_the_session_is_cancelled(service: Service, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Say something."}]}) + "\n")
    pf = ok(cli(service, "files", "upload", str(prompts)))
    owner = service.client()
    before = {s.id for s in owner.feedback.list_sessions(limit=100).data}
    env = {**os.environ, "TUNEFORGE_BASE_URL": service.url, "TUNEFORGE_API_KEY": ADMIN_KEY}
    flags = ["--model", TINY, "--prompts-file", pf["id"], "--k", "2", "--max-new-tokens", "4", "--wait"]
    with subprocess.Popen(
        [TUNEFORGE, "--json", "feedback", "create", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as waiting:
        new = wait_until(
            lambda: [s for s in owner.feedback.list_sessions(limit=100).data if s.id not in before],
            60,
            "the session was not created",
            interval=0.05,
        )
        assert owner.feedback.cancel_session(new[0].id).status == "cancelled"
        out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 3, err
    assert json.loads(out)["status"] == "cancelled" and json.loads(out)["id"] == new[0].id

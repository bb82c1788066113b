"""What must hold after any kill: a finished job, nothing lost or duplicated, nothing partial
visible through the API, and a coherent event history. Each check returns its violations."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from typing import Any

from tests.chaos.cluster import Api, Cluster
from tuneforge.storage import FileStorage, checkpoint_prefix

SUCCEEDED = "The job has successfully completed"
STARTED = re.compile(r"^Attempt (\d+) started$")
ENDED = re.compile(
    r"^(?:Attempt (\d+) failed \(.*\); retrying|The service stopped during attempt (\d+); resuming)$"
)


def _is_terminal(message: str) -> bool:
    return message == SUCCEEDED or message.startswith("Job failed:") or message == "Job cancelled"


def _temp_name(name: str) -> bool:
    return name.endswith(".tmp") or any(part.startswith(".") for part in name.split("/"))


def attempts_started(events: list[dict[str, Any]]) -> int:
    return sum(bool(STARTED.match(e["message"])) for e in events)


def check_events(job: dict[str, Any], events: list[dict[str, Any]]) -> list[str]:
    """Oldest-first events: unique ids, time never going back, one terminal event and it is
    the last, attempts numbered 1..K with each earlier attempt ended exactly once."""
    bad = []
    ids = [e["id"] for e in events]
    if len(set(ids)) != len(ids):
        bad.append("duplicate event ids")
    times = [e["created_at"] for e in events]
    if times != sorted(times):
        bad.append(f"event times go back: {times}")
    if not events or events[0]["message"] != f"Created fine-tuning job {job['id']}":
        bad.append("the first event is not the creation")
    terminal = [i for i, e in enumerate(events) if _is_terminal(e["message"])]
    if len(terminal) != 1:
        bad.append(f"{len(terminal)} terminal events: {[events[i]['message'] for i in terminal]}")
    elif terminal[0] != len(events) - 1:
        bad.append(f"events after the terminal one: {[e['message'] for e in events[terminal[0] + 1 :]]}")
    started = [int(m[1]) for e in events if (m := STARTED.match(e["message"]))]
    if started != list(range(1, len(started) + 1)):
        bad.append(f"attempts not numbered consecutively: {started}")
    ended = [int(m[1] or m[2]) for e in events if (m := ENDED.match(e["message"]))]
    if ended != list(range(1, len(started))):
        bad.append(f"attempts {started} but retried ones {ended}")
    if job["status"] == "succeeded" and not events[-1]["message"] == SUCCEEDED:
        bad.append("succeeded without the success event last")
    return bad


def check_trainer_reported(job: dict[str, Any], events: list[dict[str, Any]]) -> list[str]:
    """The attempt that succeeded reported its own success: its job token was still the job's
    (a relaunch of a run that was only being started replaces the token and silences it)."""
    last = attempts_started(events)
    if job["status"] != "succeeded" or any(
        e["message"].startswith(f"attempt {last} succeeded") for e in events
    ):
        return []
    return [f"attempt {last} succeeded without its trainer's events getting through"]


def check_error(job: dict[str, Any]) -> list[str]:
    """A failed job says why, in words, without a stack trace."""
    if job["status"] == "succeeded":
        return [] if job["error"] is None and job["fine_tuned_model"] else ["succeeded without a model"]
    if job["status"] != "failed":
        return [f"ended {job['status']}, which no kill should cause"]
    error = job.get("error") or {}
    if not error.get("code") or not error.get("message") or "Traceback" in error["message"]:
        return [f"failed without a clear error: {error}"]
    return []


def check_adapter(api: Api, job: dict[str, Any], attempts: int) -> list[str]:
    """A succeeded job has one adapter, from its last attempt, whose files match its manifest;
    any other job has none."""
    response = api.call("GET", f"/v1/fine_tuning/jobs/{job['id']}/adapter")
    if job["status"] != "succeeded":
        return [] if response.status_code == 404 else [f"adapter served for a {job['status']} job"]
    if response.status_code != 200:
        return [f"succeeded but the adapter answers {response.status_code}"]
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    if "manifest.json" not in files:
        return ["adapter without manifest.json"]
    manifest = json.loads(files.pop("manifest.json"))
    bad = []
    if manifest.get("job_id") != job["id"]:
        bad.append(f"adapter manifest names job {manifest.get('job_id')}")
    if manifest.get("attempt") != attempts:
        bad.append(f"adapter from attempt {manifest.get('attempt')}, the job's last is {attempts}")
    if set(files) != set(manifest["files"]):
        bad.append(f"adapter files {sorted(files)} != manifest {sorted(manifest['files'])}")
    for name, data in files.items():
        if _temp_name(name):
            bad.append(f"temp file in the adapter: {name}")
        elif hashlib.sha256(data).hexdigest() != manifest["files"].get(name):
            bad.append(f"adapter file {name} does not match its manifest")
    return bad


def check_checkpoints(api: Api, cluster: Cluster, job: dict[str, Any]) -> list[str]:
    """Every checkpoint the API lists is complete in storage (what a resume would load)."""
    storage = FileStorage(cluster.storage_root())
    bad = []
    for ckpt in api.pages(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"):
        prefix = checkpoint_prefix(job["organization_id"], job["id"], ckpt["step_number"])
        manifest = json.loads(storage.get_bytes(prefix + "manifest.json"))
        for name, digest in manifest["files"].items():
            try:
                data = storage.get_bytes(prefix + name)
            except FileNotFoundError:
                bad.append(f"checkpoint step {ckpt['step_number']} lists missing {name}")
                continue
            if hashlib.sha256(data).hexdigest() != digest:
                bad.append(f"checkpoint step {ckpt['step_number']}: {name} does not match its manifest")
    return bad


def check_no_trainer_left(cluster: Cluster, job_id: str, wait_s: float = 15) -> list[str]:
    """A finished job has no trainer process left (none orphaned, none launched twice)."""
    deadline = time.monotonic() + wait_s
    while cluster.trainer_groups(job_id):
        if time.monotonic() > deadline:
            return [f"trainer processes outlived the job: groups {cluster.trainer_groups(job_id)}"]
        time.sleep(0.2)
    return []


def check_job(api: Api, cluster: Cluster, job: dict[str, Any], events: list[dict[str, Any]]) -> list[str]:
    return (
        check_error(job)
        + check_events(job, events)
        + check_adapter(api, job, attempts_started(events))
        + check_checkpoints(api, cluster, job)
        + check_no_trainer_left(cluster, job["id"])
    )


def check_service(
    api: Api, cluster: Cluster, jobs: dict[str, int], files: dict[str, str], payloads: set[str]
) -> list[str]:
    """The service's lists against the client's record: each created job exactly once and no
    other; every listed file downloadable, whole (its sha256 is one the client sent) and
    validated, with no temp file among them."""
    bad = []
    listed = [j["id"] for j in api.pages("/v1/fine_tuning/jobs")]
    if len(listed) != len(set(listed)):
        bad.append("a job is listed twice")
    if set(listed) != set(jobs):
        bad.append(f"jobs lost {sorted(set(jobs) - set(listed))}, unknown {sorted(set(listed) - set(jobs))}")
    for f in api.pages("/v1/files"):
        if _temp_name(f["filename"]):
            bad.append(f"temp file listed: {f['filename']}")
        data = api.call("GET", f"/v1/files/{f['id']}/content").content
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != f["bytes"] or digest not in payloads:
            bad.append(f"file {f['id']} is partial or corrupt ({len(data)} of {f['bytes']} bytes)")
        elif f["id"] in files and files[f["id"]] != digest:
            bad.append(f"file {f['id']} holds another upload's content")
        if f["status"] == "uploaded":
            bad.append(f"file {f['id']} never validated (still 'uploaded')")
    missing = set(files) - {f["id"] for f in api.pages("/v1/files")}
    if missing:
        bad.append(f"files lost: {sorted(missing)}")
    return bad

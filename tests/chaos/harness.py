"""Seeded chaos runs against a ``Cluster``: pick a part and a moment of a job's life, SIGKILL
the part there, restart it, and check that nothing was lost, duplicated or left half-written.

Used by ``tests/chaos/test_chaos.py`` (a few runs in CI) and ``bench/chaos.py`` (``make chaos``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos import invariants
from tests.chaos.cluster import Api, Cluster

TINY = "tuneforge/tiny-llama"
# What a run kills: a part of the service, or the trainer in a window chosen by aim.
KINDS = ("api", "scheduler", "redis", "trainer", "upload", "checkpoint", "publish")
# Moments of a job's life at which "api", "scheduler", "redis" and "trainer" are killed.
MOMENTS = ("create", "queued", "started", "training", "checkpoint")
TRAINER_MOMENTS = ("started", "training", "checkpoint")
TERMINAL = ("succeeded", "failed", "cancelled")
HYPERPARAMETERS = {"n_epochs": 2, "batch_size": 8, "checkpoint_every": 2}


@dataclass(frozen=True)
class Plan:
    run: int
    seed: int
    kind: str
    moment: str
    delay_s: float  # from the moment to the kill
    downtime_s: float  # from the kill to the restart
    target: float  # upload: fraction of the body sent (>1: after the response); checkpoint: which one


def make_plan(run: int, seed: int, kind: str | None = None) -> Plan:
    rng = random.Random(seed)
    kind = kind or rng.choice(KINDS)
    if kind == "scheduler":  # also: between starting a trainer and recording its pid
        moment = rng.choice((*MOMENTS, "launch"))
    elif kind in ("api", "redis"):
        moment = rng.choice(MOMENTS)
    elif kind == "trainer":
        moment = rng.choice(TRAINER_MOMENTS)
    elif kind == "upload":
        moment = "upload"
    else:
        moment = kind
    target = {"upload": rng.uniform(0.0, 1.2), "checkpoint": rng.randint(1, 4)}.get(kind, 0.0)
    # Aimed kills land a few ms into their window (a tiny checkpoint is written in about 0.1 s).
    # Publishing a tiny adapter takes some 20 ms on a quiet machine: its kills come sooner.
    aimed = {"checkpoint": 0.08, "publish": 0.02}
    delay = rng.uniform(0.0, aimed[kind]) if kind in aimed else rng.uniform(0.0, 1.5)
    if moment == "launch":
        delay = 0.0
    return Plan(run, seed, kind, moment, round(delay, 3), round(rng.uniform(0.0, 2.0), 3), target)


@dataclass
class Outcome:
    plan: Plan
    job_id: str | None = None
    status: str = "not run"
    error: str | None = None
    attempts: int = 0
    recovery_s: float | None = None
    # The kill landed where aimed: in the write window (upload/checkpoint/publish), before the
    # pid was recorded (scheduler@launch), on a live trainer (trainer).
    hit: bool | None = None
    violations: list[str] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def large_dataset(seed: int, size: int) -> bytes:
    """A valid chat JSONL of about ``size`` bytes, different for each seed."""
    rng = random.Random(seed)
    lines, total, i = [], 0, 0
    while total < size:
        a, b = rng.randrange(10**6), rng.randrange(10**6)
        record = {
            "messages": [
                {"role": "user", "content": f"[{seed}:{i}] What is {a} plus {b}? " + "Think. " * 20},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
        }
        line = (json.dumps(record) + "\n").encode()
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines)


class Chaos:
    """Runs plans one after another on one cluster and keeps the record that the checks
    compare against: every job and file the client created, and every payload it sent."""

    def __init__(
        self,
        cluster: Cluster,
        training_data: bytes,
        *,
        deadline_s: float = 300,
        upload_bytes: int = 3 << 20,
    ) -> None:
        self.cluster = cluster
        self.api = Api(cluster.url, cluster.api_key)
        self.training_data = training_data
        self.deadline_s = deadline_s
        self.upload_bytes = upload_bytes
        self.jobs: dict[str, int] = {}  # job id -> run that created it
        self.files: dict[str, str] = {}  # file id -> sha256 of what was uploaded
        self.payloads: set[str] = set()  # sha256 of every body we tried to upload
        self.outcomes: list[Outcome] = []

    def close(self) -> None:
        self.api.close()

    # -- one run -----------------------------------------------------------------------

    def run(self, plan: Plan) -> Outcome:
        out = Outcome(plan)
        exits_before = len(self.cluster.unexpected_exits)
        try:
            self._run(plan, out)
        except Exception as exc:  # noqa: BLE001 - a run that breaks the harness is a failed run, not a crash
            out.violations.append(f"harness error: {type(exc).__name__}: {exc}")
        self.cluster.check_alive()
        out.unexpected_exits = self.cluster.unexpected_exits[exits_before:]
        if out.unexpected_exits:
            out.violations.append(f"a part died without being killed: {out.unexpected_exits}")
        self.outcomes.append(out)
        return out

    def _run(self, plan: Plan, out: Outcome) -> None:
        if plan.kind == "upload":
            self._upload_run(plan, out)
        file_id = self.upload(self.training_data)
        if plan.kind in ("checkpoint", "publish"):
            job_id = self.create_job(file_id, plan)
            out.job_id = job_id
            out.hit, t_kill, last = self._aimed_trainer_kill(plan, job_id)
        elif plan.kind != "upload":
            job_id, t_kill, last = self._timed_kill(plan, file_id, out)
            out.job_id = job_id
        else:
            job_id = self.create_job(file_id, plan)
            out.job_id, t_kill, last = job_id, None, None
        if t_kill is not None:
            out.recovery_s = self._recovery(job_id, last, t_kill)
        job = self._wait_terminal(job_id)
        out.status = job["status"] if job else "stuck"
        out.error = (job or {}).get("error") and job["error"].get("code")
        if job is None:
            out.violations.append(f"stuck: {job_id} not finished within {self.deadline_s:.0f} s")
            return
        events = self.api.pages(f"/v1/fine_tuning/jobs/{job_id}/events")
        out.attempts = invariants.attempts_started(events)
        out.violations += invariants.check_job(self.api, self.cluster, job, events)
        if plan.kind != "api":  # with the API down, a trainer's events are dropped by design
            out.violations += invariants.check_trainer_reported(job, events)

    # -- kills ----------------------------------------------------------------------------

    def kill(self, kind: str, job_id: str | None) -> float:
        """SIGKILL the part; returns the monotonic time of the kill."""
        t = time.monotonic()
        if kind in ("trainer", "checkpoint", "publish"):
            assert job_id
            self.cluster.kill_trainer(job_id)
        else:
            self.cluster.kill(kind)
        return t

    def restart(self, kind: str, downtime_s: float) -> None:
        """Trainers are restarted by the scheduler (a new attempt); the harness restarts the rest."""
        if kind in ("api", "scheduler", "redis"):
            time.sleep(downtime_s)
            self.cluster.start(kind)

    def _timed_kill(self, plan: Plan, file_id: str, out: Outcome) -> tuple[str, float, str | None]:
        """Kill ``plan.kind`` at ``plan.moment`` (+ delay); returns (job, kill time, newest event before)."""
        if plan.moment == "create":
            # The kill races the create request itself; the client retries with the same key.
            created: list[str] = []
            key = uuid.uuid4().hex
            thread = threading.Thread(target=lambda: created.append(self.create_job(file_id, plan, key=key)))
            thread.start()
            time.sleep(plan.delay_s / 5)
            t_kill = self.kill(plan.kind, None)
            self.restart(plan.kind, plan.downtime_s)
            thread.join()
            return created[0], t_kill, None
        job_id = self.create_job(file_id, plan)
        if plan.moment == "launch":  # no API call between the aim and the kill: the window is ms wide
            run = self.cluster.home / "runs" / f"ft-{job_id}-a1"
            self._wait_launch(run)
            t_kill = self.kill(plan.kind, job_id)
            out.hit = not (run / "pid").exists()
            last = self._newest_event(job_id)
        else:
            self._wait_moment(job_id, plan.moment)
            time.sleep(plan.delay_s)
            last = self._newest_event(job_id)
            t_kill = self.kill(plan.kind, job_id)
            if plan.kind == "trainer":  # between attempts, or after the end, there is none to kill
                out.hit = self.cluster.killed_trainers > 0
        self.restart(plan.kind, plan.downtime_s)
        return job_id, t_kill, last

    def _wait_moment(self, job_id: str, moment: str) -> None:
        """Until the job reaches ``moment`` (or finishes first: the kill then comes late)."""
        if moment == "queued":
            return
        wanted = {
            "started": lambda e: e["message"].startswith("Attempt 1 started"),
            "training": lambda e: e["type"] == "metrics",
            "checkpoint": lambda e: "checkpoint" in (e.get("data") or {}),
        }[moment]
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            events = self.api.json("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
            if any(wanted(e) for e in events["data"]) or self._finished(job_id):
                return
            time.sleep(0.1)

    def _wait_launch(self, run: Path) -> None:
        """Until the scheduler is starting attempt 1: its spec is written, its pid not yet."""
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            if (run / "spec.json").exists() and not (run / "pid").exists():
                return
            if (run / "pid").exists():  # missed it: the kill comes just after the launch
                return
            time.sleep(0.0005)

    def _aimed_trainer_kill(self, plan: Plan, job_id: str) -> tuple[bool, float, str | None]:
        """Kill the trainer inside a write window, watched on disk every millisecond. Checkpoint:
        from the moment the Trainer starts saving checkpoint number ``plan.target`` locally until
        its manifest is in storage. Publish: from the local save of the final adapter until the
        adapter's manifest is in storage. Returns whether the window was still open at the kill."""
        project = self.api.json("GET", f"/v1/fine_tuning/jobs/{job_id}")["organization_id"]
        job_dir = self.cluster.storage_root() / "projects" / project / "jobs" / job_id
        seen: set[str] = set()
        done: Path | None = None  # the manifest whose absence means the window is open
        deadline = time.monotonic() + self.deadline_s
        next_check = time.monotonic() + 0.5
        while done is None and time.monotonic() < deadline:
            for work in self.cluster.work_dirs(job_id):
                if plan.kind == "checkpoint":
                    with contextlib.suppress(FileNotFoundError):
                        seen.update(
                            p.name for p in (work / "trainer").iterdir() if p.name.startswith("checkpoint-")
                        )
                    if len(seen) >= plan.target:
                        step = max(int(n.split("-")[1]) for n in seen)
                        done = job_dir / "checkpoints" / f"step-{step}" / "manifest.json"
                elif (work / "adapter").is_dir():
                    done = job_dir / "adapter" / "manifest.json"
            if done is None and time.monotonic() > next_check:  # a finished job has no window left
                if self._finished(job_id):
                    return False, self.kill(plan.kind, job_id), None
                next_check = time.monotonic() + 0.5
            time.sleep(0.001)
        time.sleep(plan.delay_s)
        t_kill = self.kill(plan.kind, job_id)
        hit = done is not None and not done.exists()
        return hit, t_kill, self._newest_event(job_id)

    def _upload_run(self, plan: Plan, out: Outcome) -> None:
        """Kill the API mid-stream of a large upload (or during its background validation),
        restart it, and upload again as a client would; the file must end complete and processed."""
        payload = large_dataset(plan.seed, self.upload_bytes)
        self.payloads.add(sha256(payload))
        kill_at = int(len(payload) * plan.target) if plan.target <= 1 else None
        t_kill: list[float] = []

        def on_sent(sent: int) -> None:
            if kill_at is not None and sent >= kill_at and not t_kill:
                t_kill.append(self.kill("api", None))

        try:
            response = self.api.http.post(
                "/v1/files",
                content=_multipart(payload, "big.jsonl", on_sent),
                headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
            )
            if response.status_code == 200:
                self.files[response.json()["id"]] = sha256(payload)
        except Exception:  # noqa: BLE001 - the connection dies with the API: expected
            pass
        if not t_kill:  # the whole body went through: kill during validation and storing
            time.sleep(plan.delay_s / 5)
            t_kill.append(self.kill("api", None))
        out.hit = kill_at is not None
        self.restart("api", plan.downtime_s)
        file_id = self.upload(payload)
        out.recovery_s = round(time.monotonic() - t_kill[0], 3)
        if not self._wait_processed(file_id):
            out.violations.append(f"stuck: file {file_id} still 'uploaded' after {self.deadline_s:.0f} s")

    # -- client actions ----------------------------------------------------------------

    def upload(self, data: bytes) -> str:
        self.payloads.add(sha256(data))
        f = self.api.json(
            "POST", "/v1/files", files={"file": ("train.jsonl", data)}, data={"purpose": "fine-tune"}
        )
        self.files[f["id"]] = sha256(data)
        return f["id"]

    def create_job(self, file_id: str, plan: Plan, *, key: str | None = None) -> str:
        body = {
            "model": TINY,
            "training_file": file_id,
            "method": {"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},
            "seed": plan.seed,
            "suffix": f"chaos-{plan.run}",
        }
        job = self.api.json(
            "POST", "/v1/fine_tuning/jobs", json=body, idempotency_key=key or uuid.uuid4().hex
        )
        self.jobs[job["id"]] = plan.run
        return job["id"]

    def _newest_event(self, job_id: str) -> str | None:
        page = self.api.json("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1})
        return page["data"][0]["id"] if page["data"] else None

    def _finished(self, job_id: str) -> bool:
        return self.api.json("GET", f"/v1/fine_tuning/jobs/{job_id}")["status"] in TERMINAL

    def _recovery(self, job_id: str, last: str | None, t_kill: float) -> float | None:
        """Seconds from the kill to the job's next event or terminal state, as a client sees it."""
        deadline = t_kill + self.deadline_s
        while time.monotonic() < deadline:
            self.cluster.check_alive()  # a part that died by itself is restarted, as a supervisor would
            newest = self._newest_event(job_id)
            if (newest is not None and newest != last) or self._finished(job_id):
                return round(time.monotonic() - t_kill, 3)
            time.sleep(0.1)
        return None

    def _wait_terminal(self, job_id: str) -> dict[str, Any] | None:
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            self.cluster.check_alive()
            job = self.api.json("GET", f"/v1/fine_tuning/jobs/{job_id}")
            if job["status"] in TERMINAL:
                return job
            time.sleep(0.25)
        return None

    def _wait_processed(self, file_id: str) -> bool:
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            if self.api.json("GET", f"/v1/files/{file_id}")["status"] != "uploaded":
                return True
            time.sleep(0.25)
        return False

    # -- whole-service checks ----------------------------------------------------------

    def check_service(self) -> list[str]:
        """Every job the client created is there once, no other; every file is whole."""
        return invariants.check_service(self.api, self.cluster, self.jobs, self.files, self.payloads)


BOUNDARY = "tuneforge-chaos-boundary"


def _multipart(payload: bytes, filename: str, on_sent, chunk: int = 64 << 10):
    """A multipart body streamed in chunks; ``on_sent`` sees the file bytes sent so far."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    for start in range(0, len(payload), chunk):
        on_sent(start)
        yield payload[start : start + chunk]
    on_sent(len(payload))
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


# -- summary -------------------------------------------------------------------------------


def summary(outcomes: list[Outcome], *, wall_s: float | None = None) -> str:
    """A Markdown table: runs, kills by part, outcomes, recovery times, violations."""
    kinds = Counter(o.plan.kind for o in outcomes)
    statuses = Counter(o.status for o in outcomes)
    moments = Counter(o.plan.moment for o in outcomes)
    recoveries = [o.recovery_s for o in outcomes if o.recovery_s is not None]
    aimed = [o for o in outcomes if o.plan.kind in ("upload", "checkpoint", "publish")]
    trainer = [o for o in outcomes if o.plan.kind == "trainer"]
    lines = [
        "| metric | value |",
        "|---|---|",
        f"| runs | {len(outcomes)} |",
        "| kills by part | " + ", ".join(f"{k} {kinds[k]}" for k in KINDS if kinds[k]) + " |",
        "| kills by moment | " + ", ".join(f"{m} {n}" for m, n in sorted(moments.items())) + " |",
        "| outcomes | " + ", ".join(f"{s} {n}" for s, n in sorted(statuses.items())) + " |",
        f"| runs with a violation | {sum(not o.ok for o in outcomes)} |",
        f"| attempts per job (max) | {max((o.attempts for o in outcomes), default=0)} |",
        f"| recovery, median / max (s) | {_fmt(recoveries, statistics.median)} / {_fmt(recoveries, max)} |",
        f"| aimed kills inside the write window | {sum(bool(o.hit) for o in aimed)} of {len(aimed)} |",
        f"| trainer kills that found a trainer | {sum(bool(o.hit) for o in trainer)} of {len(trainer)} |",
    ]
    if wall_s is not None:
        lines.append(f"| wall time (s) | {wall_s:.0f} |")
    per_kind = [
        "",
        "| part | runs | succeeded | failed | other | recovery median / max (s) |",
        "|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        group = [o for o in outcomes if o.plan.kind == kind]
        if not group:
            continue
        rec = [o.recovery_s for o in group if o.recovery_s is not None]
        done = Counter(o.status for o in group)
        other = len(group) - done["succeeded"] - done["failed"]
        per_kind.append(
            f"| {kind} | {len(group)} | {done['succeeded']} | {done['failed']} | {other} "
            f"| {_fmt(rec, statistics.median)} / {_fmt(rec, max)} |"
        )
    problems = [f"- run {o.plan.run} ({o.plan.kind}@{o.plan.moment}, seed {o.plan.seed}): {v}"
                for o in outcomes for v in o.violations]  # fmt: skip
    return "\n".join(lines + per_kind + ([""] + problems if problems else []))


def _fmt(values: list[float], fn) -> str:
    return f"{fn(values):.1f}" if values else "n/a"

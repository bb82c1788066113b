"""The ``tuneforge`` command, built on the SDK. ``tuneforge up`` needs the server packages."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel

from tuneforge._shared import job_body
from tuneforge.client import Client, FeedbackCalls
from tuneforge.errors import TuneforgeError
from tuneforge.types import FeedbackSession, Job, MethodType

EXIT_OK, EXIT_API_ERROR, EXIT_USAGE, EXIT_JOB_UNSUCCESSFUL = 0, 1, 2, 3

# The columns a person wants to see, per type; --json prints everything.
COLUMNS = {
    "FileObject": ("id", "filename", "bytes", "status", "created_at"),
    "Job": ("id", "model", "status", "fine_tuned_model", "trained_tokens", "created_at"),
    "Event": ("created_at", "level", "message"),
    "Checkpoint": ("id", "step_number", "metrics", "created_at"),
    "Model": ("id", "owned_by"),
    "Project": ("id", "name", "created_at"),
    "ApiKey": ("id", "project_id", "name", "role", "key"),
    "Webhook": ("id", "url", "events", "created_at"),
    "WebhookDelivery": ("id", "event_type", "status", "attempts", "last_status_code", "created_at"),
    "FeedbackSession": ("id", "model", "status", "k", "labels_per_item", "job_id", "created_at"),
}


def _plain(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, list):
        return [_plain(o) for o in obj]
    return obj


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_plain(obj), indent=2))
        return
    items = obj if isinstance(obj, list) else [obj]
    kind = type(items[0]).__name__ if items else ""
    if isinstance(obj, list) and kind in COLUMNS:
        columns = COLUMNS[kind]
        rows = [[_cell(getattr(item, c, None)) for c in columns] for item in items]
        widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
        print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
        for row in rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        return
    for item in items:
        for key, value in _plain(item).items():
            if value not in (None, [], {}):
                print(f"{key}: {_cell(value)}")
        if len(items) > 1:
            print()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return getattr(value, "value", str(value))


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A byte progress bar with rich when it is installed, and silence otherwise."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
    except ImportError:
        yield lambda done, total: None
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total or None)


def _wait(client: Client, job_id: str, timeout: float) -> Job:
    """Follow a job until it ends, showing its status and latest metrics."""
    last: dict[str, Any] = {}

    def describe(job: Job) -> str:
        page = client.jobs.list_events(job.id, limit=1)
        if page.data:
            last.update(page.data[0].model_dump())
        return f"{job.status.value}: {last.get('message', '')}"

    try:
        from rich.console import Console
    except ImportError:
        return client.jobs.wait(
            job_id, timeout=timeout, on_update=lambda j: print(describe(j), file=sys.stderr)
        )
    console = Console(stderr=True)
    with console.status(f"waiting for {job_id}") as status:
        return client.jobs.wait(job_id, timeout=timeout, on_update=lambda j: status.update(describe(j)))


def _follow(client: Client, job_id: str) -> Job:
    """Stream the job's events: a live bar of step / total, loss and ETA, then the result."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:
        for event in client.jobs.stream(job_id):
            print(f"[{event.level}] {event.message}", file=sys.stderr)
        return client.jobs.get(job_id)
    console = Console(stderr=True)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job_id, total=None, info="")
        for event in client.jobs.stream(job_id):
            data = event.data or {}
            if event.type == "metrics" and "step" in data and "total_steps" in data:
                info = f"step {data['step']}/{data['total_steps']}"
                if "train_loss" in data:
                    info += f"  loss {data['train_loss']:.4f}"
                bar.update(task, total=data["total_steps"], completed=data["step"], info=info)
            elif event.type == "message":
                bar.console.print(f"[{event.level}] {event.message}")
    return client.jobs.get(job_id)


def _cmd_up(args: argparse.Namespace, _: Client | None) -> int:
    try:
        from tuneforge_scheduler.up import up
    except ImportError:
        print(
            "tuneforge up needs the server packages: pip install ./api ./scheduler ./trainer_image",
            file=sys.stderr,
        )
        return 2
    return up(args.host, args.port)


def _cmd(
    fn: Callable[[argparse.Namespace, Client], Any], *, waits: bool = False
) -> Callable[[argparse.Namespace, Client], int]:
    def run(args: argparse.Namespace, client: Client) -> int:
        result = fn(args, client)
        if result is not None:
            _print(result, args.json)
        # A script that waited on a job (or a feedback session) learns its outcome from the exit code.
        waited = waits or getattr(args, "wait", False)
        if waited and isinstance(result, Job | FeedbackSession):
            if getattr(result.status, "value", result.status) in ("failed", "cancelled"):
                return EXIT_JOB_UNSUCCESSFUL
        return EXIT_OK

    return run


def _upload(args: argparse.Namespace, c: Client) -> Any:
    with _progress(f"uploading {args.path}") as cb:
        return c.files.upload(args.path, purpose=args.purpose, on_progress=cb)


def _job_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``create_job``'s keyword arguments from the flags that ``_add_job_flags`` declares."""
    return {
        "model": args.model,
        "training_file": args.training_file,
        "method": args.method,
        "hyperparameters": json.loads(args.hyperparameters) if args.hyperparameters else None,
        "validation_file": args.validation_file,
        "suffix": args.suffix,
        "seed": args.seed,
        **(json.loads(args.extra) if args.extra else {}),
    }


def _create_job(args: argparse.Namespace, c: Client) -> Any:
    job = c.create_job(**_job_fields(args))
    return _follow(c, job.id) if args.wait else job


def _validate_job(args: argparse.Namespace, c: Client) -> Any:
    f = _job_fields(args)
    return c.jobs.validate(
        job_body(f.pop("model"), f.pop("training_file"), f.pop("method"), f.pop("hyperparameters"), f)
    )


def _shown_once(obj: Any, what: str) -> Any:
    print(f"note: the {what} is shown this once; keep it now.", file=sys.stderr)
    return obj


def _create_session(args: argparse.Namespace, c: Client) -> Any:
    knobs = ("temperature", "top_p", "max_new_tokens", "seed")
    sampling = {k: getattr(args, k) for k in knobs if getattr(args, k) is not None}
    session = c.feedback.create_session(
        model=args.model,
        prompts_file=args.prompts_file,
        k=args.k,
        labels_per_item=args.labels_per_item,
        **({"sampling": sampling} if sampling else {}),
    )
    return c.feedback.wait_until_ready(session.id, timeout=args.timeout) if args.wait else session


def _add_job_flags(j: argparse.ArgumentParser) -> None:
    j.add_argument("--model", required=True)
    j.add_argument("--training-file", required=True)
    j.add_argument("--validation-file")
    # Sample jobs belong to feedback sessions; they are not created by hand.
    trainable = [m.value for m in MethodType if m is not MethodType.sample]
    j.add_argument("--method", default="supervised", choices=trainable)
    j.add_argument("--hyperparameters", help="JSON, e.g. '{\"n_epochs\": 2}'")
    j.add_argument("--suffix")
    j.add_argument("--seed", type=int)
    j.add_argument("--extra", help="JSON of further fields: lora, quantization, resources")


def _download(args: argparse.Namespace, c: Client) -> Any:
    with _progress(f"downloading adapter of {args.job_id}") as cb:
        path = c.adapters.download(args.job_id, args.dest, on_progress=cb)
    return {"path": str(path)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tuneforge",
        description="Tuneforge: self-hosted fine-tuning.",
        epilog="exit codes: 0 ok; 1 the API refused or failed; 2 bad input; 3 the waited-for job (or "
        "feedback session) failed or was cancelled",
    )
    p.add_argument("--base-url", help="default: $TUNEFORGE_BASE_URL or http://127.0.0.1:8000")
    p.add_argument("--api-key", help="default: $TUNEFORGE_API_KEY")
    p.add_argument("--json", action="store_true", help="print full JSON (for scripts) instead of tables")
    sub = p.add_subparsers(dest="group", required=True)

    up = sub.add_parser("up", help="start API, scheduler and local executor")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.set_defaults(run=_cmd_up, needs_client=False)

    files = sub.add_parser("files", help="datasets").add_subparsers(dest="verb", required=True)
    f = files.add_parser("upload")
    f.add_argument("path")
    f.add_argument("--purpose", default="fine-tune")
    f.set_defaults(run=_cmd(_upload))
    files.add_parser("list").set_defaults(run=_cmd(lambda a, c: c.files.list()))
    for verb, fn in (
        ("get", lambda a, c: c.files.get(a.file_id)),
        ("delete", lambda a, c: {"deleted": c.files.delete(a.file_id)}),
    ):
        v = files.add_parser(verb)
        v.add_argument("file_id")
        v.set_defaults(run=_cmd(fn))

    jobs = sub.add_parser("jobs", help="fine-tuning jobs").add_subparsers(dest="verb", required=True)
    j = jobs.add_parser("create")
    _add_job_flags(j)
    j.add_argument("--wait", action="store_true", help="follow the job until it ends")
    j.add_argument("--timeout", type=float, default=24 * 3600)
    j.set_defaults(run=_cmd(_create_job))
    jv = jobs.add_parser("validate", help="a dry run of create: file reports, tokens, estimated time")
    _add_job_flags(jv)
    jv.set_defaults(run=_cmd(_validate_job))
    jobs.add_parser("list").set_defaults(run=_cmd(lambda a, c: c.jobs.list_all()))
    for verb, fn in (
        ("get", lambda a, c: c.jobs.get(a.job_id)),
        ("cancel", lambda a, c: c.jobs.cancel(a.job_id)),
        ("events", lambda a, c: list(c.jobs.events(a.job_id))),
        ("wait", lambda a, c: _wait(c, a.job_id, a.timeout)),
        ("follow", lambda a, c: _follow(c, a.job_id)),
    ):
        v = jobs.add_parser(verb)
        v.add_argument("job_id")
        v.add_argument("--timeout", type=float, default=24 * 3600)
        v.set_defaults(run=_cmd(fn, waits=verb in ("wait", "follow")))

    adapters = sub.add_parser("adapters", help="trained adapters").add_subparsers(dest="verb", required=True)
    d = adapters.add_parser("download")
    d.add_argument("job_id")
    d.add_argument("dest")
    d.set_defaults(run=_cmd(_download))

    sub.add_parser("models", help="list models").set_defaults(run=_cmd(lambda a, c: c.models.list()))

    projects = sub.add_parser("projects", help="projects (admin)").add_subparsers(dest="verb", required=True)
    pc = projects.add_parser("create")
    pc.add_argument("name")
    pc.set_defaults(run=_cmd(lambda a, c: c.admin.create_project(a.name)))
    projects.add_parser("list").set_defaults(run=_cmd(lambda a, c: c.admin.list_projects()))

    keys = sub.add_parser("keys", help="API keys (admin)").add_subparsers(dest="verb", required=True)
    kc = keys.add_parser("create")
    kc.add_argument("project_id")
    kc.add_argument("--name", default="default")
    kc.add_argument("--role", choices=["member", "admin"], default="member")
    kc.set_defaults(run=_cmd(lambda a, c: c.admin.create_key(a.project_id, name=a.name, role=a.role)))
    kr = keys.add_parser("revoke")
    kr.add_argument("project_id")
    kr.add_argument("key_id")
    kr.set_defaults(run=_cmd(lambda a, c: {"deleted": c.admin.revoke_key(a.project_id, a.key_id)}))

    hooks = sub.add_parser("webhooks", help="signed job-event callbacks").add_subparsers(
        dest="verb", required=True
    )
    wc = hooks.add_parser("create")
    wc.add_argument("url")
    wc.add_argument("--events", nargs="+", help="default: every job event")
    wc.set_defaults(
        run=_cmd(lambda a, c: _shown_once(c.webhooks.create(a.url, events=a.events), "signing secret"))
    )
    hooks.add_parser("list").set_defaults(run=_cmd(lambda a, c: c.webhooks.list()))
    for verb, fn in (
        ("delete", lambda a, c: {"deleted": c.webhooks.delete(a.webhook_id)}),
        ("deliveries", lambda a, c: c.webhooks.deliveries(a.webhook_id)),
    ):
        v = hooks.add_parser(verb)
        v.add_argument("webhook_id")
        v.set_defaults(run=_cmd(fn))

    feedback = sub.add_parser("feedback", help="human-feedback sessions").add_subparsers(
        dest="verb", required=True
    )
    fc = feedback.add_parser("create", help="sample K answers per prompt for people to rank")
    fc.add_argument("--model", required=True)
    fc.add_argument("--prompts-file", required=True, help="id of an uploaded file of prompts")
    fc.add_argument("--k", type=int, required=True, help="answers per prompt")
    fc.add_argument("--labels-per-item", type=int, default=1)
    fc.add_argument("--temperature", type=float)
    fc.add_argument("--top-p", type=float)
    fc.add_argument("--max-new-tokens", type=int)
    fc.add_argument("--seed", type=int)
    fc.add_argument("--wait", action="store_true", help="wait until the answers are generated")
    fc.add_argument("--timeout", type=float, default=3600)
    fc.set_defaults(run=_cmd(_create_session))
    feedback.add_parser("list").set_defaults(
        run=_cmd(
            lambda a, c: list(c.pages(lambda after: FeedbackCalls.list_sessions(limit=100, after=after)))
        )
    )
    for verb, fn in (
        ("get", lambda a, c: c.feedback.get_session(a.session_id)),
        ("cancel", lambda a, c: c.feedback.cancel_session(a.session_id)),
        ("export", lambda a, c: c.feedback.export(a.session_id, min_labels=a.min_labels)),
    ):
        v = feedback.add_parser(verb)
        v.add_argument("session_id")
        if verb == "export":
            v.add_argument("--min-labels", type=int, default=1, help="items with fewer labels are left out")
        v.set_defaults(run=_cmd(fn))
    fk = feedback.add_parser("labeler-key", help="a key that can only rank answers")
    fk.add_argument("name")
    fk.set_defaults(run=_cmd(lambda a, c: _shown_once(c.feedback.create_labeler_key(a.name), "key")))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `tuneforge jobs list | head` ends quietly, as other CLIs do. Never for the server (`up`):
    # with SIGPIPE's default action, one client hanging up mid-response would kill the process.
    if hasattr(signal, "SIGPIPE") and args.group != "up":
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if not getattr(args, "needs_client", True):
        return args.run(args, None)
    with Client(base_url=args.base_url, api_key=args.api_key) as client:
        try:
            return args.run(args, client)
        except TuneforgeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_API_ERROR
        except json.JSONDecodeError as exc:
            print(f"error: not valid JSON: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (OSError, ValueError) as exc:  # a missing local file; a value the SDK's types refuse
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

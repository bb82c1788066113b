"""Fixtures for the trainer tests: the tiny model, an event sink over real HTTP, trainer runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

# Before anything imports huggingface_hub: these tests must never reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO = Path(__file__).resolve().parents[2]
DEMO_DATA = REPO / "examples" / "demo_chat.jsonl"
JOB_TOKEN = "tf-job-secret-token-for-tests"
PROJECT = "proj-test"


@pytest.fixture(scope="session")
def models_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model_dir(models_cache: Path) -> Path:
    from tuneforge_trainer.tiny_model import ensure_tiny_model

    return ensure_tiny_model(models_cache)


@dataclass
class EventSink:
    """A stand-in for the API's internal events route, over real HTTP on loopback."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)

    def events(self, job_id: str | None = None) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if job_id is None or f"/jobs/{job_id}/" in r["path"]]


@contextmanager
def serve_events() -> Iterator[EventSink]:
    sink = EventSink()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"null")
            sink.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            payload = json.dumps({"id": f"ev-{len(sink.requests)}"}).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval: shutdown() waits for it, once per test.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    sink.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def event_sink() -> Iterator[EventSink]:
    with serve_events() as sink:
        yield sink


@pytest.fixture(scope="module")
def module_event_sink() -> Iterator[EventSink]:
    with serve_events() as sink:
        yield sink


@dataclass
class TrainerJob:
    """One trainer invocation's inputs: a file:// storage root, a spec, a training file."""

    root: Path
    spec: dict[str, Any]
    spec_path: Path

    @property
    def job_id(self) -> str:
        return self.spec["job_id"]

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "tuneforge_trainer", "--spec", str(self.spec_path)]


@pytest.fixture(scope="session")
def make_job() -> Callable[..., TrainerJob]:
    """Write a training (and validation) file into a file:// storage under ``folder``, a spec next to it."""

    def make(
        folder: Path,
        data: bytes,
        api_url: str,
        *,
        job_id: str = "ftjob-1",
        validation: bytes | None = None,
        **overrides: Any,
    ) -> TrainerJob:
        root = folder / "storage"
        file_key = f"projects/{PROJECT}/files/file-{job_id}"
        (root / file_key).parent.mkdir(parents=True, exist_ok=True)
        (root / file_key).write_bytes(data)
        if validation is not None:
            (root / f"{file_key}-valid").write_bytes(validation)
            overrides.setdefault("validation_file_key", f"{file_key}-valid")
        spec = {
            "job_id": job_id,
            "project_id": PROJECT,
            "attempt": 1,
            "base_model": "tuneforge/tiny-llama",
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 8}}},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "seed": 42,
            "training_file_key": file_key,
            "storage_uri": root.as_uri(),
            "api_base_url": api_url,
            **overrides,
        }
        spec_path = folder / f"spec-{job_id}.json"
        spec_path.write_text(json.dumps(spec))
        return TrainerJob(root, spec, spec_path)

    return make


@pytest.fixture(scope="session")
def trainer_env(models_cache: Path) -> dict[str, str]:
    """The environment an executor gives the trainer: the job token, a shared models cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env.update(TUNEFORGE_MODELS_CACHE=str(models_cache), TUNEFORGE_JOB_TOKEN=JOB_TOKEN)
    # The tiny model's matmuls are too small to split: on a busy 2-core machine, torch's default
    # two threads spin against each other (and other processes) and a run gets ~15x slower.
    env["OMP_NUM_THREADS"] = "1"
    return env


@dataclass
class TrainerProcess:
    """A trainer running in the background, its output going to a log file."""

    job: TrainerJob
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def start_trainer(trainer_env: dict[str, str]) -> Iterator[Callable[..., TrainerProcess]]:
    """Start trainers in the background: runs that do not depend on each other share the two cores."""
    started: list[TrainerProcess] = []

    def start(job: TrainerJob, log_path: Path, **env: str) -> TrainerProcess:
        with open(log_path, "w") as out:  # a file, not a pipe: an undrained pipe could block the trainer
            proc = subprocess.Popen(
                job.command, env={**trainer_env, **env}, stdout=out, stderr=subprocess.STDOUT
            )
        started.append(TrainerProcess(job, proc, log_path))
        return started[-1]

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The same for the runs these tests do in-process; restored for the other test packages."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def run_trainer(trainer_env: dict[str, str]) -> Callable[[TrainerJob], subprocess.CompletedProcess[str]]:
    def run(job: TrainerJob) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            job.command,
            env=trainer_env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    return run

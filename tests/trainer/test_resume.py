"""Resume: a run SIGKILLed after its first checkpoint, resumed by attempt 2, ends where an
uninterrupted run with the same seed ends.

The HF Trainer restores the adapter, optimizer, scheduler and RNG state from the checkpoint
and skips the batches of the current epoch it had already trained on, so the data order and
the dropout masks match the uninterrupted run. Checkpoints land mid-epoch on purpose
(checkpoint_every=3, 4 steps per epoch), and LoRA dropout is on, so both mechanisms matter.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tuneforge.storage import (
    FileStorage,
    adapter_prefix,
    checkpoint_prefix,
    complete_checkpoint_steps,
    get_dir,
)

if TYPE_CHECKING:
    from tests.trainer.conftest import EventSink, TrainerJob, TrainerProcess

REPO = Path(__file__).resolve().parents[2]
DATA = b"\n".join((REPO / "examples" / "demo_chat.jsonl").read_bytes().splitlines()[:16])
HP = {"n_epochs": 3, "batch_size": 4, "checkpoint_every": 3}  # 12 steps; saves at 3, 4, 6, 8, 9, 12
SPEC = {
    "method": {"type": "supervised", "supervised": {"hyperparameters": HP}},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
    "seed": 1234,
}
# Measured on CPU (float32, one thread): the resumed adapter equals the uninterrupted one bit
# for bit (max abs diff 0.0). The bound leaves room for other BLAS builds' summation order.
TOLERANCE = 1e-6


@dataclass
class Outcome:
    job: TrainerJob
    log: str
    returncode: int

    @property
    def storage(self) -> FileStorage:
        return FileStorage(self.job.root)

    def adapter(self, tmp: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        folder = tmp / f"adapter-{self.job.job_id}"
        get_dir(self.storage, adapter_prefix(self.job.spec["project_id"], self.job.job_id), folder)
        return load_file(folder / "adapter_model.safetensors")

    def manifest_metrics(self) -> dict[str, Any]:
        prefix = adapter_prefix(self.job.spec["project_id"], self.job.job_id)
        return json.loads(self.storage.get_bytes(prefix + "manifest.json"))["metrics"]


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    module_event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    start_trainer: Callable[..., TrainerProcess],
) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("resume")
    sink = module_event_sink
    reference = make_job(folder / "a", DATA, sink.url, job_id="ftjob-whole", **SPEC)
    # The uninterrupted run goes alongside the killed one: one thread each on two cores.
    whole = start_trainer(reference, folder / "whole.log")

    victim = start_trainer(
        make_job(folder / "b", DATA, sink.url, job_id="ftjob-killed", **SPEC), folder / "b.log"
    )
    storage = FileStorage(victim.job.root)
    deadline = time.monotonic() + 180
    while not complete_checkpoint_steps(storage, "proj-test", "ftjob-killed"):
        assert victim.proc.poll() is None, victim.log[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    os.kill(victim.proc.pid, signal.SIGKILL)  # no handler runs: as if the node died
    killed = Outcome(victim.job, victim.log, victim.wait())

    # What the scheduler does for a retried attempt: resume from the latest complete checkpoint.
    latest = complete_checkpoint_steps(storage, "proj-test", "ftjob-killed")[-1]
    retry = make_job(
        folder / "b",
        DATA,
        sink.url,
        job_id="ftjob-killed",
        attempt=2,
        resume_from_key=checkpoint_prefix("proj-test", "ftjob-killed", latest),
        **SPEC,
    )
    attempt_2 = start_trainer(retry, folder / "resumed.log")
    resumed = Outcome(retry, "", attempt_2.wait())
    resumed.log = attempt_2.log
    whole_code = whole.wait()
    return {
        "whole": Outcome(reference, whole.log, whole_code),
        "killed": killed,
        "resumed": resumed,
        "resumed_from": latest,
        "events": sink.events("ftjob-killed"),
    }


def test_killed_run_left_a_complete_checkpoint_and_no_adapter(runs: dict[str, Any]) -> None:
    killed: Outcome = runs["killed"]
    assert killed.returncode == -signal.SIGKILL
    assert "adapter published" not in killed.log
    assert runs["resumed_from"] in (3, 4, 6, 8, 9)  # whatever was complete when the kill landed


def test_resumed_run_succeeds_and_says_where_it_resumed(runs: dict[str, Any]) -> None:
    resumed: Outcome = runs["resumed"]
    assert resumed.returncode == 0, resumed.log[-3000:]
    messages = [e["message"] for e in runs["events"]]
    assert f"resumed from step {runs['resumed_from']} (attempt 2)" in messages
    steps = [
        e["data"]["step"] for e in runs["events"] if e["type"] == "metrics" and "train_loss" in e["data"]
    ]
    # Attempt 2 trains only the steps after the checkpoint.
    assert steps[-(12 - runs["resumed_from"]) :] == list(range(runs["resumed_from"] + 1, 13))
    later = [s for s in complete_checkpoint_steps(resumed.storage, "proj-test", "ftjob-killed")]
    assert later[-1] == 12
    manifest = json.loads(
        resumed.storage.get_bytes(checkpoint_prefix("proj-test", "ftjob-killed", 12) + "manifest.json")
    )
    assert manifest["attempt"] == 2


def test_resumed_adapter_equals_the_uninterrupted_one(runs: dict[str, Any], tmp_path: Path) -> None:
    whole: Outcome = runs["whole"]
    resumed: Outcome = runs["resumed"]
    assert whole.returncode == 0, whole.log[-3000:]
    a, b = whole.adapter(tmp_path), resumed.adapter(tmp_path)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resume: max abs diff of adapter tensors = {diff:.3g}")
    assert diff <= TOLERANCE
    # Trained tokens continue from the checkpoint: counted once, not again.
    m_whole, m_resumed = whole.manifest_metrics(), resumed.manifest_metrics()
    assert m_resumed["trained_tokens"] == m_whole["trained_tokens"] > 0
    assert m_resumed["steps"] == m_whole["steps"] == 12
    # The log history comes back with the checkpoint, so first_loss is the run's first step.
    assert m_resumed["first_loss"] == pytest.approx(m_whole["first_loss"])
    assert m_resumed["final_loss"] == pytest.approx(m_whole["final_loss"], abs=TOLERANCE)

"""The local executor with real subprocesses: states, exit codes, cancel, restart, lost runs.

These tests start plain Python commands in place of the trainer, since what they test is
process handling; the real trainer runs under the executor in tests/e2e.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tuneforge.types import JobSpec, LoraConfigSpec, Method
from tuneforge_scheduler.executors import RunState
from tuneforge_scheduler.executors.local import LocalExecutor

SPEC = JobSpec(
    job_id="ftjob-x",
    project_id="p",
    attempt=1,
    base_model="tuneforge/tiny-llama",
    method=Method(type="supervised"),
    lora=LoraConfigSpec(),
    training_file_key="k",
    storage_uri="file:///tmp",
    api_base_url="http://127.0.0.1:1",
)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_code_is_recorded(tmp_path: Path, code: int) -> None:
    ex = LocalExecutor(tmp_path, command=python(f"import sys; print('hi'); sys.exit({code})"))
    assert ex.status("run-a1").state == RunState.missing
    ex.submit("run-a1", SPEC, {})
    wait_for(lambda: ex.status("run-a1").state == RunState.exited)
    assert ex.status("run-a1").exit_code == code
    assert "hi" in ex.log_tail("run-a1")
    assert JobSpec.model_validate_json((tmp_path / "run-a1" / "spec.json").read_text()) == SPEC


def test_env_reaches_the_process(tmp_path: Path) -> None:
    ex = LocalExecutor(
        tmp_path, command=python("import os, sys; sys.exit(7 if os.environ['TF_X'] == 'y' else 1)")
    )
    ex.submit("run-a1", SPEC, {"TF_X": "y"})
    wait_for(lambda: ex.status("run-a1").state == RunState.exited)
    assert ex.status("run-a1").exit_code == 7


def test_cancel_kills_the_whole_group(tmp_path: Path) -> None:
    # The "trainer" starts a grandchild of its own, as torchrun or dataloader workers would.
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "open('child.pid', 'w').write(str(p.pid)); time.sleep(60)"
    )
    ex = LocalExecutor(tmp_path, command=python(code))
    ex.submit("run-a1", SPEC, {})
    wait_for(lambda: (tmp_path / "run-a1" / "child.pid").exists())
    grandchild = int((tmp_path / "run-a1" / "child.pid").read_text())
    assert ex.status("run-a1").state == RunState.running
    started = time.monotonic()
    ex.cancel("run-a1")
    assert time.monotonic() - started < 10
    assert not _alive(grandchild)
    assert ex.status("run-a1").state == RunState.lost


def test_cancel_escalates_to_sigkill(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    ex = LocalExecutor(tmp_path, command=python(code))
    ex.submit("run-a1", SPEC, {})
    time.sleep(0.5)
    ex.cancel("run-a1")
    assert ex.status("run-a1").state != RunState.running


def test_a_new_executor_finds_running_and_lost_runs(tmp_path: Path) -> None:
    first = LocalExecutor(tmp_path, command=python("import time; time.sleep(60)"))
    first.submit("run-a1", SPEC, {})
    second = LocalExecutor(tmp_path)  # a restarted scheduler
    assert second.status("run-a1").state == RunState.running
    second.submit("run-a1", SPEC, {})  # idempotent: no second process
    pid = int((tmp_path / "run-a1" / "pid").read_text())
    os.killpg(pid, signal.SIGKILL)  # the wrapper dies too: no exit code is written
    first.status("run-a1")  # reap it, as the first scheduler would
    wait_for(lambda: second.status("run-a1").state == RunState.lost)
    second.cancel("run-a1")  # a no-op on a dead run


def test_resubmit_after_exit_starts_again(tmp_path: Path) -> None:
    ex = LocalExecutor(tmp_path, command=python("import sys; sys.exit(3)"))
    ex.submit("run-a1", SPEC, {})
    wait_for(lambda: ex.status("run-a1").state == RunState.exited)
    ex.command = python("import sys; sys.exit(0)")
    ex.submit("run-a1", SPEC, {})
    wait_for(lambda: ex.status("run-a1").state == RunState.exited)
    assert ex.status("run-a1").exit_code == 0


def test_shutdown_stops_everything(tmp_path: Path) -> None:
    ex = LocalExecutor(tmp_path, command=python("import time; time.sleep(60)"), max_concurrent=2)
    ex.submit("a-a1", SPEC, {})
    ex.submit("b-a1", SPEC, {})
    pids = [int((tmp_path / n / "pid").read_text()) for n in ("a-a1", "b-a1")]
    ex.shutdown()
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return bool(stat) and stat.split(")")[-1].split()[0] != "Z"


def test_embedded_redis_starts_answers_and_stops(tmp_path: Path) -> None:
    from tuneforge_scheduler.embedded_redis import EmbeddedRedis, redis_answers

    server = EmbeddedRedis(tmp_path / "redis").start()
    assert redis_answers("127.0.0.1", server.port) and server.url.endswith(f":{server.port}/0")
    server.stop()
    assert not redis_answers("127.0.0.1", server.port)


def test_shutdown_marks_runs_interrupted(tmp_path: Path) -> None:
    """A run the service stopped is reported as interrupted, so its job is not charged a
    failed attempt; a run that died on its own is not."""
    ex = LocalExecutor(tmp_path, command=python("import time; time.sleep(60)"), max_concurrent=2)
    ex.submit("stopped-a1", SPEC, {})
    ex.shutdown()
    status = LocalExecutor(tmp_path).status("stopped-a1")
    assert status.state == RunState.lost and status.interrupted
    crashed = LocalExecutor(tmp_path, command=python("import sys; sys.exit(1)"))
    crashed.submit("crashed-a1", SPEC, {})
    wait_for(lambda: crashed.status("crashed-a1").state == RunState.exited)
    assert not crashed.status("crashed-a1").interrupted
    crashed.submit("stopped-a1", SPEC, {})  # a resubmitted run starts unmarked
    wait_for(lambda: crashed.status("stopped-a1").state == RunState.exited)
    assert not crashed.status("stopped-a1").interrupted

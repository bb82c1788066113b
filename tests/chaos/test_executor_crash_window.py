"""The local executor across a scheduler crash between starting a trainer and recording its
pid (what a SIGKILL of the scheduler at the "launch" moment leaves), and under concurrent
submits (the submit task and the reconcile pass run in threads of one scheduler)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.chaos.cluster import _killpg
from tests.chaos.stand_ins import SLEEPER, groups_running, spec
from tuneforge_scheduler.executors import RunState
from tuneforge_scheduler.executors.local import LocalExecutor

pytestmark = pytest.mark.chaos


@pytest.fixture
def runs(tmp_path: Path):
    yield tmp_path / "runs"
    for pgid in groups_running(str(tmp_path / "runs")):
        _killpg(pgid)


def test_a_run_whose_pid_was_never_recorded_is_adopted_not_relaunched(runs: Path) -> None:
    name = "ft-ftjob-crashwindow-a1"
    crashed = LocalExecutor(runs, command=SLEEPER)
    crashed.submit(name, spec(), {})
    (runs / name / "pid").unlink()  # the scheduler died before writing it
    # Its orphaned wrapper is reaped by init in real life; here a thread of ours does it.
    threading.Thread(target=crashed._children[name].wait, daemon=True).start()
    [group] = groups_running(name)

    restarted = LocalExecutor(runs, command=SLEEPER)  # a new scheduler process knows nothing else
    assert restarted.status(name).state == RunState.running
    restarted.submit(name, spec(), {})  # what reconcile's relaunch would do
    assert groups_running(name) == {group}, "the attempt runs twice"
    assert int((runs / name / "pid").read_text()) == group

    restarted.cancel(name)  # and the adopted run can still be stopped
    assert groups_running(name) == set()


def test_concurrent_submits_start_one_run(runs: Path) -> None:
    name = "ft-ftjob-crashwindow-a1"
    executor = LocalExecutor(runs, command=SLEEPER)
    barrier = threading.Barrier(6)

    def submit() -> None:
        barrier.wait()
        executor.submit(name, spec(), {})

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(groups_running(name)) == 1
    executor.cancel(name)

"""Kill each part of the real service once, at a seeded moment of a job's life, and check
that nothing is lost, duplicated, stuck or half-visible. ``make chaos N=200`` runs more."""

from __future__ import annotations

import os

import pytest

from tests.chaos.harness import KINDS, Chaos, make_plan

pytestmark = pytest.mark.chaos
SEED = int(os.environ.get("TUNEFORGE_CHAOS_SEED", "7"))


@pytest.mark.parametrize("run,kind", list(enumerate(KINDS)))
def test_kill_and_restart(chaos: Chaos, run: int, kind: str) -> None:
    plan = make_plan(run, SEED + run, kind)
    out = chaos.run(plan)
    logs = {name: chaos.cluster.log_tail(name, 3000) for name in ("api", "scheduler")}
    assert out.ok, (plan, out.violations, logs)
    # One kill costs at most one of the job's three attempts, so the job must still succeed.
    assert out.status == "succeeded", (plan, out, logs)
    assert out.attempts <= 2, out


def test_the_service_lost_nothing(chaos: Chaos) -> None:
    """After all the kills: every job listed once, every file whole and validated."""
    assert len(chaos.jobs) == len(KINDS)
    assert chaos.check_service() == []

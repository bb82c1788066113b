"""Chaos runs against the real service: ``make chaos N=200`` (or ``python bench/chaos.py --runs N``).

Each run SIGKILLs one part (API, scheduler, Redis, trainer; or the trainer inside a checkpoint
or adapter write, or the API mid-upload) at a seeded moment of a job's life, restarts it, and
checks the invariants of ``tests/chaos/invariants.py``. Parts are taken in turn, so every N of
7 or more kills each one; the moment and the delays come from ``random.Random(seed + run)``.
Prints a Markdown summary table; exits 1 if any run broke an invariant.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.chaos.cluster import Cluster  # noqa: E402
from tests.chaos.harness import KINDS, Chaos, make_plan, summary  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="number of runs (N)")
    parser.add_argument("--seed", type=int, default=1, help="seed of run 0; run i uses seed + i")
    parser.add_argument("--deadline", type=float, default=600, help="seconds before a job counts as stuck")
    parser.add_argument("--upload-mib", type=float, default=3, help="size of the upload killed mid-stream")
    parser.add_argument("--database-url", default=None, help="e.g. postgresql+asyncpg://...; default SQLite")
    parser.add_argument("--keep", action="store_true", help="keep the service's folder (logs) afterwards")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(tempfile.mkdtemp(prefix="tuneforge-chaos-"))
    cluster = Cluster(root, root / "models", "tf-chaos-" + uuid.uuid4().hex, database_url=args.database_url)
    data = (ROOT / "examples" / "demo_chat.jsonl").read_bytes()
    started = time.monotonic()
    chaos = None
    try:
        cluster.start_all()
        chaos = Chaos(cluster, data, deadline_s=args.deadline, upload_bytes=int(args.upload_mib * 2**20))
        for run in range(args.runs):
            plan = make_plan(run, args.seed + run, KINDS[run % len(KINDS)])
            out = chaos.run(plan)
            print(
                f"run {run:3d} {plan.kind:10s} @{plan.moment:10s} seed {plan.seed}: {out.status}, "
                f"{out.attempts} attempt(s), recovery {out.recovery_s} s, window hit {out.hit}"
                + (f" VIOLATIONS {out.violations}" if out.violations else ""),
                flush=True,
            )
        service = chaos.check_service()
    finally:
        if chaos is not None:
            chaos.close()
        cluster.close()
    table = summary(chaos.outcomes, wall_s=time.monotonic() - started)
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(table)
    if service:
        print("\nservice-wide violations:\n" + "\n".join(f"- {v}" for v in service))
    print(f"\nlogs: {root / 'logs'}" if args.keep else "")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 1 if service or any(not o.ok for o in chaos.outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())

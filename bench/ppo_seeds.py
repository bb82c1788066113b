"""PPO's reward rise across seeds on the issue-4 setting (not a test; tests/trainer covers seed 42).

Usage: python bench/ppo_seeds.py [--seeds 1 3 7 42 1234] [--hp '{"score_norm": true}'] [--fresh] [--k 3]

Trains the reward model (prefers answers naming Forgeville) and the SFT policy (fluent template
answers, the marker in ~a quarter of its training answers) once, in-process on the tiny model, then
runs PPO from the SFT adapter (``--fresh``: from a fresh LoRA, the old setting) once per seed with
``tests/trainer/ppo_setting.PPO_HP`` updated by ``--hp``. Prints, per seed: the mean RM score of the
first k and last k rollouts, the rise, the marker rate (share of answers naming Forgeville) first k
and last k, the largest KL per answer, and the seconds of the PPO run (one torch thread).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 3, 7, 42, 1234])
    parser.add_argument("--hp", default="{}", help="JSON overrides of PPO_HP")
    parser.add_argument("--fresh", action="store_true", help="PPO from a fresh LoRA, not the SFT policy")
    parser.add_argument("--k", type=int, default=3)
    args = parser.parse_args()

    import torch

    from tests.trainer import ppo_setting as ps
    from tuneforge_trainer.tiny_model import ensure_tiny_model

    torch.set_num_threads(1)  # the tiny model's matmuls are too small to split (see tests/trainer)
    overrides = json.loads(args.hp)
    k = args.k
    print(f"PPO_HP {json.dumps({**ps.PPO_HP, **overrides})}; start: {'fresh LoRA' if args.fresh else 'SFT'}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ppo-seeds-") as tmp:
        folder = Path(tmp)
        tiny = ensure_tiny_model(folder / "models")
        with contextlib.redirect_stdout(io.StringIO()):
            ps.train_rm_and_sft(folder / "storage", tiny, folder / "work")
        for seed in args.seeds:
            began = time.monotonic()
            with contextlib.redirect_stdout(io.StringIO()):
                run = ps.run_ppo(
                    folder / "storage",
                    tiny,
                    folder / f"ppo-{seed}",
                    seed=seed,
                    from_sft=not args.fresh,
                    **overrides,
                )
            seconds = time.monotonic() - began
            r, m = run.rewards, run.marker_rates
            rows.append(
                f"| {seed} | {ps.mean(r[:k]):+.2f} | {ps.mean(r[-k:]):+.2f} | **{run.rise(k):+.2f}** "
                f"| {ps.mean(m[:k]):.2f} | {ps.mean(m[-k:]):.2f} | {max(run.kls):.1f} | {run.kls[-1]:.1f} "
                f"| {seconds:.0f} |"
            )
            print(rows[-1], flush=True)
    print(
        f"\n| seed | reward first {k} | reward last {k} | rise | marker first {k} | marker last {k} "
        "| max KL | last KL | s |\n|---|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Issue 4: PPO's rise does not depend on a lucky seed. The setting of test_rlhf.py (RM, SFT policy,
PPO from it), in-process, on four more seeds; seed 42 runs as a trainer process in test_rlhf.py.

About 30 s on one core (RM and SFT ~10 s, each PPO run ~5 s). bench/ppo_seeds.py prints the table.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from tests.trainer.ppo_setting import PpoRun, run_ppo, train_rm_and_sft

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
SEEDS = (1, 3, 7, 1234)


@pytest.fixture(scope="module")
def seed_runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, PpoRun]:
    folder = tmp_path_factory.mktemp("ppo-seeds")
    with contextlib.redirect_stdout(io.StringIO()):
        train_rm_and_sft(folder / "storage", tiny_model_dir, folder / "work")
        return {
            seed: run_ppo(folder / "storage", tiny_model_dir, folder / f"ppo-{seed}", seed=seed)
            for seed in SEEDS
        }


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_rise_holds_on_every_seed(seed_runs: dict[int, PpoRun], seed: int) -> None:
    run = seed_runs[seed]
    kls = [round(k, 1) for k in run.kls]
    print(f"seed {seed}: rise {run.rise():+.2f}, marker {run.marker_rates}, kl {kls}")
    assert len(run.rewards) == 12
    # The margins of test_rlhf.py. On 13 seeds: rise +3.3 to +6.8, marker rate +0.33 to +0.80,
    # KL per answer at most 4.4 (bench/ppo_seeds.py).
    assert run.rise() >= 2.0, run.rewards
    assert run.marker_rise() >= 0.2, run.marker_rates
    assert all(abs(kl) < 20 for kl in run.kls), run.kls

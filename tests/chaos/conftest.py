"""One service for the module's chaos runs: its parts as separate processes, all stopped at the
end whatever happened (trainers included)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.cluster import Cluster
from tests.chaos.harness import Chaos
from tests.conftest import ADMIN_KEY

DATA = Path(__file__).resolve().parents[2] / "examples" / "demo_chat.jsonl"


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    root = tmp_path_factory.mktemp("chaos")
    cluster = Cluster(root, root / "models", ADMIN_KEY)
    harness = None
    try:
        cluster.start_all()
        harness = Chaos(cluster, DATA.read_bytes(), deadline_s=300, upload_bytes=2 << 20)
        yield harness
    finally:
        if harness is not None:
            harness.close()
        cluster.close()
        assert cluster.trainer_groups() == [], "a trainer outlived the chaos service"

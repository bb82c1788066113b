"""Print what the fuzzers ran, once, at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fuzz.stats import STATS


@pytest.fixture(scope="session", autouse=True)
def fuzz_summary() -> Iterator[None]:
    yield
    STATS.dump()

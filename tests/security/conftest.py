"""The security suite runs on the same real app as tests/api (SQLite and PostgreSQL, real Redis)."""

from tests.api.conftest import api, live_url, other_key  # noqa: F401 - fixtures, re-exported
from tests.e2e.conftest import models_cache  # noqa: F401 - the tiny model, built once per session

"""``python -m tuneforge_scheduler``: the scheduler alone (arq worker + reconcile), for
deployments where the API runs in its own pods (the Helm chart)."""

from __future__ import annotations

import logging

from tuneforge_api.settings import load_settings
from tuneforge_scheduler.settings import SchedulerSettings
from tuneforge_scheduler.worker import build_worker


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("arq").setLevel(logging.WARNING)  # one line per cron tick otherwise
    # The health-check key lets a liveness probe see that the worker still polls Redis.
    build_worker(load_settings(SchedulerSettings), health_check_interval=10).run()


if __name__ == "__main__":
    main()

"""A stand-in trainer for executor-level tests, where the real one's seconds of imports buy nothing."""

from __future__ import annotations

import sys
from pathlib import Path

from tuneforge.types import JobSpec, Method, MethodType

# A stand-in trainer that lives until it is killed ("--spec <path>" is appended and ignored).
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def spec() -> JobSpec:
    return JobSpec(
        job_id="ftjob-crashwindow",
        project_id="proj-x",
        attempt=1,
        base_model="tuneforge/tiny-llama",
        method=Method.model_validate({"type": MethodType.supervised, "supervised": {}}),
        lora={},
        training_file_key="projects/proj-x/files/file-x",
        storage_uri="file:///nonexistent",
        api_base_url="http://127.0.0.1:9",
    )


def groups_running(name: str) -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and name.encode() in (proc / "cmdline").read_bytes():
                stat = (proc / "stat").read_text().rsplit(")", 1)[-1].split()
                if stat[0] != "Z" and int(stat[2]) > 1:  # never group 0 (ours) or 1 (everyone)
                    found.add(int(stat[2]))
        except OSError:
            continue
    return found

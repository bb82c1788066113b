"""`pip install ./sdk` into an empty venv gives a working `tuneforge` without server deps."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

SDK = Path(__file__).resolve().parents[2] / "sdk"
CHECK = """
import sys, importlib.util
import tuneforge
from tuneforge import Client, JobSpec, NotFoundError
from tuneforge.storage import open_storage
heavy = [m for m in ("torch", "fastapi", "sqlalchemy", "boto3", "transformers")
         if importlib.util.find_spec(m)]
assert not heavy, f"installed with the SDK: {heavy}"
assert not [m for m in ("torch", "fastapi", "sqlalchemy") if m in sys.modules]
print("ok", tuneforge.__version__)
"""


def test_sdk_installs_and_imports_alone(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(SDK)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    result = subprocess.run([py, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
    help_text = subprocess.run([env_dir / "bin" / "tuneforge", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "jobs" in help_text.stdout
    assert sys.executable  # the test venv itself is untouched

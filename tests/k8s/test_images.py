"""STATIC checks of the two Dockerfiles. No image is built here (no Docker daemon can run on
these machines), so these tests read the Dockerfiles' instructions and check what can be
checked without building: bases pinned by tag, a non-root user, the entrypoint module exists,
HF_HUB_OFFLINE, no torch in the control plane, and version pins equal to constraints.txt."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
TRAINER = ROOT / "trainer_image" / "Dockerfile"
CONTROL_PLANE = ROOT / "api" / "Dockerfile"
TRAINING_STACK = {"torch", "transformers", "peft", "trl", "bitsandbytes", "deepspeed", "flash-attn"}
PIN = re.compile(r"(?<![\w./-])([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+-]*)")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            result.append((op.upper(), args.strip()))
    return result


def args_of(path: Path, op: str) -> list[str]:
    return [args for o, args in instructions(path) if o == op]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("#")[0].strip().split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def pins_in(path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for run in args_of(path, "RUN"):
        for name, version in PIN.findall(run):
            found[name.lower().replace("_", "-")] = version
    return found


@pytest.mark.parametrize("dockerfile", [TRAINER, CONTROL_PLANE], ids=["trainer", "control-plane"])
def test_bases_are_pinned_by_tag(dockerfile: Path) -> None:
    for base in args_of(dockerfile, "FROM"):
        image = base.split()[0]
        assert ":" in image and not image.endswith(":latest"), image


@pytest.mark.parametrize("dockerfile", [TRAINER, CONTROL_PLANE], ids=["trainer", "control-plane"])
def test_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    users = args_of(dockerfile, "USER")
    assert users, "no USER instruction: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric uid lets Kubernetes' runAsNonRoot verify it"
    # The last USER comes after the last RUN, so nothing installed later runs as root.
    ops = [op for op, _ in instructions(dockerfile)]
    assert len(ops) - 1 - ops[::-1].index("USER") > len(ops) - 1 - ops[::-1].index("RUN")


@pytest.mark.parametrize("dockerfile", [TRAINER, CONTROL_PLANE], ids=["trainer", "control-plane"])
def test_pins_match_constraints(dockerfile: Path) -> None:
    project = constraints()
    for name, version in pins_in(dockerfile).items():
        if name in project:
            assert version == project[name], (
                f"{dockerfile.name}: {name}=={version}, constraints.txt has {project[name]}"
            )
    # Every install is constrained by the project's pins (torch itself comes pinned from its index).
    for run in args_of(dockerfile, "RUN"):
        for command in run.split("&&"):
            if "pip install" in command:
                assert "-c /tmp/constraints.txt" in command or "torch==2.13.0" in command, command


def test_trainer_image_has_the_training_stack_pinned() -> None:
    pinned = pins_in(TRAINER)
    assert TRAINING_STACK <= pinned.keys(), TRAINING_STACK - pinned.keys()
    base = args_of(TRAINER, "FROM")[-1]
    assert base.startswith("nvidia/cuda:") and "runtime" in base  # the runtime stage is a CUDA runtime


def test_trainer_image_is_offline_by_default_and_runs_the_trainer() -> None:
    env = " ".join(args_of(TRAINER, "ENV"))
    assert "HF_HUB_OFFLINE=${HF_HUB_OFFLINE}" in env
    assert "HF_HUB_OFFLINE=1" in args_of(TRAINER, "ARG")
    assert args_of(TRAINER, "ENTRYPOINT") == ['["python", "-m", "tuneforge_trainer"]']
    assert (ROOT / "trainer_image" / "tuneforge_trainer" / "__main__.py").is_file()
    copies = " ".join(args_of(TRAINER, "COPY"))
    assert "trainer_image" in copies and "sdk" in copies
    assert not re.search(r"\b(fastapi|uvicorn|tuneforge_api|/src/api|/src/scheduler)\b", TRAINER.read_text())


def test_control_plane_image_has_no_torch() -> None:
    runs = " ".join(args_of(CONTROL_PLANE, "RUN"))
    installed = re.findall(r'"?/src/(\w+)', runs)
    assert set(installed) == {"sdk", "api", "scheduler"}
    for stack in TRAINING_STACK | {"trainer_image", "accelerate"}:
        assert not re.search(rf"(?<![\w-]){re.escape(stack)}(?![\w-])", runs.replace('import torch"', "")), (
            stack
        )
    # Nor transitively: what the three packages depend on (the kubernetes extra included).
    for package in ("sdk", "api", "scheduler"):
        project = tomllib.loads((ROOT / package / "pyproject.toml").read_text())["project"]
        deps = project["dependencies"] + sum(project.get("optional-dependencies", {}).values(), [])
        assert not [d for d in deps if re.match(r"(torch|transformers|trl|peft|deepspeed)\b", d)], package


def test_control_plane_commands_exist() -> None:
    cmd = args_of(CONTROL_PLANE, "CMD")[-1]
    assert "tuneforge_api.app:create_app" in cmd and "--factory" in cmd
    assert (ROOT / "api" / "tuneforge_api" / "app.py").is_file()


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"**/.venv", ".git", "tests"} <= set(ignored)


def test_control_plane_image_builds_the_c_line_scanner() -> None:
    """The scanner is optional at install (setup.py), so the image checks its import: otherwise
    a missing compiler would pass silently and validation would be ~5x slower."""
    runs = " ".join(args_of(CONTROL_PLANE, "RUN"))
    install = runs.index("pip install")
    assert runs.index("apt-get install") < install and "gcc" in runs
    assert runs.index("import tuneforge_api.validation._linescan") > install
    assert runs.index("apt-get purge") > runs.index("import tuneforge_api.validation._linescan")
    assert "tuneforge_api/validation/native/linescan.c" in (ROOT / "api" / "setup.py").read_text()

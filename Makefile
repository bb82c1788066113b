# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.tuneforge-installed
PACKAGES := sdk/pyproject.toml api/pyproject.toml scheduler/pyproject.toml trainer_image/pyproject.toml
# Compiled DeepSpeed/torch extensions are cached here, once per machine.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): $(PACKAGES) constraints.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# torch is pinned in the same command: unpinned, trl/peft would pull a multi-GB CUDA build.
	$(PIP) install --quiet -c constraints.txt torch==2.13.0 \
		-e './sdk[cli,s3]' -e './api[tokens]' -e './scheduler[kubernetes]' -e './trainer_image[qlora,deepspeed]' -r requirements-dev.txt
	@touch $(STAMP)

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) bench/control_plane.py

clean:
	rm -rf $(VENV) .cache .tuneforge-demo

# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.tuneforge-installed
PACKAGES := sdk/pyproject.toml api/pyproject.toml scheduler/pyproject.toml trainer_image/pyproject.toml
# The API's C line scanner is built by the install: a change to it reinstalls.
NATIVE := api/setup.py $(wildcard api/tuneforge_api/validation/native/*)
# Compiled DeepSpeed/torch extensions are cached here, once per machine.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test lint format bench chaos fuzz clean

install: $(STAMP)

$(STAMP): $(PACKAGES) $(NATIVE) constraints.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@# torch is pinned in the same command: unpinned, trl/peft would pull a multi-GB CUDA build.
	$(PIP) install --quiet -c constraints.txt torch==2.13.0 \
		-e './sdk[cli,s3]' -e './api[tokens]' -e './scheduler[kubernetes]' -e './trainer_image[qlora,deepspeed]' -r requirements-dev.txt
	@touch $(STAMP)

demo: install
	$(PY) examples/demo.py

# Two workers, one test file each at a time: most slow tests wait on a trainer subprocess or a
# browser, so two overlap well even on two cores. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The fuzzers of tests/fuzz with a larger budget than CI's (examples per operation / property).
FUZZ_EXAMPLES ?= 200
fuzz: install
	@mkdir -p .cache
	TUNEFORGE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) TUNEFORGE_FUZZ_REPORT=$(CURDIR)/.cache/fuzz-report.json \
		$(PY) -m pytest tests/fuzz -p no:cacheprovider -s -q

bench: install
	$(PY) bench/control_plane.py

# Kill parts of the real service N times (seeded) and print a summary table: make chaos N=200
N ?= 30
chaos: install
	OMP_NUM_THREADS=1 $(PY) bench/chaos.py --runs $(N)

clean:
	rm -rf $(VENV) .cache .tuneforge-demo

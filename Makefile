# The README's two commands: `make demo` (the quickstart study) and `make test` (the test suite).
# Both create .venv and install the pinned set (requirements.lock) when pyproject.toml or the lock
# changed; the second run is fast.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint bench figure clean gpu-check

setup: $(STAMP)

# pip's and the build backend's chatter goes to .venv/install.log, shown only when the install fails.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned set into $(VENV) (log: $(VENV)/install.log)"
	@{ $(PY) -m pip install --upgrade pip && $(PY) -m pip install -c requirements.lock -e '.[test,bench]'; } \
		> $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/memlayers study run studies/quickstart.yaml

test: $(STAMP)
	$(PY) tests/run_suite.py -q tests

# The edit-test loop: everything but the tests that start Ray, drive Chromium or run a study.
test-fast: $(STAMP)
	$(PY) tests/run_suite.py -q tests -m "not ray and not browser and not slow"

# Lint (rules in pyproject.toml [tool.ruff]); CI runs it after the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/memlayers bench memory
	$(VENV)/bin/memlayers bench fit
	$(VENV)/bin/memlayers bench train

# On a CUDA machine: Triton kernels vs torch, bag bandwidth, bf16 steps, FSDP x memory parallel, decode (one JSON).
gpu-check: $(STAMP)
	$(VENV)/bin/memlayers bench gpu

figure: $(STAMP)
	$(VENV)/bin/memlayers report runs/quickstart/ --figure docs/headline.png

clean:
	rm -rf $(VENV) runs build *.egg-info

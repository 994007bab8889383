# pscnn: every target sets itself up from pyproject.toml on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The build machines keep MNIST next to the project; elsewhere it is downloaded once.
MNIST_DIR ?= $(if $(wildcard ../shared/mnist/train-images-idx3-ubyte.gz),$(abspath ../shared/mnist),)
export MNIST_DIR

# Re-install only when pyproject.toml changed since the last install, or when $(VENV) no
# longer works, whatever its stamp says: its python was removed or upgraded away, it is from a
# Python older than pyproject.toml's requires-python (3.10), or its creation was interrupted
# (no pip). Such a $(VENV) is made again from scratch.
VENV_WORKS = "$(PY)" -c "import sys, pip; sys.exit(sys.version_info < (3, 10))" >/dev/null 2>&1
$(VENV)/.installed: pyproject.toml $(if $(shell $(VENV_WORKS) && echo yes),,FORCE)
	@$(VENV_WORKS) || { \
		if [ -e "$(VENV)" ] && [ ! -f "$(VENV)/pyvenv.cfg" ]; then \
			echo "make: $(VENV) is not a virtual environment: remove it or set VENV=..." >&2; exit 1; fi; \
		echo "making $(VENV) with $(PYTHON)"; rm -rf "$(VENV)"; \
		$(PYTHON) -m venv "$(VENV)" && $(VENV_WORKS) || { rm -rf "$(VENV)"; \
			echo "make: $(PYTHON) made no working $(VENV): pscnn needs Python >= 3.10 with venv and pip (set PYTHON=...)" >&2; \
			exit 1; }; }
	"$(PY)" -m pip install -q --upgrade pip
	"$(PY)" -m pip install -q -e '.[test,plot]'
	touch "$@"

.PHONY: venv torch-reference run test test-fast bench compose-test clean FORCE
FORCE:
venv: $(VENV)/.installed

# PyTorch 2.13 CPU is a reference for cross-check tests and benchmarks, never a run-time
# dependency. It is installed only from the wheel the build machines keep on local disk
# (any other torch download is gigabytes); without it those tests skip.
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))
torch-reference: venv
ifneq ($(TORCH_WHEEL),)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_WHEEL)" \
		|| echo "torch reference not installed: its cross-checks will be skipped"
else
	@echo "no local torch 2.13.0 CPU wheel: torch cross-checks and comparisons will be skipped"
endif

# The main job: a single-machine distributed run (server + 2 workers + evaluator).
run: venv
	$(VENV)/bin/pscnn run --workers 2 --mode sync --epochs 3 --out runs/make-run

# The tests that need MNIST read $(MNIST_DIR); without one they use a copy downloaded once
# into the cache (`pscnn download`). Where that fails (no network) they skip and say so.
WITH_MNIST = MNIST_DIR="$${MNIST_DIR:-$$($(VENV)/bin/pscnn download)}"

test: venv torch-reference
	$(WITH_MNIST) $(PY) -m pytest -q

test-fast: venv
	$(WITH_MNIST) $(PY) -m pytest -q -m "not slow"

# torch 2.13.0 (CPU) is only a reference for benchmarks; it lies on local disk here.
bench: venv torch-reference
	$(PY) benchmarks/bench_engine.py

compose-test:
	bash tests/compose/run_compose_test.sh

# Everything make, pip and the tests generate here (.gitignore's list): the venv, run folders, build
# outputs and caches. Never MNIST (MNIST_DIR and the download cache lie outside the project).
clean:
	rm -rf $(VENV) runs build dist .pytest_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

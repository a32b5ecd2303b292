# `make demo` and `make test` are all a newcomer needs; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flowsort-installed
# Pinned: an unpinned torch resolves to the multi-GB CUDA build.
TORCH := torch==2.13.0
DEMO_DIR ?= demo-output
DEMO_ARGS ?=

.PHONY: setup test demo clean gpu-check gpu-bundle gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[cpu,train,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/flowsort demo --out $(DEMO_DIR) $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache

# The GPU proof (docs/benchmarks.md): the machine's own Python (torch preinstalled there, no network), runtime
# packages it lacks installed from wheels carried in .whl/ (`make gpu-wheels` on a networked machine), and the
# full-width bundle carried in .gpu-bundle/ (`make gpu-bundle` here) where the trainer's packages are absent.
# `make gpu-check DRY_RUN=1` runs the same script on the CPU at tiny sizes.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_OUT ?= $(if $(OUT),$(OUT),runs/bench/gpu)
GPU_BUNDLE ?= $(if $(DRY_RUN),,$(wildcard .gpu-bundle/bundle))
GPU_PY_VERSION ?= 3.12

gpu-check:
	@missing="$$(PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m bench.gpu_check)"; \
	if [ -n "$$missing" ] && [ -d .whl ]; then \
		echo "installing $$missing from .whl/"; \
		$(GPU_PYTHON) -m pip install --quiet --no-index --find-links .whl $$missing \
		|| $(GPU_PYTHON) -m pip install --quiet --no-index --find-links .whl --break-system-packages $$missing \
		|| echo "could not install $$missing from .whl/: the phases that need them will fail"; \
	elif [ -n "$$missing" ]; then \
		echo "missing $$missing and no .whl/ to install them from: the phases that need them will fail"; \
	fi
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m flowsort bench gpu --out $(GPU_OUT) $(if $(DRY_RUN),--dry-run) \
		$(if $(GPU_BUNDLE),--bundle $(GPU_BUNDLE))

gpu-bundle: $(STAMP)
	$(BIN)/python -m flowsort bench gpu --phases model --budget 7200 --out .gpu-bundle

gpu-wheels:
	$(PYTHON) -m pip download --dest .whl --only-binary=:all: --python-version $(GPU_PY_VERSION) \
		--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		pyzmq msgpack prometheus-client tqdm matplotlib

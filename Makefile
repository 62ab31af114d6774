# attnkit: `make test` and `make bench` set up .venv on first use, then run.
#
#   make test        every CPU test (Triton kernels under TRITON_INTERPRET=1)
#   make bench       the benchmark suite vs PyTorch on whatever device is here
#                    (python -m attnkit.bench; BENCH_ARGS="--full --only rnn")
#   make cuda-check  build attnkit._C_cuda (needs nvcc, not a GPU) and import it
#   make test-gpu    the GPU suite, in the given Python: make test-gpu PYTHON=python3
#                    (installs nothing from the network: for machines without one)
#   make test-asan   attnkit._C built with ASan + UBSan into build/asan (the
#                    in-place extension untouched), the C++-backed tests under it
#   make gpu-check   on a GPU machine, in the given Python: build, GPU suite, full
#                    GPU benchmarks, one report in bench-results/gpu-report.md

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
# One architecture keeps local and CI builds short; a plain `pip install`
# outside make compiles for the broader default list in setup.py.
export TORCH_CUDA_ARCH_LIST ?= 9.0
# One compile job per core: 2 on the CI machine, 16 on the lent GPU machine
# (a fixed 2 left 14 of its 16 cores idle in gpu-check's CUDA build).
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST_ARGS ?=

NATIVE_SOURCES := setup.py pyproject.toml $(wildcard csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh csrc/*/*.h csrc/include/attnkit/*.h)
STAMP := $(VENV)/.attnkit-installed

.PHONY: test test-asan bench cuda-check test-gpu gpu-check setup build clean

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip "setuptools>=77" wheel ninja pybind11
	$(VPY) -m pip install "$(TORCH_SPEC)"

# Reinstalled when a native source changes, so the extensions are rebuilt.
$(STAMP): $(VENV)/bin/python $(NATIVE_SOURCES)
	$(VPY) -m pip install --no-build-isolation -e ".[test,bench]"
	touch $@

# Incremental in-place rebuild of the extensions while developing (ninja).
build: $(STAMP)
	$(VPY) setup.py -q build_ext --inplace

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -m "not gpu and not cuda_build" tests $(PYTEST_ARGS)

# Python is not built with ASan, so the runtime is preloaded; leak checking is off
# (the interpreter itself leaks by design); any UBSan report stops the run.
ASAN_DIR ?= build/asan
# Without TRITON_INTERPRET the Triton cases skip: only the C++ kernels run here.
ASAN_TESTS ?= tests/ops/test_attention.py tests/ops/test_attention_cpu.py tests/ops/test_attention_cpu_rotary.py \
	tests/ops/test_attention_cpu_few_queries.py \
	tests/ops/test_attention_features.py tests/ops/test_attention_decode.py tests/ops/test_rnn.py tests/ops/test_rotary.py \
	tests/ops/test_additive_attention.py tests/ops/test_linear.py tests/ops/test_rnn_fused.py \
	tests/ops/test_lstm_cell.py tests/ops/test_lstm_cell_registration.py tests/ops/test_rnn_layernorm.py \
	tests/ops/test_rnn_empty_input.py tests/test_fuzz_inputs.py tests/test_threads.py tests/test_openmp_teams.py
SANITIZER_ENV = LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

test-asan: $(STAMP)
	$(SANITIZER_ENV) $(VPY) tests/sanitize/build.py $(ASAN_DIR)
	$(SANITIZER_ENV) ATTNKIT_EXTENSION_DIR=$(ASAN_DIR) ATTNKIT_FUZZ_BACKENDS=cpp \
		$(VPY) -m pytest -m "not gpu and not cuda_build" $(ASAN_TESTS) $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) -m attnkit.bench $(BENCH_ARGS)

# The setup's install already builds attnkit._C_cuda where nvcc is found (recording, not
# raising, a failure): rebuilt here, with failure fatal, only when that one does not import
# (the same sources: the stamp reinstalls on any change). Saves CI a second full build.
cuda-check: $(STAMP)
	$(VPY) -c "import attnkit._C_cuda" 2>/dev/null || \
		ATTNKIT_REQUIRE_CUDA=1 $(VPY) -m pip install --no-build-isolation --no-deps -e .
	$(VPY) -c "import attnkit._C_cuda as m; print('attnkit._C_cuda imports:', m.__file__)"
	$(VPY) -m pytest -m cuda_build tests $(PYTEST_ARGS)

test-gpu:
	$(PYTHON) -m pytest -m "gpu or cuda_build" tests $(PYTEST_ARGS)

# Installs attnkit's Python package into PYTHON first when it is missing there
# (no network needed, nothing compiled); gpu_check then builds the extensions
# once, with the CUDA one required, for the GPU present.
gpu-check:
	$(PYTHON) -c "import attnkit.bench" 2>/dev/null || \
		ATTNKIT_NO_EXTENSIONS=1 $(PYTHON) -m pip install --no-build-isolation --no-deps -e .
	$(PYTHON) -m attnkit.bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist python/*.egg-info python/attnkit/*.so python/attnkit/_build_info.json $(STAMP)

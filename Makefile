# tyingrun: make demo | make test | make test-fast | make lint | make ablations
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Set to a wheel index (e.g. https://download.pytorch.org/whl/cpu) to choose where the CPU build comes from.
TORCH_INDEX ?=
HAS_NVIDIA_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled

# make ablations [SCALE=cpu|paper|learn|recursive|reasoning|loops] [SEEDS=0,1,2] [JOBS=n] [STEPS=n] [ABLATION_ARGS="key=value ..."]
SCALE ?= cpu
SEEDS ?=
JOBS ?=
STEPS ?=
ABLATION_ARGS ?=

.PHONY: install demo test test-fast test-all lint bench gpu-wheels gpu-check ablations clean

install: $(VENV)/.installed

# A plain `torch` requirement pulls a ~5.5 GB CUDA build; without an NVIDIA GPU install the CPU build first.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
ifneq ($(HAS_NVIDIA_GPU),yes)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(OFFLINE) $(VENV)/bin/tyingrun model=gpt2 dataset=pydoc policy=cyclic hardware=cpu

# One test process per core (TEST_WORKERS=n to choose), each on one thread: a second process gains far more than
# a second thread on small models. Tests marked `cli` start fresh interpreters (the tyingrun command, torchrun):
# they check the exit status, the one stderr line and the files a real process leaves. torch.compile tests cost
# ~30 s of compilation each on a cold cache: test-all includes them.
TEST_WORKERS ?= auto
PYTEST := $(OFFLINE) OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS)

test: install
	$(PYTEST) -m "not compile" --durations=15

# The inner loop (under a minute on 2 cores): in-process only, no tests that start interpreters (cli) or train for
# seconds or more (slow).
test-fast: install
	$(PYTEST) -m "not slow and not compile and not cli"

test-all: install
	$(PYTEST)

# Loop overhead, memory against the physical limit, frozen_copy speed-up, dynamic_q's decision cost, tokens/s
# (MFU on a GPU) -> benchmarks/results.json. BENCH_ARGS="--n-layer 48 --d-model 1600 ..." for other sizes.
bench: install
	$(OFFLINE) $(PY) benchmarks/bench.py $(BENCH_ARGS)

# On a lent CUDA machine (docs/gpu.md): CUDA-only tests, a short bf16 run per model family under none, cyclic and
# dynamic_q, GPT-2 124M tokens/s and MFU (eager, compiled, dynamic_q K=4), recompiles, peak memory against CUDA's
# allocator, 2-GPU parity -> benchmarks/gpu_check.json, in about 5 minutes on one H100/H200. No venv: the machine's
# own python with torch; what it lacks (hydra-core, omegaconf, datasets) comes from the wheels in WHEELS, which
# `make gpu-wheels` downloads here, installed with tyingrun itself into GPU_SITE.
GPU_PYTHON ?= python3
WHEELS ?= .whl
GPU_SITE ?= .gpu-site
GPU_CHECK_ARGS ?=
# The GPU machine's Python, and the packages it lacks (pinned where its other packages need an older version).
GPU_PYTHON_VERSION ?= 3.12
GPU_WHEEL_PACKAGES := hydra-core 'omegaconf<2.4' datasets 'dill<0.4.2' 'multiprocess<0.70.20'

# Here, with PyPI: binary wheels for GPU_PYTHON_VERSION, and omegaconf's parser runtime (published as source only)
# built into a pure-Python wheel.
gpu-wheels: install
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d $(WHEELS) \
		$(GPU_WHEEL_PACKAGES)
	$(PY) -m pip wheel -q --no-deps -w $(WHEELS) 'antlr4-python3-runtime==4.9.3'

gpu-check:
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
		--target $(GPU_SITE) $(wildcard $(WHEELS)/*.whl) .
	$(OFFLINE) PYTHONPATH=$(abspath $(GPU_SITE)) PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# ruff, then mypy: no error in tying, models, policies, metrics and contracts, none beyond tools/mypy-baseline.txt
# elsewhere (tools/typecheck.py --update drops the lines of fixed errors).
lint: install
	$(VENV)/bin/ruff check tyingrun tests tools
	$(PY) tools/typecheck.py

# docs/studies.md#ablations over SEEDS (default 0,1,2; recursive: 0,1), then report.md/report.csv/figures, under
# outputs/ablations/<scale>-<date>_<time>. The cpu, learn, recursive, reasoning and loops scales need no network; the
# paper scale downloads WikiText-2 and wants GPUs. SCALE=learn is the learning study (docs/studies.md#the-learning-study),
# SCALE=recursive the conversion study (docs/studies.md#the-conversion-study), SCALE=reasoning the looped-depth study
# on generated reasoning tasks (docs/studies.md#the-reasoning-study), SCALE=loops what one loop is worth: untied depths
# beside policy=looped arms evaluated at several loop counts, on p-hop and pydoc (docs/studies.md#the-loops-study).
ablations: install
	$(if $(filter cpu learn recursive reasoning loops,$(SCALE)),$(OFFLINE)) $(PY) -m tyingrun.ablations --scale $(SCALE) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(JOBS),--jobs $(JOBS)) \
		$(if $(STEPS),train.max_steps=$(STEPS)) $(ABLATION_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# tyingrun: make demo | make test | make lint
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Set to a wheel index (e.g. https://download.pytorch.org/whl/cpu) to choose where the CPU build comes from.
TORCH_INDEX ?=
HAS_NVIDIA_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled

.PHONY: install demo test lint clean

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

test: install
	$(OFFLINE) $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check tyingrun tests

clean:
	rm -rf $(VENV) build *.egg-info

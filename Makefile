# Two commands: `make demo` and `make test`. Each sets up what is missing (.venv, torch, the package).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU wheel of torch 2.13.0 lies on disk on our machines; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo demo-quick test test-compat lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/jointdlm demo --workdir runs/demo

demo-quick: $(STAMP)
	$(VENV)/bin/jointdlm demo --quick --workdir runs/demo-quick

test: $(STAMP)
	$(PY) -m pytest -q

# The oldest transformers we support (Dream's pin), beside the one the set-up installs: the Hugging Face tests again.
COMPAT := .compat/transformers-4.46
test-compat: $(STAMP)
	test -d $(COMPAT)/transformers || $(PY) -m pip install -q --no-deps --target $(COMPAT) \
		transformers==4.46.2 tokenizers==0.20.3 huggingface_hub==0.26.2
	PYTHONPATH=$(COMPAT) $(PY) -m pytest -q -p no:cacheprovider tests/test_hf.py tests/test_remote_code.py
	JOINTDLM_OTHER_TRANSFORMERS=$(CURDIR)/$(COMPAT) $(PY) -m pytest -q -p no:cacheprovider tests/test_remote_code.py \
		-k across_transformers_versions

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf runs .pytest_cache .compat

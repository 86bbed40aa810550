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

# The oldest transformers we support (Dream's pin) and the last 4.x (RND1's base, the first with the Qwen3-MoE
# modules its code imports), beside the 5.x the set-up installs: the Hugging Face tests again under each.
COMPAT := .compat/transformers-4.46
COMPAT_457 := .compat/transformers-4.57
test-compat: $(STAMP)
	test -d $(COMPAT)/transformers || $(PY) -m pip install -q --no-deps --target $(COMPAT) \
		transformers==4.46.2 tokenizers==0.20.3 huggingface_hub==0.26.2
	test -d $(COMPAT_457)/transformers || $(PY) -m pip install -q --no-deps --target $(COMPAT_457) \
		transformers==4.57.1 tokenizers==0.22.1 huggingface_hub==0.35.3
	for dir in $(COMPAT) $(COMPAT_457); do \
		PYTHONPATH=$$dir $(PY) -m pytest -q -p no:cacheprovider tests/test_hf.py tests/test_remote_code.py || exit 1; \
		JOINTDLM_OTHER_TRANSFORMERS=$(CURDIR)/$$dir $(PY) -m pytest -q -p no:cacheprovider \
			tests/test_remote_code.py -k across_transformers_versions || exit 1; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf runs .pytest_cache .compat

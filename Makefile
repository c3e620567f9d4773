# moe-vision: `make demo` (set up + main job), `make test` (set up + test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow benchmark install clean

# PIP_FIND_LINKS is cleared so pip resolves torch together with torchvision from the registry
# instead of taking a local CPU-only torch wheel that no torchvision wheel is built against.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PIP_FIND_LINKS= $(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

benchmark: $(STAMP)
	$(PY) tools/benchmark.py --json benchmark.json

# Until the training job lands, the demo benchmarks the MoE layer and runs the backbone.
demo: $(STAMP)
	$(PY) tools/benchmark.py --cases a b --repeats 5 --json benchmark.json
	$(PY) tools/inspect_model.py

clean:
	rm -rf $(VENV) .pytest_cache benchmark.json

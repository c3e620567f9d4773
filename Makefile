# moe-vision: `make demo` (set up + main job), `make test` (set up + test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo baselines test test-slow test-browser benchmark install clean

STAMP_NOW := $(shell date +%Y%m%d-%H%M%S)

# PIP_FIND_LINKS is cleared so pip resolves torch together with torchvision from the registry
# instead of taking a local CPU-only torch wheel that no torchvision wheel is built against.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PIP_FIND_LINKS= $(PY) -m pip install --quiet -e '.[dev,export,language,serve]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The serve page in headless Chromium (Debian's chromium + chromium-driver: installed here when
# missing and apt-get is usable); fails, never skips, if the browser cannot be had.
test-browser: $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; } || \
	  { echo "make test-browser needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"; exit 1; }
	PIP_FIND_LINKS= $(PY) -m pip install --quiet -e '.[browser]'
	$(PY) -m pytest -q -m browser; rc=$$?; if [ $$rc -eq 5 ]; then echo "no browser tests collected"; exit 1; fi; exit $$rc

benchmark: $(STAMP)
	$(PY) tools/benchmark.py --json benchmark.json

# The main job: generate the synthetic benchmark if missing, train the MoE generalist on
# cls + det + seg, evaluate, print the metrics table (about 11 minutes on 2 CPU cores).
demo: $(STAMP)
	$(PY) tools/make_synthetic.py
	$(PY) tools/train.py experiment=synthetic output_dir=runs/synthetic-$(STAMP_NOW)

# Dense single-task baselines of the same active compute, and the comparison table
# against the latest demo run (1200 steps each; at most ~20 minutes in all: 6.5-8 min per
# task measured with 1 thread on a busy machine).
baselines: $(STAMP)
	$(PY) tools/make_synthetic.py
	for t in cls det seg; do \
	  $(PY) tools/train.py experiment=synthetic_single_task single_task=$$t output_dir=runs/dense_$$t-$(STAMP_NOW) || exit 1; \
	done
	$(PY) tools/compare.py $$(ls -d runs/synthetic-* | tail -1) runs/dense_cls-$(STAMP_NOW) runs/dense_det-$(STAMP_NOW) runs/dense_seg-$(STAMP_NOW)

clean:
	rm -rf $(VENV) .pytest_cache benchmark.json  # runs/ and data/ are kept

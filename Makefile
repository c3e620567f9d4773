# moe-vision: `make demo` (set up + main job), `make test` (set up + test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo baselines downstream downstream-data test test-slow test-browser test-timm benchmark gpu-wheels gpu-check install clean

STAMP_NOW := $(shell date +%Y%m%d-%H%M%S)

# MKL's strict reproducible mode for every process started here (moe_vision sets it too when
# imported first; a value already in the environment wins): docs/exactness.md.
MKL_CBWR ?= AUTO,STRICT
export MKL_CBWR

# PIP_FIND_LINKS is cleared so pip resolves torch together with torchvision from the registry
# instead of taking a local CPU-only torch wheel that no torchvision wheel is built against.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PIP_FIND_LINKS= $(PY) -m pip install --quiet --quiet -e '.[dev,export,language,serve]'
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
	PIP_FIND_LINKS= $(PY) -m pip install --quiet --quiet -e '.[browser]'
	$(PY) -m pytest -q -m browser; rc=$$?; if [ $$rc -eq 5 ]; then echo "no browser tests collected"; exit 1; fi; exit $$rc

# timm's own model test-suite (tests/test_models.py of the installed timm's source release, from
# PyPI) run unchanged on the registered moe_vit models, moe_vision loaded first as a plugin.
# TorchScript is left out: torch deprecates it, and the MoE layers' routing is Python that it
# cannot compile (torch.export and ONNX are the supported graphs: docs/export.md).
TIMM_MODELS := moe_vit_nano_patch8 or moe_vit_tiny_patch8
test-timm: $(STAMP)
	@v=$$($(PY) -c "import timm; print(timm.__version__)"); d=.cache/timm-$$v; \
	if [ ! -f $$d/test_models.py ]; then \
	  rm -rf $$d.tmp && mkdir -p $$d.tmp && \
	  PIP_FIND_LINKS= $(PY) -m pip download --quiet --quiet --no-deps --no-binary :all: "timm==$$v" -d $$d.tmp && \
	  tar -xzf $$d.tmp/timm-$$v.tar.gz -C $$d.tmp "timm-$$v/tests/test_models.py" && \
	  mv $$d.tmp/timm-$$v/tests/test_models.py $$d.tmp/ && rm -rf $$d.tmp/timm-$$v $$d.tmp/*.tar.gz && mv $$d.tmp $$d; \
	fi; \
	cd $$d && $(CURDIR)/$(PY) -m pytest -q -p moe_vision -p no:cacheprovider -W ignore test_models.py \
	  -k "($(TIMM_MODELS)) and not torchscript"; rc=$$?; if [ $$rc -eq 5 ]; then echo "no timm tests collected"; exit 1; fi; exit $$rc

benchmark: $(STAMP)
	$(PY) tools/benchmark.py --json benchmark.json

# The GPU check runs on a bare GPU machine whose python3 has torch (and timm, scipy, pytest, ...)
# but no package registry: what it lacks travels as wheels in .whl/, which `make gpu-wheels`
# downloads here (CPython 3.12, manylinux x86_64; antlr4's runtime is built from its source).
GPU_PY      ?= 3.12
GPU_WHEELS  := hydra-core==1.3.8 omegaconf==2.3.1 pycocotools==2.0.11
GPU_SOURCES := antlr4-python3-runtime==4.9.3
gpu-wheels: $(STAMP)
	mkdir -p .whl
	PIP_FIND_LINKS= $(PY) -m pip download --quiet --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	PIP_FIND_LINKS= $(PY) -m pip wheel --quiet --quiet --no-deps -w .whl $(GPU_SOURCES)

# On the GPU machine: the wheels of .whl/ (if any) into a private folder, then tools/gpu_check.py,
# which writes docs/results/gpu.md and gpu.json.
gpu-check:
	@if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/moe-site .whl/*.whl; fi
	PYTHONPATH=/tmp/moe-site:$(CURDIR) PYTHONUNBUFFERED=1 python3 tools/gpu_check.py

# The main job: generate the synthetic benchmark if missing, train the MoE generalist on
# cls + det + seg, evaluate, print the metrics table (time and machine: docs/results/demo.md).
# The run is runs/synthetic-s<SEED>-<stamp>; runs/synthetic points at the newest one.
# make demo SEED=1, make baselines SEED=1: another model initialisation and sampling order
SEED ?= 0

# $(call latest,RUN,LINK): point runs/LINK at runs/RUN, unless runs/LINK is a folder of its own.
latest = if [ -L runs/$(2) ] || [ ! -e runs/$(2) ]; then ln -sfn $(1) runs/$(2); \
	else echo "runs/$(2) is a folder of its own, left as it is; this run is runs/$(1)"; fi

demo: $(STAMP)
	$(PY) tools/make_synthetic.py
	$(PY) tools/train.py experiment=synthetic seed=$(SEED) output_dir=runs/synthetic-s$(SEED)-$(STAMP_NOW)
	@$(call latest,synthetic-s$(SEED)-$(STAMP_NOW),synthetic)

# Dense single-task baselines of the same active compute, each trained at every learning rate of
# BASELINE_LRS (runs/dense_<task>-lr<lr>-s<SEED>-<stamp>); the best of each task on its validation
# split is the baseline (runs/dense_<task> points at it) in the comparison table against the newest
# demo run of the same seed (time and machine: docs/results/timing.md).
BASELINE_LRS ?= 2.5e-4 5e-4 1e-3

baselines: $(STAMP)
	@ls -d runs/synthetic-s$(SEED)-* >/dev/null 2>&1 || { echo "make baselines compares the dense models with the newest \
	demo run of seed $(SEED), and there is none: run make demo SEED=$(SEED) first"; exit 2; }
	$(PY) tools/make_synthetic.py
	for t in cls det seg; do for lr in $(BASELINE_LRS); do \
	  $(PY) tools/train.py experiment=synthetic_single_task single_task=$$t seed=$(SEED) train.lr=$$lr \
	    output_dir=runs/dense_$$t-lr$$lr-s$(SEED)-$(STAMP_NOW) || exit 1; \
	done; done
	$(PY) tools/compare.py $$(ls -d runs/synthetic-s$(SEED)-* | tail -1) runs/dense_*-s$(SEED)-$(STAMP_NOW) --link-best

# Real, annotated photographs that registry packages ship, into data/real/ (docs/downstream.md):
# Fashion-MNIST from Debian's dataset-fashion-mnist (apt-get download, nothing installed) with
# label budgets of DOWNSTREAM_LABELS training images, tree crowns from PyPI's deepforest wheel.
# DOWNSTREAM_FROM=DIR takes the package files from DIR instead of the registries.
DOWNSTREAM_LABELS ?= 600 6000
downstream-data: $(STAMP)
	$(PY) tools/downstream_data.py --labels $(DOWNSTREAM_LABELS) $(if $(DOWNSTREAM_FROM),--from $(DOWNSTREAM_FROM))

# The downstream benchmark (docs/downstream.md): every method on data/real/ from the newest demo
# run and best dense baseline of each seed, each run in runs/downstream/; rows in
# docs/results/downstream.json. DOWNSTREAM_ARGS passes options (e.g. --quick, --seeds 0).
downstream: downstream-data
	$(PY) tools/downstream.py $(DOWNSTREAM_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache benchmark.json  # runs/ and data/ are kept

# BoLID - one Makefile for set-up, data, training, evaluation and benchmarks.
# `make help` lists the targets. Variables can be overridden: `make shards IN=... OUT=...`.

VENV ?= .venv
PY := $(VENV)/bin/python
SYSTEM_PYTHON ?= python3
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Where the demo keeps its data; `make shards`/`make train` default to it.
DEMO_DIR ?= runs/demo

.DEFAULT_GOAL := help
.PHONY: help setup test lint format demo mini crawl shards train eval bench app browser check-real-size bench-gpu

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

setup:  ## create .venv, install torch if none is present, then bolid in editable mode with dev extras
	@if [ ! -x $(PY) ]; then \
	  if $(SYSTEM_PYTHON) -c "import torch, torchvision" 2>/dev/null; then \
	    echo "setup: keeping the system's torch $$($(SYSTEM_PYTHON) -c 'import torch; print(torch.__version__)')"; \
	    $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(SYSTEM_PYTHON) -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch, torchvision" 2>/dev/null || { \
	  echo "setup: installing $(TORCH_PINS)"; $(PY) -m pip install -q $(TORCH_PINS); }
	$(PY) -m pip install -q -e '.[dev]'
	@$(PY) -c "import torch, diffusers, transformers, lightning, open_clip, scrapy, webdataset; \
	  print(f'setup: ok (torch {torch.__version__}, cuda={torch.cuda.is_available()}, diffusers {diffusers.__version__}, transformers {transformers.__version__})')"
	@touch $(VENV)/.bolid-setup

demo:  ## the whole system offline on the tiny kit: demo site -> crawl -> shards -> train -> eval (DEMO_ARGS=--quick)
	@test -f $(VENV)/.bolid-setup || $(MAKE) setup
	$(PY) -m demo $(DEMO_ARGS)

mini:  ## BoLID-mini: render a world, shards, stage 1/2 + ablation, eval -> docs/mini (MINI_ARGS=--quick, resumable)
	@test -f $(VENV)/.bolid-setup || $(MAKE) setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m demo.mini $(MINI_ARGS)

app:  ## the generation web page on http://127.0.0.1:7860 (tiny kit, BlazePose; APP_ARGS=--components real ...)
	@test -f $(VENV)/.bolid-setup || $(MAKE) setup
	$(PY) -m bolid app $(or $(APP_ARGS),--components tiny --pose blazepose)

browser:  ## install Debian's headless Chromium for the browser test (needs root or sudo; skipped if present)
	@command -v chromium >/dev/null 2>&1 && echo "browser: $$(chromium --version 2>/dev/null || echo chromium) present" || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

test:  ## run the test suite (CPU only, tiny kit, offline)
	$(PY) -m pytest -q -m "not gpu"

lint:  ## ruff
	$(PY) -m ruff check .

format:  ## ruff format + autofix
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

crawl:  ## crawl ThePlace into OUT (configs/crawl/theplace.yaml); e.g. BASE_URL=http://127.0.0.1:8765 CRAWL_ARGS=--no-polite
	$(PY) -m crawler $(if $(OUT),--out $(OUT)) $(if $(PERSONS),--persons $(PERSONS)) \
	  $(if $(BASE_URL),--base-url $(BASE_URL)) $(CRAWL_ARGS)

shards:  ## build WebDataset shards: make shards IN=<crawl out or <identity>/ folder> OUT=<dir> [CONFIG=...]
	@test -n "$(IN)" -a -n "$(OUT)" || { echo "usage: make shards IN=... OUT=... [CONFIG=configs/shards/real.yaml]"; exit 2; }
	$(PY) -m datapipe build --config $(or $(CONFIG),configs/shards/real.yaml) --in $(IN) --out $(OUT) $(SHARDS_ARGS)

train:  ## train the adapter: make train [CONFIG=configs/fit/tiny.yaml] [SHARDS=$(DEMO_DIR)/shards] [TRAIN_ARGS=...]
	$(PY) -m bolid fit --config $(or $(CONFIG),configs/fit/tiny.yaml) --data.shards $(or $(SHARDS),$(DEMO_DIR)/shards) \
	  $(TRAIN_ARGS)

eval:  ## comparison table + figure: make eval [CONFIG=configs/eval/real.yaml]; the tiny default needs `make demo` first
	$(PY) -m bolid eval --config $(or $(CONFIG),configs/eval/tiny.yaml) $(EVAL_ARGS)

bench:  ## run every benchmark in bench/ and rewrite BENCHMARKS.md
	$(PY) -m bench.bench_adapter --write BENCHMARKS.md
	$(PY) -m bench.bench_datapipe --write BENCHMARKS.md
	$(PY) -m bench.bench_crawl --write BENCHMARKS.md
	$(PY) -m bench.bench_train_data --write BENCHMARKS.md
	$(PY) -m bench.bench_bodysim --write BENCHMARKS.md
	$(PY) -m bench.bench_executors --write BENCHMARKS.md

check-real-size:  ## real-size models, random weights, CPU: stage-1/2 steps, generate, annotate (needs 18 GB free)
	@avail=$$(free -g | awk '/^Mem:/ {print $$7}'); if [ "$$avail" -lt 18 ]; then \
	  echo "check-real-size: needs >= 18 GB available memory, free -g shows $$avail GB; try again later"; exit 1; fi
	@$(if $(filter command line,$(origin REAL_SIZE_STEPS)),,rm -f runs/real_size/figures.json;) status=0; \
	for step in $(REAL_SIZE_STEPS); do \
	  BOLID_REAL_SIZE=1 BOLID_REAL_SIZE_REPORT=BENCHMARKS.md nice -n 10 $(PY) -m pytest -p no:cacheprovider -q \
	    -m real_size "tests/test_real_size.py::$$step" $(PYTEST_ARGS) || status=1; \
	done; exit $$status
# Default: all four steps, a fresh figures table; REAL_SIZE_STEPS=... reruns some and keeps the others' figures.
REAL_SIZE_STEPS ?= test_stage1_training_step test_stage2_training_step test_generate_one_image \
	test_datapipe_annotate_batch

bench-gpu:  ## paper-scale GPU benchmark, random kit, <= 8 min: BENCHMARKS.md + runs/bench_gpu/ (SMOKE=1: tiny, CPU)
	$(PY) -m bench.bench_gpu $(if $(SMOKE),--smoke,--write BENCHMARKS.md) $(BENCH_GPU_ARGS)

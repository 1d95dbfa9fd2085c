# Thin wrappers over `python -m research.<module>`; each flag has the same name in MLproject.
# `make` alone lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOY_DATA := data/toy
TOY_CONFIG := research/configs/toy.json
TOY_STYLES := pastel,vivid,comic# data/toy's stand-ins for the seed's styles (plain is the base model's own look)
WOODCUT_DATA := data/woodcut# a look no toy component was trained on; outside data/toy, so Experiment I leaves it out

# Optional knobs, e.g. `make train STYLE_DIR=data/ghibli RANK=16`; ARGS passes anything else.
CONFIG ?=
FLAGS = $(if $(CONFIG),--config $(CONFIG)) $(if $(STYLE_DIR),--style-dir $(STYLE_DIR)) \
	$(if $(BASE_MODEL),--base-model $(BASE_MODEL)) $(if $(RANK),--rank $(RANK)) \
	$(if $(LORA_ALPHA),--lora-alpha $(LORA_ALPHA)) $(if $(STEPS),--max-train-steps $(STEPS)) \
	$(if $(LR),--learning-rate $(LR)) $(if $(EXPERIMENT),--experiment $(EXPERIMENT)) $(ARGS)

.PHONY: help setup quickstart test test-slow train sample evaluate compare styles search blend report study data data-woodcut toyworld ui bench clean clean-runs

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

setup: $(VENV)/.installed ## create .venv with the pinned requirements (a no-op once done)

$(TOY_DATA)/.done: $(VENV)/.installed research/toyworld/generate.py research/toyworld/scenes.py research/toyworld/styles.py research/toyworld/render.py
	$(PY) -m research.toyworld.generate --out $(TOY_DATA)
	touch $@

data: $(TOY_DATA)/.done ## generate the toy-world style folders (data/toy/<style>/)

# validation_prompts.txt is written last, inside a folder that is renamed into place whole: it marks a finished folder
$(WOODCUT_DATA)/validation_prompts.txt: $(VENV)/.installed research/toyworld/generate.py research/toyworld/scenes.py research/toyworld/styles.py research/toyworld/render.py research/toyworld/unseen.py
	$(PY) -m research.toyworld.generate --out $(dir $(WOODCUT_DATA)) --styles $(notdir $(WOODCUT_DATA))

data-woodcut: $(WOODCUT_DATA)/validation_prompts.txt ## a style folder in a look no toy component knows (data/woodcut/); then: make train CONFIG=research/configs/toy.json STYLE_DIR=data/woodcut

quickstart: setup data ## train a LoRA on the embedded toy default, sample, evaluate, print where to look
	$(PY) -m research.train --config $(TOY_CONFIG) $(ARGS)

test: setup ## run the fast test suite
	$(PY) -m pytest -q -m "not slow"

test-slow: setup ## run the slow learning checks (minutes)
	$(PY) -m pytest -q -m slow

train: setup ## train an adapter: STYLE_DIR=… BASE_MODEL=… RANK=… STEPS=… LR=… CONFIG=… ARGS="--flag v"
	$(PY) -m research.train $(FLAGS)

sample: setup ## sample a finished run again: RUN=runs/<experiment>/<run> [ARGS="--num-eval-images 16"]
	$(PY) -m research.sample --run-dir $(RUN) $(ARGS)

evaluate: setup ## evaluate a run: RUN=runs/<experiment>/<run> [ARGS="--num-images 256 --metrics clip_score,fid"]
	$(PY) -m research.evaluate --run-dir $(RUN) $(ARGS)

compare: setup ## Experiment III, LoRA vs TI vs DreamBooth on one budget: STYLE_DIR=… CONFIG=… STEPS=… METHODS=lora,dreambooth
	$(PY) -m research.compare $(FLAGS) $(if $(METHODS),--methods $(METHODS))

styles: setup $(if $(CONFIG)$(DATA_ROOT),,data) ## Experiment I, one LoRA per style folder + results table + style grid: DATA_ROOT=data/toy CONFIG=… STYLES=a,b
	$(PY) -m research.styles $(if $(CONFIG),,--config $(TOY_CONFIG)) $(FLAGS) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) \
		$(if $(STYLES),--styles $(STYLES),$(if $(DATA_ROOT),,--styles $(TOY_STYLES)))

search: setup $(if $(CONFIG),,data) ## Experiment II, Optuna (toy default): TRIALS=20 SAMPLER=tpe|random|grid|nsga2 OBJECTIVES=a,b WORKERS=2 STUDY=… ARGS="--storage postgresql://…"
	$(PY) -m research.search $(if $(CONFIG),,--config $(TOY_CONFIG)) $(FLAGS) $(if $(TRIALS),--n-trials $(TRIALS)) \
		$(if $(SAMPLER),--search-sampler $(SAMPLER)) $(if $(OBJECTIVES),--objectives $(OBJECTIVES)) \
		$(if $(WORKERS),--workers $(WORKERS)) $(if $(STUDY),--study-name $(STUDY))

blend: setup ## Experiment IV, blend two LoRA runs: A=runs/exp1/<a> B=runs/exp1/<b> [WEIGHTS=0,0.5,1] [EXPORT=0.5]
	$(PY) -m research.blend --adapter-a $(A) --adapter-b $(B) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(EXPORT),--export-weight $(EXPORT)) $(ARGS)

report: setup ## the study report from MLflow: reports/out/index.html, also a `report` run in MLflow [ARGS="--study-name s"]
	$(PY) reports/report.py $(ARGS)

study: setup data ## Experiments I-IV and the report on the embedded default (measured 26-43 min on 2 CPU cores) [ARGS="--force report"]
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m research.study $(ARGS)

toyworld: setup ## rebuild the toy world's weights; run it again after a stop and it resumes (TOY_DEVICE=cuda: ~15 min on an H100; 2 CPU cores: ~20 h, or ~2.5-3 h with ARGS="--recipe cpu", which does not make the shipped weights) [ARGS="--only vae" retrains a stage]
	$(PY) -m research.toyworld.pretrain --out research/toyworld/weights --device $(or $(TOY_DEVICE),cpu) $(ARGS)
	$(PY) -m research.toyworld.generate --out $(TOY_DATA)

ui: setup ## MLflow UI on http://127.0.0.1:5000 (HOST=0.0.0.0 to share)
	@echo "open http://$(or $(HOST),127.0.0.1):$(or $(PORT),5000)/#/experiments?workflowType=machine_learning and click 'Model training' at the top of the sidebar once: MLflow 3.17 starts in its GenAI view and the browser remembers the switch"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host $(or $(HOST),127.0.0.1) --port $(or $(PORT),5000)

bench: setup ## ours vs the plain loop, MFU, sampling/eval images/s, cost growth -> reports/bench/ (ARGS="--model sd15 --device cuda")
	$(PY) -m research.bench $(ARGS)

clean-runs: ## mark KILLED the MLflow runs and run folders left RUNNING by a process that is gone
	$(PY) -m research.tracking --output-dir runs

clean: ## remove caches and regenerable toy data (keeps runs/ and mlflow.db)
	rm -rf .pytest_cache $(TOY_DATA) $(WOODCUT_DATA)
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -exec rm -rf {} +

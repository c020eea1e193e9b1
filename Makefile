# Every tunable is `?=`: override on the command line, e.g. `make demo OUTPUT_DIR=/tmp/out`.
PYTHON ?= python3
VENV ?= .venv
# Extra pip arguments, e.g. PIP_EXTRA='--extra-index-url https://download.pytorch.org/whl/cpu' on a laptop
# without a GPU, so torch==2.13.0 resolves to the CPU build instead of the multi-GB CUDA one.
PIP_EXTRA ?=
OUTPUT_DIR ?= output
DEMO_DIR ?= .demo
# make demo-sft: where its model goes, and the signature it answers at the end.
SFT_OUTPUT_DIR ?= output-sft
SFT_PROMPT ?= def getsource(object):
# make demo-alpaca: the same, from Alpaca records.
ALPACA_OUTPUT_DIR ?= output-alpaca
# make demo-dpo: where its model goes.
DPO_OUTPUT_DIR ?= output-dpo
PYTEST_ARGS ?=
# make bench on CPU: a tiny GPT-2 (50,257-token vocabulary), 2 optimizer steps a side (4 x 8 x 512 tokens each),
# 128 validation lines, 3 runs a side; about 10 minutes on 2 cores. On a GPU: BENCH_ARGS='--size gpt2 --epochs 3'
# (the GPU defaults of python -m bench.compare).
BENCH_ARGS ?= --size tiny --max-steps 2 --valid-lines 128 --repeats 3
BENCH_DIR ?= .bench
# make faults: e.g. FAULTS_ARGS='--only lease --workdir .faults' to run some cases and keep their files.
FAULTS_ARGS ?=
# make bench-prepare-scale: corpus sizes (K, M, G) and tokenizing processes; the full run takes about 15 minutes
# on 2 free cores and needs about 7 GB of free disk under BENCH_DIR.
SCALE_SIZES ?= 256M,1G,4G
SCALE_WORKERS ?= 2

FINETUNE := $(VENV)/bin/finetune
VENV_STAMP := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help

##@ General

.PHONY: help
help: ## List the targets.
	@awk 'BEGIN {FS = ":.*##"} /^[a-zA-Z0-9_-]+:.*?##/ {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2} /^##@/ {printf "\n\033[1m%s\033[0m\n", substr($$0, 5)}' $(MAKEFILE_LIST)

##@ Development

.PHONY: install
install: $(VENV_STAMP) ## Create .venv with the project and the pinned dependencies (constraints.txt).

$(VENV_STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt $(PIP_EXTRA) -e '.[dev]'
	@touch $@

.PHONY: demo
demo: install ## Train a tiny model on the standard library's docstrings (CPU, about a minute) into ./output.
	$(FINETUNE) corpus --output-dir $(DEMO_DIR)/data
	$(FINETUNE) init-model --corpus $(DEMO_DIR)/data/train.txt --output-dir $(DEMO_DIR)/tiny-gpt2
	@# Prompts whose greedy completions the log shows before the first step and at every evaluation.
	printf '%s\n' 'Return the' 'If the argument is' 'This module provides' > $(DEMO_DIR)/prompts.txt
	$(FINETUNE) train --preset demo --model $(DEMO_DIR)/tiny-gpt2 --data-dir $(DEMO_DIR)/data \
		--output-dir $(OUTPUT_DIR) --cache-dir $(DEMO_DIR)/cache --sample-prompts $(DEMO_DIR)/prompts.txt
	$(FINETUNE) generate --model-dir $(OUTPUT_DIR)/model --prompt "Return the" --max-new-tokens 40
	@sed -n '/^## Before and after/,/^## Samples/p' $(OUTPUT_DIR)/model/README.md | sed '$$d'
	@# The base model and the fine-tuned one scored on the same held-out rows: two comparable JSON files.
	$(FINETUNE) eval --preset demo --model $(DEMO_DIR)/tiny-gpt2 --data-dir $(DEMO_DIR)/data \
		--output-dir $(OUTPUT_DIR) --cache-dir $(DEMO_DIR)/cache --output $(OUTPUT_DIR)/eval-base.json
	$(FINETUNE) eval --preset demo --model $(OUTPUT_DIR)/model --data-dir $(DEMO_DIR)/data \
		--output-dir $(OUTPUT_DIR) --cache-dir $(DEMO_DIR)/cache --output $(OUTPUT_DIR)/eval-model.json

.PHONY: demo-sft
demo-sft: install ## Teach a tiny model to answer a function's signature with its docstring (instruction data, CPU).
	$(FINETUNE) corpus --output-dir $(DEMO_DIR)/data
	$(FINETUNE) corpus --instructions --output-dir $(DEMO_DIR)/sft-data
	$(FINETUNE) init-model --corpus $(DEMO_DIR)/data/train.txt --output-dir $(DEMO_DIR)/tiny-gpt2
	$(FINETUNE) train --preset demo-sft --model $(DEMO_DIR)/tiny-gpt2 --data-dir $(DEMO_DIR)/sft-data \
		--output-dir $(SFT_OUTPUT_DIR) --cache-dir $(DEMO_DIR)/cache
	@# Training prompts end with a newline (the answer starts on the next line); $$(...) would strip it.
	prompt="$$(printf '%s\n_' '$(SFT_PROMPT)')"; \
		$(FINETUNE) generate --model-dir $(SFT_OUTPUT_DIR)/model --prompt "$${prompt%_}" --max-new-tokens 40

.PHONY: demo-alpaca
demo-alpaca: install ## demo-sft from Alpaca records (instruction, input, output): doctor reads them, train renders them.
	$(FINETUNE) corpus --output-dir $(DEMO_DIR)/data
	$(FINETUNE) corpus --alpaca --output-dir $(DEMO_DIR)/alpaca-data
	$(FINETUNE) init-model --corpus $(DEMO_DIR)/data/train.txt --output-dir $(DEMO_DIR)/tiny-gpt2
	$(FINETUNE) doctor --preset demo-sft --model $(DEMO_DIR)/tiny-gpt2 --data-dir $(DEMO_DIR)/alpaca-data \
		--output-dir $(ALPACA_OUTPUT_DIR) --cache-dir $(DEMO_DIR)/cache
	$(FINETUNE) train --preset demo-sft --model $(DEMO_DIR)/tiny-gpt2 --data-dir $(DEMO_DIR)/alpaca-data \
		--output-dir $(ALPACA_OUTPUT_DIR) --cache-dir $(DEMO_DIR)/cache
	@# An Alpaca prompt is the instruction then a newline (docs/data.md); $$(...) would strip the newline.
	prompt="$$(printf '%s\n_' '$(SFT_PROMPT)')"; \
		$(FINETUNE) generate --model-dir $(ALPACA_OUTPUT_DIR)/model --prompt "$${prompt%_}" --max-new-tokens 40

.PHONY: demo-dpo
demo-dpo: install ## Preference tuning (DPO): prefer a function's own docstring to another's (CPU, 1-2 minutes).
	$(FINETUNE) corpus --output-dir $(DEMO_DIR)/data
	$(FINETUNE) corpus --preferences --max-documents 128 --output-dir $(DEMO_DIR)/dpo-data
	$(FINETUNE) init-model --corpus $(DEMO_DIR)/data/train.txt --output-dir $(DEMO_DIR)/tiny-gpt2
	$(FINETUNE) train --preset demo-dpo --model $(DEMO_DIR)/tiny-gpt2 --data-dir $(DEMO_DIR)/dpo-data \
		--valid-file train.jsonl --output-dir $(DPO_OUTPUT_DIR) --cache-dir $(DEMO_DIR)/cache
	grep -E '"(initial_|train_)?reward_accuracy"' $(DPO_OUTPUT_DIR)/metrics.json

.PHONY: test
test: install ## Run the test suite (Docker tests skip with a reason when no engine is reachable).
	$(VENV)/bin/pytest $(PYTEST_ARGS)

.PHONY: faults
faults: install ## Run every fault case (signals, kills, torn checkpoints, full or read-only disk at each phase, two writers, divergence...) and print the tables.
	$(VENV)/bin/python -m bench.faults $(FAULTS_ARGS)

SOAK_RUNS ?= 50
SOAK_LOAD ?= 1
SOAK_ARGS ?=

.PHONY: soak
soak: install ## Two-process runs SIGTERMed at random moments under CPU load, then one rank failed: exit codes, seconds to exit, exact resume.
	$(VENV)/bin/python -m bench.soak --runs $(SOAK_RUNS) --load $(SOAK_LOAD) $(SOAK_ARGS)

.PHONY: lint
lint: install ## Lint Python (ruff) and the Dockerfile (hadolint).
	$(VENV)/bin/ruff check entrypoint tests bench
	$(VENV)/bin/hadolint --failure-threshold warning Dockerfile

.PHONY: docs
docs: install ## Regenerate the option and exit-code tables in docs/ from the code.
	$(VENV)/bin/python scripts/gen_docs.py

.PHONY: lock
lock: ## Re-resolve the newest dependencies into constraints.txt.
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet torch==2.13.0 $(PIP_EXTRA) -e '.[dev]'
	{ sed -n '1,3p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | sed 's/+cpu//'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

.PHONY: clean
clean: ## Remove the virtualenv, demo files, output, benchmark files and caches.
	rm -rf $(VENV) $(DEMO_DIR) $(OUTPUT_DIR) $(SFT_OUTPUT_DIR) $(ALPACA_OUTPUT_DIR) $(DPO_OUTPUT_DIR) $(BENCH_DIR) $(GPU_CHECK_DIR) .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

##@ Container

# Debian's docker client has BuildKit built in (the Dockerfile needs it); prefer it to another on PATH.
DOCKER ?= $(if $(wildcard /usr/bin/docker),/usr/bin/docker,docker)
IMAGE ?= finetune:latest
CPU_IMAGE ?= finetune:cpu
# The CPU image's base: the local Debian image scripts/docker-engine.sh builds where no registry is reachable,
# else Debian from the registry.
CPU_BASE_IMAGE ?= $(shell $(DOCKER) image inspect finetune-test-base:bookworm >/dev/null 2>&1 \
	&& echo finetune-test-base:bookworm \
	|| echo debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251)
# Extra CA certificates for pip behind a TLS-intercepting proxy, passed as a BuildKit secret (never a layer).
# The host's trust store by default, so the build trusts what the host trusts; empty to pass none.
CA_CERT ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
# More `docker build` arguments, e.g. BUILD_ARGS='--build-arg BAKE_MODEL=models/my-gpt2'.
BUILD_ARGS ?=
DATA_DIR ?= data
PRESET ?=
GPUS ?= all
# Files in OUTPUT_DIR belong to whoever runs make; the image's own default user is 1000:0.
RUN_USER ?= $(shell id -u):0

comma := ,
BUILD = DOCKER_BUILDKIT=1 $(DOCKER) build --target runtime $(if $(CA_CERT),--secret id=ca$(comma)src=$(CA_CERT)) $(BUILD_ARGS)
RUN_MOUNTS = -v $(abspath $(DATA_DIR)):/data:ro -v $(abspath $(OUTPUT_DIR)):/output -e FINETUNE_PRESET=$(PRESET)

# The CUDA image's flavour: cu130 (driver >= 580.65.06; torch from PyPI), cu128 (>= 570.26) or cu126
# (>= 560.28.03), the older two with torch from PyTorch's own index for that CUDA version.
CUDA_FLAVOUR ?= cu130
TORCH_INDEX ?= https://download.pytorch.org/whl/$(CUDA_FLAVOUR)
CUDA_ARGS = --build-arg CUDA_FLAVOUR=$(CUDA_FLAVOUR) \
	$(if $(filter-out cu130,$(CUDA_FLAVOUR)),--build-arg PIP_EXTRA_INDEX_URL=$(TORCH_INDEX))

.PHONY: image
image: ## Build the CUDA image, IMAGE (about 6 GB); CUDA_FLAVOUR=cu126 or cu128 for an older driver.
	$(BUILD) $(CUDA_ARGS) -t $(IMAGE) .

.PHONY: image-cpu
image-cpu: ## Build the CPU-only image, CPU_IMAGE (for machines without a GPU, and CI).
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: -c constraints.txt $(PIP_EXTRA) torch -d .docker-wheels
	@ls .docker-wheels/torch-*+cpu-*.whl >/dev/null 2>&1 || { echo "no CPU torch wheel in .docker-wheels/;" \
		"rerun with PIP_EXTRA='--extra-index-url https://download.pytorch.org/whl/cpu'" >&2; exit 1; }
	$(BUILD) --build-arg BASE_IMAGE=$(CPU_BASE_IMAGE) --build-arg PIP_FIND_LINKS=/wheels -t $(CPU_IMAGE) .

.PHONY: run
run: ## Train in IMAGE on all GPUs: DATA_DIR mounted read-only at /data, OUTPUT_DIR at /output, PRESET.
	mkdir -p $(OUTPUT_DIR)
	$(DOCKER) run --rm $(if $(GPUS),--gpus $(GPUS)) --shm-size=1g --user $(RUN_USER) $(RUN_MOUNTS) $(IMAGE)

.PHONY: shell
shell: ## Open a bash shell in IMAGE with the same mounts as make run.
	mkdir -p $(OUTPUT_DIR)
	$(DOCKER) run --rm -it $(if $(GPUS),--gpus $(GPUS)) --shm-size=1g --user $(RUN_USER) $(RUN_MOUNTS) \
		--entrypoint bash $(IMAGE)

##@ Kubernetes

# kubectl with its context and namespace, e.g. KUBECTL='kubectl --context gpu-cluster -n ml'.
KUBECTL ?= kubectl
OVERLAY ?= single-gpu
K8S_BUILD ?= build/k8s
OVERLAYS := $(notdir $(wildcard k8s/overlays/*))

.PHONY: k8s-render
k8s-render: ## Render every overlay offline into build/k8s/<overlay>.yaml (kubectl kustomize; no cluster needed).
	@mkdir -p $(K8S_BUILD)
	@for o in $(OVERLAYS); do $(KUBECTL) kustomize k8s/overlays/$$o > $(K8S_BUILD)/$$o.yaml || exit 1; \
		echo "$(K8S_BUILD)/$$o.yaml"; done

.PHONY: k8s-apply
k8s-apply: ## Submit one overlay: make k8s-apply OVERLAY=multi-gpu (the PVCs first: kubectl apply -k k8s/storage).
	$(KUBECTL) apply -k k8s/overlays/$(OVERLAY)

.PHONY: k8s-delete
k8s-delete: ## Delete one overlay's Job, pods and ConfigMap (never the PVCs, so the model stays).
	$(KUBECTL) delete -k k8s/overlays/$(OVERLAY) --ignore-not-found

##@ Benchmarks

.PHONY: bench
bench: install ## The tutorial recipe vs `finetune train`, side by side: a table, and JSON in .bench/.
	$(VENV)/bin/python -m bench.compare $(BENCH_ARGS) --workdir $(BENCH_DIR) --json $(BENCH_DIR)/compare.json

.PHONY: bench-prepare
bench-prepare: install ## Data preparation throughput on ~30M tokens with a 50k BPE, cold and cached.
	$(VENV)/bin/python -m bench.prepare --workdir $(BENCH_DIR) --json $(BENCH_DIR)/prepare.json

.PHONY: bench-prepare-scale
bench-prepare-scale: install ## Preparation at 256 MB, 1 GB and 4 GB of text: tokens/s and peak anonymous memory.
	$(VENV)/bin/python -m bench.prepare_scale --sizes $(SCALE_SIZES) --workers $(SCALE_WORKERS) --workdir $(BENCH_DIR) \
		--json $(BENCH_DIR)/prepare-scale.json

# make gpu-check: the GPU tests and benchmark in one command (docs/gpu.md). It runs with the system Python of a GPU
# machine (no .venv there) or with .venv here, where no CUDA means dry mode: tiny shapes on the CPU.
GPU_CHECK_DIR ?= .gpu-check
GPU_WHEELS ?= .gpu-wheels
GPU_ASSETS ?= .gpu-assets
GPU_PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
# The GPU machine's Python (3.12, x86-64 manylinux) and the packages it lacks, at the versions constraints.txt pins.
GPU_WHEEL_PYTHON ?= 3.12
GPU_WHEEL_PACKAGES ?= datasets dill multiprocess transformers regex
# Tools the check uses where present, pinned here since the project itself does not depend on them: py-spy dumps
# the stacks of a stage killed at its budget.
GPU_WHEEL_TOOLS ?= py-spy==0.4.2

.PHONY: gpu-check
gpu-check: ## The GPU benchmark and tests (a 7-minute plan, printed first) into GPU_CHECK_DIR; dry mode without CUDA.
	GPU_CHECK_DIR=$(GPU_CHECK_DIR) GPU_WHEELS=$(GPU_WHEELS) GPU_ASSETS=$(GPU_ASSETS) PYTHON=$(GPU_PYTHON) \
		scripts/gpu-check.sh

.PHONY: gpu-assets
gpu-assets: install ## Build the GPU check's tokenizer, model config and corpus into GPU_ASSETS (5 MB), for carrying.
	$(VENV)/bin/python -m bench.assets --workdir $(BENCH_DIR) --carry $(GPU_ASSETS)

.PHONY: gpu-wheels
gpu-wheels: ## Download the wheels a GPU machine's system Python lacks into GPU_WHEELS (about 15 MB), for carrying.
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_WHEEL_PYTHON) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d $(GPU_WHEELS) \
		$(foreach p,$(GPU_WHEEL_PACKAGES),$(shell grep -i '^$(p)==' constraints.txt)) $(GPU_WHEEL_TOOLS)
	@du -sh $(GPU_WHEELS)

.PHONY: bench-resume
bench-resume: install ## Seconds from process start to the first resumed step, GPT-2 124M shape on CPU.
	$(VENV)/bin/python -m bench.resume --workdir $(BENCH_DIR) --json $(BENCH_DIR)/resume.json

.PHONY: bench-remote
bench-remote: install ## --checkpoint-to on a local S3 server: upload seconds, training stall, a new node's first step.
	$(VENV)/bin/python -m bench.remote_checkpoints --workdir $(BENCH_DIR) --json $(BENCH_DIR)/remote.json

# dystream: `make help` lists the targets. Every target that runs Python first makes sure the
# project virtual environment (.venv) exists and matches pyproject.toml, so on a fresh clone
# `make train` and `make test` are the only two commands a user needs.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
.DEFAULT_GOAL := help
.SECONDEXPANSION:

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DYSTREAM := $(VENV)/bin/dystream
STAMP := $(VENV)/.installed
# torch and torchvision are installed first as a matching pair and then held fixed, so nothing
# later swaps them for another multi-GB build. Override e.g. TORCH="torch==2.15.* torchvision==0.30.*".
TORCH ?= torch==2.14.* torchvision==0.29.*
# pip's notices about optional local package mirrors are noise here.
PIP := $(PY) -m pip install -q --disable-pip-version-check
# setuptools reports deprecations in the build files of packages built from source (e.g. deepspeed's license
# classifiers) as "!!" banner blocks; nothing in this project can act on them, so those blocks (and only those:
# a SetuptoolsWarning line through its closing "!!") are dropped, as is the BuildBackendWarning "Editable
# installation" banner (the editable install maps datamodules/, callbacks/, evaluation/ into dystream on purpose).
SETUPTOOLS_BANNERS := '/(Setuptools[A-Za-z]*|BuildBackend)Warning: / {skip = 1; bangs = 0; next} \
	skip && /^[[:space:]]*!!$$/ {if (++bangs == 2) {skip = 0; after = 1}; next} skip {next} \
	after {after = 0; if (/^  /) next} {print}'
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" | awk $(SETUPTOOLS_BANNERS) || true; }

# ---------------------------------------------------------------------------------------------
# Stages: the chain every recipe sits on. `make train RECIPE=X` first builds (once) the outputs
# of the stages X needs (NEEDS_X, one or more stages), then trains X. Outputs live under runs/<stage>/.
RUNS ?= runs
CHAIN := vae audio latents teacher ode_pairs stage1_ode stage1_sid stage2_gan
NEEDS_latents := vae
NEEDS_teacher := vae audio latents
NEEDS_ode_pairs := teacher
NEEDS_stage1_ode := ode_pairs
NEEDS_stage1_sid := stage1_ode
NEEDS_stage2_gan := stage1_sid
# the Lightning subcommand that runs a stage (default fit) and the file that marks it done
RUN_ode_pairs := predict
DONE_ode_pairs := $(RUNS)/ode_pairs/pairs/index.json
# latents: the training clips encoded once by the frozen VAE, so the teacher trains without the VAE encoder in its
# step (docs/recipes.md, "Training from cached latents"); a tool, not a Lightning recipe
CMD_latents = $(DYSTREAM) data encode --vae $(RUNS)/vae/vae.safetensors --shards data/synthetic/train \
	--out $(RUNS)/latents/train --shard-samples 16
DONE_latents := $(RUNS)/latents/train/index.json
done = $(if $(1),$(or $(DONE_$(1)),$(RUNS)/$(1)/checkpoints/last.ckpt))

# default: the furthest stage of the chain whose recipe exists (stage1_sid once it lands)
RECIPE ?= $(lastword $(foreach s,$(filter-out stage2_gan,$(CHAIN)),$(if $(wildcard recipes/$(s).yaml),$(s))))
ARGS ?=

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel $(QUIET_PIP)
	$(PIP) $(foreach p,$(TORCH),"$(p)") $(QUIET_PIP)
	$(PY) -c "import torch as t, torchvision as v; print(*(f'{m.__name__}=={m.__version__.split(\"+\")[0]}' for m in (t, v)))" \
		| tr ' ' '\n' > $(VENV)/constraints.txt
	PIP_CONSTRAINT=$(CURDIR)/$(VENV)/constraints.txt $(PIP) -e ".[dev]" $(QUIET_PIP)
	$(PY) -c "import dystream, torchvision, lightning, decord, webdataset, av"
	@touch $(STAMP)

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

.PHONY: venv
venv: $(STAMP) ## create/refresh the project virtual environment (.venv)

# Chain overview (dystream chain): `make train` prints its plan first (stages done, to build, and their time in
# the last run, from $(RUNS)/summary.json); every stage runs through `dystream chain run`, which says which stage of
# how many starts, times it and adds a one-line summary (time, key metric, output) to $(RUNS)/summary.md.
# the stages a recipe needs, each once, in an order that builds every stage after its needs
uniq = $(if $(1),$(firstword $(1)) $(call uniq,$(filter-out $(firstword $(1)),$(1))))
needs_of = $(foreach s,$(1),$(call needs_of,$(NEEDS_$(s))) $(s))
stages_for = $(strip $(call uniq,$(call needs_of,$(1))))
dones = $(foreach s,$(1),$(call done,$(s)))
CHAIN_RUN = $(DYSTREAM) chain run --runs $(RUNS) --stage $(1) --done "$(call done,$(1))" --order "$(CHAIN)" \
	--of "$(strip $(call stages_for,$(RECIPE)))" --

.PHONY: plan
plan: | $(STAMP) ## print what make train RECIPE=... would build, what is done, and the last measured times
	@test -n "$(RECIPE)" || { echo "no recipe found under recipes/"; exit 2; }
	@$(DYSTREAM) chain plan --runs $(RUNS) $(foreach s,$(call stages_for,$(RECIPE)),--stage $(s)=$(call done,$(s))) \
		--train $(RECIPE) --target "make train RECIPE=$(RECIPE)"

.PHONY: train
train: $(STAMP) | plan $$(call dones,$$(NEEDS_$$(RECIPE))) ## train RECIPE (default: the furthest stage) on the embedded synthetic data, e.g. make train RECIPE=vae ARGS="--trainer.max_steps=50"
	@test -n "$(RECIPE)" || { echo "no recipe found under recipes/"; exit 2; }
	@$(call CHAIN_RUN,$(RECIPE)) $(DYSTREAM) $(or $(RUN_$(RECIPE)),fit) --config recipes/$(RECIPE).yaml $(ARGS)

# A missing stage output is built from its recipe, after the outputs it needs (one explicit rule
# per stage: make never uses the same pattern rule twice in one chain).
define stage_rule
$(call done,$(1)): | $(STAMP) $(call dones,$(NEEDS_$(1)))
	@$$(call CHAIN_RUN,$(1)) $(or $(CMD_$(1)),$(DYSTREAM) $(or $(RUN_$(1)),fit) --config recipes/$(1).yaml)
endef
$(foreach s,$(CHAIN),$(eval $(call stage_rule,$(s))))

# Demo (dystream demo, docs/streaming.md): after the chain (the student export of stage1_sid, built first when
# missing), both DyStream scenarios of a validation identity rendered with dystream generate; the contact sheet goes
# to $(DEMO_SHEET) (shown at the top of the README), the GIF, sample file and mp4s to outputs/demo/.
DEMO_SHEET ?= docs/images/demo_sheet.png
.PHONY: demo
demo: $(STAMP) | $$(call done,stage1_sid) ## after the chain: a validation identity with its own and another clip's voices -> contact sheet + GIF
	$(DYSTREAM) demo --out outputs/demo --sheet $(DEMO_SHEET) --gif outputs/demo/demo.gif \
		--checkpoint $(or $(wildcard $(RUNS)/stage2_gan/student.safetensors),$(RUNS)/stage1_sid/student.safetensors) \
		--vae $(RUNS)/vae/vae.safetensors --audio $(RUNS)/teacher/audio.safetensors $(ARGS)

# Ablations (docs/ablation.md): the paper's rows in miniature (baseline, +sink, +RAPR, GAN w/o D_CA, full; Pre-/post-mask
# teachers) trained from the chain's teacher and ODE pairs where missing, then streamed for 120 s per identity ->
# docs/results/ablation.md and docs/images/ablation_drift.png. Rows already trained under runs/ablation/ are reused.
.PHONY: ablation
ablation: $(STAMP) | $$(call done,ode_pairs) $$(METRIC_NETS) ## the paper's ablations on 120-s streams (trains missing rows; docs/ablation.md)
	$(DYSTREAM) ablation run $(ARGS)

.PHONY: test
test: $(STAMP) ## run the test suite (CPU, tiny presets)
	$(VENV)/bin/pytest -q

.PHONY: lint
lint: $(STAMP) ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

.PHONY: bench
bench: $(STAMP) ## benchmarks -> docs/benchmarks.md + JSON (QUICK=1 for the under-2-minute mode)
	$(DYSTREAM) bench all $(if $(QUICK),--quick) $(ARGS)

# Every GPU-only path once (bf16 training of teacher/SiD/GAN, FlexAttention, the 5B student at 928x704, streaming,
# FSDP, CUDA graphs) -> docs/gpu.md with the device's name. DEVICE=cpu runs the same code at the tiny presets and
# writes to outputs/ instead, so a smoke run never replaces a GPU report; GPU_CHECK_OUT=path overrides either.
DEVICE ?= cuda
GPU_CHECK_OUT ?= $(if $(filter cpu,$(DEVICE)),outputs/gpu-check-cpu.md,docs/gpu.md)
.PHONY: gpu-check
gpu-check: $(STAMP) ## run every GPU-only path once -> docs/gpu.md (DEVICE=cpu: tiny presets, a smoke run)
	$(PY) -m dystream.bench.gpu_check --device $(DEVICE) --out $(GPU_CHECK_OUT)

.PHONY: clean
clean: ## remove run outputs (keeps .venv and data/)
	rm -rf $(RUNS) outputs

# Zoo: train whatever stage of the chain is missing (recipes that exist), then collect the stage exports into
# the zoo cache ($DYSTREAM_CACHE or ~/.cache/dystream) with their sha256 in <cache>/local.json (docs/zoo.md).
ZOO_STAGES = $(foreach s,$(CHAIN),$(if $(wildcard recipes/$(s).yaml),$(s)))
.PHONY: zoo
zoo: $(STAMP) | $$(foreach s,$$(ZOO_STAGES),$$(call done,$$(s))) ## build the local zoo entries from our recipes' exports (trains missing stages)
	$(DYSTREAM) zoo build-local --runs $(RUNS)

# Evaluation (docs/evaluation.md): the synthetic metric networks are trained first when missing (a few minutes
# each on a CPU); `dystream eval` then evaluates whichever stage exports of recipes/eval.yaml exist, and a missing
# export becomes an n/a row naming its recipe instead of starting the training chain. OMP_WAIT_POLICY=PASSIVE keeps
# idle OpenMP threads from spinning: several times faster on a busy machine, harmless elsewhere.
METRIC_NETS := $(RUNS)/metric_syncnet/syncnet.safetensors $(RUNS)/metric_pose/pose.safetensors \
	$(RUNS)/metric_identity/identity.safetensors
$(RUNS)/metric_syncnet/syncnet.safetensors: | $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(DYSTREAM) fit --config recipes/metric_syncnet.yaml
$(RUNS)/metric_pose/pose.safetensors: | $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(DYSTREAM) fit --config recipes/metric_pose.yaml
$(RUNS)/metric_identity/identity.safetensors: | $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(DYSTREAM) fit --config recipes/metric_identity.yaml

.PHONY: eval
eval: $(STAMP) | $(METRIC_NETS) ## benchmark tables -> docs/results/ (trains the synthetic metric networks first if missing)
	OMP_WAIT_POLICY=PASSIVE $(DYSTREAM) eval --config recipes/eval.yaml $(ARGS)

# Two commands on a fresh clone: `make demo` and `make test`.
# Everything goes into a local virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override (e.g. TORCH_SPEC="torch") where a CUDA build is wanted.
TORCH_SPEC ?= torch==2.13.0
# open-clip-torch ships CLIP's BPE vocabulary; installed without its dependencies (it would pull
# torchvision), used only as a data file for the `tiny` preset's tokenizer.
VOCAB_SPEC ?= open-clip-torch==3.3.0

.PHONY: install demo test bench clean reference-fixtures world world-quick

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[torch,test,data,tf]"
	$(PY) -m pip install -q --no-deps "$(VOCAB_SPEC)"
	touch $@

demo: install
	$(VENV)/bin/safe-jax demo --out out/demo

# The synthetic world's own Stable Diffusion, trained from scratch by our code on this machine's
# CPUs: VAE, reward CLIP (its text tower becomes the text encoder), judge CLIP (evaluation only),
# then the UNet, which reads the first two's exports. About 1 h 15 min to 1 h 45 min on 2 cores. Every run
# resumes from its latest checkpoint, and one that finished is skipped, so an interrupted
# `make world` continues where it stopped. Results in runs/world/<model>/: export/, loss.png,
# samples/, metrics.jsonl, summary.json. The diffusers folder is runs/world/unet/export; the last
# step copies the three exports into safe_jax/weights/ as the presets tiny-anchor, tiny-anchor-reward
# and tiny-anchor-judge (launch/ship_world.py).
# WORLD_ARGS reach every run (e.g. WORLD_ARGS="--config.data.prefetch=4").
WORLD_ARGS ?=
WORLD_MODELS := world_vae world_clip_reward world_clip_judge world_unet

world: install
	$(foreach m,$(WORLD_MODELS),$(VENV)/bin/safe-jax pretrain --config launch/configs/$(m).py $(WORLD_ARGS) &&) true
	$(PY) -m launch.ship_world

# The same four at 20 steps each (a few minutes, mostly compiling): does the chain work here?
# Writes runs/world/*_quick/.
world-quick: install
	$(foreach m,$(WORLD_MODELS),$(VENV)/bin/safe-jax pretrain --config launch/configs/$(m).py:quick $(WORLD_ARGS) &&) true

test: install
	$(PY) -m pytest -n 2 -q tests

bench: install
	$(PY) benchmarks/unet_train_step.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/subjects_throughput.py
	$(PY) benchmarks/train_step_vs_torch.py
	$(PY) benchmarks/eval_throughput.py

# The reference environment (.refenv): the metrics' own PyTorch code (open_clip, ImageReward,
# clean-fid, torchmetrics), which needs torchvision and so cannot live in .venv. Only
# `make reference-fixtures` uses it, to rewrite tests/fixtures/reference/; tests never do.
# CMMD's reference is google-research/cmmd (with scenic's CLIP), which is not on PyPI: CMMD_SRC
# and SCENIC_SRC name checkouts of them; without them cmmd.npz is left as it is.
REFENV ?= .refenv
REF_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CMMD_SRC ?=
SCENIC_SRC ?=

$(REFENV)/.installed: tests/reference/requirements.txt tests/reference/requirements-nodeps.txt
	$(PYTHON) -m venv $(REFENV)
	$(REFENV)/bin/python -m pip install -q --upgrade pip
	$(REFENV)/bin/python -m pip install -q $(REF_TORCH_SPEC)
	$(REFENV)/bin/python -m pip install -q -r tests/reference/requirements.txt
	$(REFENV)/bin/python -m pip install -q --no-deps -r tests/reference/requirements-nodeps.txt
	touch $@

reference-fixtures: $(REFENV)/.installed
	$(REFENV)/bin/python tests/reference/fixtures_imagereward.py
	$(REFENV)/bin/python tests/reference/fixtures_open_clip.py
	$(REFENV)/bin/python tests/reference/fixtures_metrics.py $(if $(CMMD_SRC),--cmmd-src $(CMMD_SRC)) \
	  $(if $(SCENIC_SRC),--scenic-src $(SCENIC_SRC))

clean:
	rm -rf $(VENV) out

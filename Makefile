# One entry point for users and CI. Every target creates .venv from requirements.txt if missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Where torch comes from (README "Set-up"): empty = the default index (on Linux PyPI's torch wheel is
# the CUDA build); https://download.pytorch.org/whl/cpu for the CPU-only wheel, or a CUDA variant's index.
TORCH_INDEX ?=
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt | cut -d' ' -f1)

.PHONY: demo checkpoints test test-slow bench clean-venv

$(STAMP): requirements.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; run 'make PYTHON=python3 ...'"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet --disable-pip-version-check --index-url $(TORCH_INDEX) "$(TORCH_PIN)")
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip check
	@touch $(STAMP)

## make demo: the whole pipeline on the embedded SynthGRID corpus (data -> pretrain -> finetune -> attack -> FL+DP -> table)
demo: $(STAMP)
	$(PY) -m scripts.demo

## make checkpoints: regenerate the shipped starting checkpoints + model cards (checkpoints/; ~1 h on 2 cores):
## AV-HuBERT (avhubert_tiny_synthgrid.pt) and the public Wav2Vec2 start of the private runs (wav2vec2_tiny_synthgrid.pt)
checkpoints: $(STAMP)
	$(PY) -m scripts.prepare_data
	$(PY) train_avhubert.py experiment=starting_checkpoint task=build_checkpoint
	$(PY) -m scripts.prepare_data data=synthgrid_population
	$(PY) train_avhubert.py experiment=wav2vec2_public_start task=build_checkpoint

## make test: the fast test suite
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

## make test-slow: end-to-end tests (minutes)
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

## make bench: speed / memory benchmarks -> benchmarks/results/*.json and report.md
bench: $(STAMP)
	$(PY) -m benchmarks.run

clean-venv:
	rm -rf $(VENV)

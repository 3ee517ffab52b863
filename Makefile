# One-command entry points. `make train` and `make test` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.toml
RUN ?= runs/$(basename $(notdir $(CONFIG)))
PYTEST_ARGS ?=

.PHONY: install train test test-seeds docs notebooks bench bench-distributed tensorboard clean

# Re-install when the dependency list or the pinned versions change.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev,docs]'
	touch $@

install: $(VENV)/.installed

# Train the default config, evaluate it on the test set and write its figures.
train: install
	$(BIN)/pyro-vae train --config $(CONFIG) --out $(RUN)
	$(BIN)/pyro-vae evaluate $(RUN)
	$(BIN)/pyro-vae plot $(RUN)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The statistical tests once per seed 1..20, each test id naming its seed (test_x[seed=7]).
# Each states its false-failure rate per run, so a failure is a bug or a wrong tolerance.
SEEDS ?= 1-20
test-seeds: install
	$(BIN)/python -m pytest -m statistical --seed $(SEEDS) $(PYTEST_ARGS)

# The documentation site, docs/_build/html/index.html. Any warning fails the build (-W), and
# --keep-going lists them all first. PYRO_VAE_INTERSPHINX=1 links to torch's and Pyro's docs
# (needs the network; see docs/conf.py).
docs: install
	$(BIN)/python -m sphinx -b html -W --keep-going docs docs/_build/html

# Execute the notebooks in place, full setting (about an hour on 2 CPU cores: docs/results.md, "Notebooks").
notebooks: install
	$(BIN)/python notebooks/execute.py

# Seconds per epoch: plain PyTorch vs a minimal Pyro SVI loop vs pyro_vae (idle machine!).
bench: install
	$(BIN)/python benchmarks/speed.py

# Images per second with 1 and 2 processes (torchrun, gloo; idle machine!).
bench-distributed: install
	$(BIN)/python benchmarks/distributed.py

# Watch a run trained with --tensorboard (train.tensorboard = true): make tensorboard RUN=runs/NAME
tensorboard: install
	$(BIN)/tensorboard --logdir $(RUN)/tensorboard

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache docs/_build

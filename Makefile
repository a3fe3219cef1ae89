# Everything a fresh Debian machine needs, in order. `make demo` and `make test` are the README's commands.
PY ?= .venv/bin/python
SHELL := /bin/bash
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: venv system cluster cluster-stop demo test lint bench install-check

venv: .venv/.installed
.venv/.installed: pyproject.toml | system   # system first: a stock Debian has no python3-venv
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # CPU wheel first: a bare `torch` requirement pulls CUDA builds
	$(PY) -m pip install -q -e '.[train,deepspeed,test,dev]'
	$(PY) slurm/build_ops.py   # DeepSpeed's CPU ops, compiled here once rather than inside the first run
	touch $@

system:   ## Debian packages: python3-venv, g++ (DeepSpeed's CPU ops), espeak-ng/sox (speech corpora), slurm-wlm, munge, slurmdbd, mariadb
	bash slurm/cluster.sh install python3-venv g++ espeak-ng sox libsndfile1

cluster: system
	bash slurm/cluster.sh start

cluster-stop:
	bash slurm/cluster.sh stop

demo: venv cluster   ## the smoke recipe on the local SLURM cluster, waiting for its end
	$(PY) launch/submit.py recipes/smoke.yaml run.name=smoke-$$(date +%Y%m%d-%H%M%S) --wait

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: venv cluster lint
	$(PY) -m pytest

bench: venv cluster
	$(PY) bench/padding.py
	$(PY) bench/launcher.py
	$(PY) bench/train_step.py
	$(PY) bench/collect_logs.py
	$(PY) bench/checkpoint.py

# The default install runs the default recipe: a fresh venv, torch first, then only '.[train]', and the smoke
# recipe as it is, on the local executor (no SLURM), to the end.
CHECK_VENV ?= /tmp/asrlaunch-install-check
install-check:
	rm -rf $(CHECK_VENV) && python3 -m venv $(CHECK_VENV)/venv
	$(CHECK_VENV)/venv/bin/python -m pip install -q --upgrade pip
	$(CHECK_VENV)/venv/bin/python -m pip install -q torch==2.13.0
	$(CHECK_VENV)/venv/bin/python -m pip install -q -e '.[train]'
	cd $(CHECK_VENV) && $(CHECK_VENV)/venv/bin/asrlaunch submit $(CURDIR)/recipes/smoke.yaml --executor local --wait

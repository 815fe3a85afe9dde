PY := .venv/bin/python

.PHONY: env demo test bench

env:
	bash scripts/setup_env.sh

demo: env
	$(PY) -m adam_mini_tx demo

test: env
	$(PY) -m pytest

bench: env
	$(PY) benchmarks/bench_step.py

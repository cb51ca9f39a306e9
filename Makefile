# sglang-ext: the two commands are `make demo` and `make test`; both install first.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install demo demo-sim test test-fast bench clean

install: .venv/.installed

.venv/.installed: setup.py scripts/install.sh
	bash scripts/install.sh
	@touch $@

# The main job: round_robin vs bfio on a live SGLang server (stand-in backend on CPU).
demo: install
	$(PY) scripts/demo_live.py

# Simulator-only comparison (seconds): the paper-mode table on a shipped trace and a plot.
demo-sim: install
	$(PY) -m sglang_ext.cli simulate --trace data/traces/burstgpt_lengths_8000.json --mode paper \
		--ranks 32 --batch 72 --policies fcfs,round_robin,jsq,total_tokens,bfio \
		--json out/demo/paper_burstgpt.json --plot out/demo/paper_burstgpt.png

# The whole suite, slow end-to-end server tests included (CI runs this).
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Skip the slow end-to-end tests locally.
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

bench: install
	$(PY) scripts/bench_reproduction.py
	$(PY) scripts/bench_decision.py
	$(PY) scripts/bench_controller.py
	$(PY) scripts/bench_busy_loop.py
	$(PY) scripts/bench_refit.py
	$(PY) scripts/bench_gc.py
	$(PY) scripts/bench_projection.py

clean:
	rm -rf out .pytest_cache build *.egg-info

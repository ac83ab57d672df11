# The README's commands. Each does its own set-up (scripts/setup.sh) and is cheap to repeat.
# `make bench BENCH_ARGS=--quick` is CI's smoke run of the benchmarks (bench/README.md).
.PHONY: setup deploy test bench lint

setup:
	@scripts/setup.sh

deploy:
	@scripts/deploy.sh

test:
	@scripts/test.sh

lint: setup
	@.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/lint-imports

bench: setup
	@scripts/bench-setup.sh
	@for b in bench/*.py; do echo "== $$b"; .venv/bin/python "$$b" $(BENCH_ARGS) || exit 1; done

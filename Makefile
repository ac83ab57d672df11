# The README's commands. Each does its own set-up (scripts/setup.sh) and is cheap to repeat.
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
	@for b in bench/*.py; do echo "== $$b"; .venv/bin/python "$$b" || exit 1; done

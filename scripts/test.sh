#!/usr/bin/env bash
# The whole test suite: lint (as tests), unit, property, e2e, and Ansible tests, in one pytest run
# so that the output ends with pytest's summary. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "$(id -u)" = 0 ]; then
    scripts/ensure-docker.sh
    scripts/ensure-packages.sh
    scripts/bench-setup.sh  # tests/test_benchmarks.py runs the socat baselines too
fi
scripts/ansible-test-setup.sh
# Molecule and ansible-test start the Ansible tools by name.
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"

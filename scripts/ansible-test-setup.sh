#!/usr/bin/env bash
# Prepares ansible-test on a machine that reaches PyPI but not ci-files.testing.ansible.com.
#
# ansible-test bootstraps pip into each sanity-test virtual environment with a get-pip.py that it
# downloads from ci-files.testing.ansible.com and caches as ~/.ansible/test/cache/get_pip_<ver>.py
# (ansible_test/_util/target/setup/requirements.py, bootstrap()). That host is unreachable here, so
# this script writes the cached file itself: a stand-in that installs pip with the standard
# library's ensurepip, then runs `pip install` with the arguments ansible-test passed, which pins
# the same pip version from PyPI. Idempotent: the file is rewritten only when its content differs.
set -euo pipefail
cd "$(dirname "$0")/.."

python=.venv/bin/python
# The pip version comes from ansible-test itself (get_venv_packages), so an upgrade of
# ansible-core picks the right cache name without editing this script.
pip_version=$("$python" - <<'PY'
from ansible_test._internal.python_requirements import get_venv_packages


class _Python:
    version = "3.11"


print(get_venv_packages(_Python())["pip"])
PY
)

cache_dir="${HOME}/.ansible/test/cache"
target="${cache_dir}/get_pip_${pip_version//./_}.py"
mkdir -p "$cache_dir"

standin=$(cat <<'PY'
"""Offline stand-in for get-pip.py, written by EnclaveOps' scripts/ansible-test-setup.sh.

ansible-test runs this file as get-pip.py with pip's arguments plus get-pip's own
--no-setuptools/--no-wheel. pip comes from the standard library (ensurepip); then pip installs
the requested packages (the pinned pip version) from the configured index.
"""

import subprocess
import sys

GET_PIP_ONLY_FLAGS = {"--no-setuptools", "--no-wheel"}


def main():
    subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"])
    args = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY_FLAGS]
    subprocess.check_call([sys.executable, "-m", "pip", "install"] + args)


if __name__ == "__main__":
    main()
PY
)

if [ -f "$target" ] && [ "$(cat "$target")" = "$standin" ]; then
    exit 0
fi
printf '%s\n' "$standin" > "$target"
echo "ansible-test-setup: wrote the pip bootstrap stand-in ${target}" >&2

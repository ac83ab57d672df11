#!/usr/bin/env bash
# Creates .venv39: Python 3.9 (Amazon Linux 2023's system Python, the one the nitro_host role's
# venv uses on a real parent) with enclave-runtime (editable, host extras) and the unit-test tools.
# tests/test_python39.py runs the unit suite with it (docs/development.md, "Python versions").
# Idempotent: a second run with unchanged inputs returns at once (stamp = hash of the inputs).
set -euo pipefail
cd "$(dirname "$0")/.."

# The last releases of the test tools that still install on Python 3.9 (pytest 9 and newer
# hypothesis need 3.10); the runtime's own dependencies come from pyproject.toml.
TEST_TOOLS=(
    "pytest==8.4.2"
    "pytest-xdist==3.8.0"
    "pytest-mock==3.15.1"
    "mock==5.2.0"
    "hypothesis==6.141.1"
    # The KMS tests' client and peer (tests/kms_support.py, moto's KMS): the last releases on 3.9.
    "boto3==1.42.97"
    "moto==5.1.22"
)

pick_python39() {
    local candidate
    for candidate in "${PYTHON39:-}" python3.9 "$HOME"/.pyenv/versions/3.9.*/bin/python3.9; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "setup-py39: no Python 3.9 found (PATH, ~/.pyenv/versions/3.9.*); install it" \
        "(pyenv install 3.9) or set PYTHON39=/path/to/python3.9" >&2
    return 1
}

stamp=.venv39/.setup-stamp
wanted=$( (cat pyproject.toml scripts/setup-py39.sh) | sha256sum | cut -d' ' -f1)
if [ -x .venv39/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi

python=$(pick_python39)
echo "setup-py39: creating .venv39 with $("$python" --version 2>&1)" >&2
[ -x .venv39/bin/python ] || "$python" -m venv .venv39
pip=(.venv39/bin/python -m pip install --quiet --disable-pip-version-check)
PYTHONWARNINGS=ignore "${pip[@]}" -e '.[host]' "${TEST_TOOLS[@]}"
echo "$wanted" > "$stamp"
echo "setup-py39: .venv39 ready" >&2

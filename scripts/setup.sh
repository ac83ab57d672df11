#!/usr/bin/env bash
# Creates .venv with enclave-runtime (editable) and the development tools.
# Idempotent: a second run with unchanged inputs returns at once (stamp = hash of the inputs).
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "setup: need Python >= 3.11 for development (the runtime itself runs on >= 3.9); set PYTHON=/path/to/python3.11" >&2
    return 1
}

# Debian packages the tests compare against (GNU cpio: tests/unit/test_cpio.py checks our newc
# archives byte for byte against it). Installed when missing and we are root, as in CI.
ensure_debian_packages() {
    local missing=()
    command -v cpio >/dev/null 2>&1 || missing+=(cpio)
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: ${missing[*]} missing (apt-get install ${missing[*]} as root); the tests that compare with it are skipped" >&2
        return 0
    fi
    echo "setup: installing Debian's ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}
ensure_debian_packages

stamp=.venv/.setup-stamp
wanted=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi

python=$(pick_python)
echo "setup: creating .venv with $("$python" --version 2>&1)" >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
echo "$wanted" > "$stamp"
echo "setup: .venv ready" >&2

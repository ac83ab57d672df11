#!/usr/bin/env bash
# The main job: deploy the demo enclave with Ansible on the local emulator (inventory/local.yml).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "$(id -u)" = 0 ]; then
    scripts/ensure-docker.sh
fi
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/ansible-playbook playbooks/deploy-enclave.yml "$@"

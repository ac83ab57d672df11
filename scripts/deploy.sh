#!/usr/bin/env bash
# The main job: deploy the demo enclave with Ansible on the local emulator (inventory/local.yml).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "$(id -u)" = 0 ]; then
    scripts/ensure-docker.sh
fi
if [ ! -f playbooks/deploy-enclave.yml ]; then
    echo "deploy: playbooks/deploy-enclave.yml arrives with the collection work (issue 7);" \
         "set-up is done, nothing was deployed" >&2
    exit 1
fi
exec .venv/bin/ansible-playbook playbooks/deploy-enclave.yml "$@"

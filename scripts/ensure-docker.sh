#!/usr/bin/env bash
# Makes sure a Docker engine answers: installs Debian's docker.io and starts dockerd when none runs.
# Needs root to install or start the engine; says so otherwise.
set -euo pipefail

docker_answers() { docker info >/dev/null 2>&1; }

docker_answers && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "ensure-docker: no Docker engine answers and starting one needs root; start Docker or run as root" >&2
    exit 1
fi

if ! command -v dockerd >/dev/null 2>&1; then
    echo "ensure-docker: installing Debian's docker.io" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq docker.io >/dev/null
fi

echo "ensure-docker: starting dockerd (log: /var/log/enclaveops-dockerd.log)" >&2
setsid nohup dockerd >/var/log/enclaveops-dockerd.log 2>&1 < /dev/null &
for _ in $(seq 1 60); do
    docker_answers && exit 0
    sleep 0.5
done
echo "ensure-docker: dockerd did not answer within 30 s; see /var/log/enclaveops-dockerd.log" >&2
exit 1

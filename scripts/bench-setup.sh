#!/usr/bin/env bash
# Installs the benchmarks' baselines (bench/README.md): Debian's socat, for bench/ingress.py and
# bench/egress.py. Idempotent; installing needs root and says so otherwise.
set -euo pipefail

command -v socat >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "bench-setup: socat is missing and installing it needs root (apt-get install socat)" >&2
    exit 1
fi
echo "bench-setup: installing Debian's socat" >&2
export DEBIAN_FRONTEND=noninteractive
apt_get() { apt-get -o DPkg::Lock::Timeout=300 "$@"; }  # another apt-get may hold the lock a while
apt_get install -y -qq socat >/dev/null || { apt_get update -qq && apt_get install -y -qq socat >/dev/null; }

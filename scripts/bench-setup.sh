#!/usr/bin/env bash
# Installs what the benchmarks measure against (bench/README.md): Debian's socat, the baseline of
# bench/ingress.py and bench/egress.py, and busybox-static, bench/footprint.py's smallest app.
# Idempotent; installing needs root and says so otherwise.
set -euo pipefail

missing=()
command -v socat >/dev/null 2>&1 || missing+=(socat)
[ -x /bin/busybox ] || missing+=(busybox-static)
[ ${#missing[@]} -gt 0 ] || exit 0
if [ "$(id -u)" != 0 ]; then
    echo "bench-setup: ${missing[*]} missing and installing needs root (apt-get install ${missing[*]})" >&2
    exit 1
fi
echo "bench-setup: installing Debian's ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt_get() { apt-get -o DPkg::Lock::Timeout=300 "$@"; }  # another apt-get may hold the lock a while
apt_get install -y -qq "${missing[@]}" >/dev/null \
    || { apt_get update -qq && apt_get install -y -qq "${missing[@]}" >/dev/null; }

#!/usr/bin/env bash
# Installs the Debian packages the fleet test bed (tests/fleet/) runs: its hosts' sshd
# (openssh-server), the registry the parents pull from (docker-registry), sudo for `become`, and
# iproute2/iptables/util-linux for the namespaces. Idempotent; needs root (CI runs as root).
set -euo pipefail

packages=(openssh-server openssh-client docker-registry sudo iproute2 iptables util-linux)
commands=(/usr/sbin/sshd /usr/bin/ssh /usr/bin/docker-registry /usr/bin/sudo /usr/sbin/ip /usr/sbin/iptables /usr/bin/nsenter)

missing=0
for command in "${commands[@]}"; do
    [ -x "$command" ] || missing=1
done
[ "$missing" = 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "ensure-packages: installing ${packages[*]} needs root; run as root or install them" >&2
    exit 1
fi
echo "ensure-packages: installing ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null

# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The vsock-proxy allowlist and extra proxy instances of the nitro_host role (docs/collection.md).

Facts taken from AWS's aws-nitro-enclaves-cli packaging (recorded with their source in
tests/unit/plugins/filter/data/aws_vsock_proxy.yml): the stock nitro-enclaves-vsock-proxy.service
runs ``vsock-proxy 8000 kms.<region>.amazonaws.com 443 --config <allowlist file>``
and vsock-proxy refuses to start when its target is not in that file's ``allowlist``, whose
entries are ``{address, port}``; the stock file lists ``kms`` and ``kms-fips`` of every region.
"""

from __future__ import annotations

import re

from ansible.errors import AnsibleFilterError

REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")
STOCK_LOCAL_PORT = 8000  # nitro-enclaves-vsock-proxy.service listens there
UNIT_PREFIX = "enclaveops-vsock-proxy-"


def _endpoint(entry: object, where: str) -> dict[str, object]:
    if not isinstance(entry, dict) or not entry.get("address"):
        raise AnsibleFilterError(f"{where}: give address (a host name or IP) and port")
    port = entry.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise AnsibleFilterError(f"{where}.port: {port!r} is not a TCP port; use 1-65535")
    return {"address": str(entry["address"]), "port": port}


def vsock_proxy_instances(proxies: list[dict[str, object]]) -> list[dict[str, object]]:
    """Each extra proxy with its unit name; refuses a clash with the stock service's port 8000."""
    instances: list[dict[str, object]] = []
    seen: set[object] = set()
    for index, proxy in enumerate(proxies or []):
        where = f"nitro_host_vsock_proxies[{index}]"
        target = _endpoint(proxy, where)
        local_port = proxy.get("local_port")
        if isinstance(local_port, bool) or not isinstance(local_port, int) or local_port < 1:
            raise AnsibleFilterError(f"{where}.local_port: {local_port!r} is not a vsock port")
        if local_port == STOCK_LOCAL_PORT or local_port in seen:
            raise AnsibleFilterError(
                f"{where}.local_port: {local_port} is already taken (8000 is the stock "
                "nitro-enclaves-vsock-proxy.service for KMS); choose another vsock port"
            )
        seen.add(local_port)
        workers = proxy.get("workers", 4)  # vsock-proxy's own default for --num_workers
        instances.append(
            {
                **target,
                "local_port": local_port,
                "workers": workers,
                "unit": f"{UNIT_PREFIX}{local_port}",
            }
        )
    return instances


def vsock_proxy_allowlist(
    extra: list[dict[str, object]], region: str, proxies: list[dict[str, object]] | None = None
) -> list[dict[str, object]]:
    """The allowlist for ``region``: its KMS endpoints, the extra entries, the proxies' targets."""
    if not isinstance(region, str) or not REGION.match(region):
        raise AnsibleFilterError(
            f"nitro_host_vsock_proxy_region: {region!r} is not an AWS region; set it (e.g. "
            "eu-south-2) or let the role read it from the instance metadata"
        )
    entries = [
        {"address": f"kms.{region}.amazonaws.com", "port": 443},
        {"address": f"kms-fips.{region}.amazonaws.com", "port": 443},
    ]
    entries += [
        _endpoint(entry, f"nitro_host_vsock_proxy_allowlist[{index}]")
        for index, entry in enumerate(extra or [])
    ]
    entries += [
        {"address": proxy["address"], "port": proxy["port"]}
        for proxy in vsock_proxy_instances(proxies or [])
    ]
    unique: list[dict[str, object]] = []
    for entry in entries:
        if entry not in unique:
            unique.append(entry)
    return unique


class FilterModule:
    """The nitro_host role's vsock-proxy filters."""

    def filters(self) -> dict[str, object]:
        return {
            "vsock_proxy_allowlist": vsock_proxy_allowlist,
            "vsock_proxy_instances": vsock_proxy_instances,
        }

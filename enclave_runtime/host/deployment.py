"""The effective deployment of a manifest: what the enclave role needs, with the runtime's defaults.

One place works out a deployment from enclaver.yaml (docs/collection-modules.md,
``manifest_info``): the name, the target and sources, the ingress ports and where the host
publishes them (``[IP:]HOST:CONTAINER``, parsed by
:func:`~enclave_runtime.host.sleeve_container.parse_port_binding`), the aux API port (its
default is the API port + 1), the CPUs and memory (the manifest's defaults, else the runtime's),
the init services and the signing files (as written: the role copies them with the manifest).
The role asks for it instead of reading the YAML again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from enclave_runtime.formats.manifest import Manifest, load_manifest
from enclave_runtime.host.sleeve_container import PortBinding, parse_port_binding


def effective_deployment(
    path: str | os.PathLike[str], published_ports: Sequence[str] = ()
) -> dict[str, Any]:
    """The deployment ``path`` describes; ``published_ports`` replace the default ``P:P`` ones."""
    return deployment_of(load_manifest(path), published_ports)


def deployment_of(manifest: Manifest, published_ports: Sequence[str] = ()) -> dict[str, Any]:
    """As :func:`effective_deployment`, for a manifest already loaded."""
    ingress_ports = [ingress.listen_port for ingress in manifest.ingress]
    bindings = (
        [parse_port_binding(str(text)) for text in published_ports]
        if published_ports
        else [PortBinding(port, port) for port in ingress_ports]
    )
    aux_api_port = manifest.aux_api.listen_port if manifest.aux_api is not None else None
    app_port = next((port for port in ingress_ports if port != aux_api_port), None)
    return {
        "name": manifest.name,
        "target": manifest.target,
        "sources": {
            "app": manifest.sources.app,
            "odyn": manifest.sources.odyn,
            "sleeve": manifest.sources.sleeve,
        },
        "ingress_ports": ingress_ports,
        "published_ports": [str(binding) for binding in bindings],
        "app_port": app_port,
        "app_host_port": _host_port(bindings, app_port),
        "api_port": manifest.api.listen_port if manifest.api is not None else None,
        "aux_api_port": aux_api_port,
        "aux_api_host_port": _host_port(bindings, aux_api_port),
        "cpu_count": manifest.defaults.cpu_count,
        "memory_mb": manifest.defaults.memory_mb,
        "services": sorted(unit.name for unit in manifest.services.units),
        # As the manifest writes them: relative to its directory, or absolute.
        "signing_files": []
        if manifest.signature is None
        else [manifest.signature.certificate, manifest.signature.key],
        # The private key alone, which the role refuses to copy to parents.
        "signing_key": None if manifest.signature is None else manifest.signature.key,
    }


def _host_port(bindings: Sequence[PortBinding], container_port: int | None) -> int | None:
    """The host port publishing ``container_port`` (0: any free one), None when none does."""
    return next((b.host_port for b in bindings if b.container_port == container_port), None)

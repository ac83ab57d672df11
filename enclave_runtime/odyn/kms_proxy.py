"""The KMS proxy's place in odyn's start order (issue: KMS proxy).

enclaver's odyn runs a proxy on ``kms_proxy.listen_port`` that forwards the application's AWS
KMS calls through egress and adds the enclave's attestation document to them. This odyn does not
provide it yet: :func:`start_kms_proxy` is the hook the supervisor already calls between egress
and the API, so the proxy can be added without changing the start order.
"""

from __future__ import annotations

import logging

from enclave_runtime.formats.manifest import Manifest

LOG = logging.getLogger("odyn")


def start_kms_proxy(manifest: Manifest) -> None:
    """Nothing runs yet; a manifest that asks for the proxy gets a warning in the log."""
    if manifest.kms_proxy is not None:
        LOG.warning(
            "kms_proxy is configured (port %d) but this odyn has no KMS proxy yet: the "
            "application's connections to 127.0.0.1:%d will be refused",
            manifest.kms_proxy.listen_port,
            manifest.kms_proxy.listen_port,
        )

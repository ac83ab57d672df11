"""Host plane of EnclaveOps: what runs on the parent instance (docs/architecture.md).

The sleeve, the proxies, the nitro-cli wrapper, the allocator, the enclave lifecycle, the
attestation client and the service state. The build machine's code is in
:mod:`enclave_runtime.build`.
"""

from __future__ import annotations

"""odyn, the supervisor inside the enclave (docs/odyn.md).

``odyn --config-dir DIR -- ARGV...`` serves the application's status (vsock 17000) and log
(vsock 17001), reads ``DIR/enclaver.yaml``, prepares the enclave (loopback up, kernel RNG seeded
from the NSM), starts the services the manifest configures (egress proxy, API, ingress) and then
runs the application, which it supervises until it ends. :mod:`.supervisor` holds the order;
each service lives in its own module and is imported only when the manifest asks for it.
"""

from __future__ import annotations

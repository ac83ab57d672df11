"""The vsock addresses every EnclaveOps component agrees on (docs/vsock.md).

The port numbers are enclaver's, so an enclave built by either tool talks to the other's host
side. An ingress TCP port P travels as vsock port P, so the manifest checks keep ingress ports off
every number reserved here.
"""

from __future__ import annotations

# Parent (CID 3) listens: the enclave's init connects at boot, sends 0xB7 and expects it back.
HEARTBEAT_PORT = 9000
HEARTBEAT = b"\xb7"
# Enclave listens: the init control protocol (docs/init.md), served to allowed peer CIDs only.
INIT_CONTROL_PORT = 9001
# Enclave listens: the application's status as JSON lines.
STATUS_PORT = 17000
# Enclave listens: the application's log, ring-buffer backlog first, then live.
APP_LOG_PORT = 17001
# Parent listens: the egress broker that opens outbound TCP connections for the enclave.
EGRESS_BROKER_PORT = 17002

# What each reserved port is called in messages ("collides with the reserved status port").
RESERVED_PORT_NAMES: dict[int, str] = {
    HEARTBEAT_PORT: "heartbeat",
    INIT_CONTROL_PORT: "init control",
    STATUS_PORT: "status",
    APP_LOG_PORT: "app log",
    EGRESS_BROKER_PORT: "egress broker",
}

# The hypervisor's host; enclaver's odyn dials it, and it reaches the parent instance.
HOST_CID = 2
# The parent EC2 instance as AWS documents it.
PARENT_CID = 3
# Source ports below this need CAP_NET_BIND_SERVICE to bind, on AF_VSOCK as on TCP: what the init
# control server asks of its peers on a parent where every process is CID 3 (docs/init.md).
PRIVILEGED_PORT_LIMIT = 1024
# Where privileged clients pick their source port, as rresvport(3) does.
PRIVILEGED_SOURCE_PORTS = range(1023, 511, -1)
# nitro-cli hands out enclave CIDs from here upward unless one is requested.
FIRST_ENCLAVE_CID = 16

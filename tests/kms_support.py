"""The whole KMS path in one process, shared by unit tests and the bench.

app (boto3) -> odyn's KMS proxy -> odyn's egress proxy -> emulated vsock -> egress broker
(routes) -> emulated IMDS and KMS.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclave_runtime.emulator.aws_endpoints import AwsEndpoints, start_aws_endpoints
from enclave_runtime.emulator.aws_kms import KmsService
from enclave_runtime.emulator.aws_services import write_tls_certificate
from enclave_runtime.emulator.ca import EmulatorCA
from enclave_runtime.formats.attestation import build_attestation_document
from enclave_runtime.formats.manifest import Egress, KmsProxy
from enclave_runtime.host.egress_broker import start_egress_broker
from enclave_runtime.odyn.egress import start_egress_proxy
from enclave_runtime.odyn.kms_proxy import EgressUpstream, KmsProxyServer, start_kms_proxy
from enclave_runtime.transport.vsock import EmulatedFabric

REGION = "us-east-1"
KMS_HOST = f"kms.{REGION}.amazonaws.com"
ENCLAVE_CID = 16
PCR0 = bytes.fromhex("ab" * 48)
KMS_EGRESS = ("169.254.169.254", "kms.*.amazonaws.com")


def pcrs_for(pcr0: bytes) -> dict[int, bytes]:
    pcrs = {index: bytes(48) for index in range(16)}
    pcrs[0] = pcr0
    pcrs[1] = bytes.fromhex("11" * 48)
    pcrs[2] = bytes.fromhex("22" * 48)
    return pcrs


def emulated_attest(ca: EmulatorCA, pcrs: Mapping[int, bytes]) -> Any:
    """What the emulated NSM answers: a document over ``pcrs`` binding the given public key."""

    async def attest(public_key: bytes) -> bytes:
        signer = ca.signer_for("i-emulated-enc0000000000000001")
        return build_attestation_document(
            signing_key=signer.key,
            certificate=signer.certificate,
            cabundle=signer.cabundle,
            module_id="i-emulated-enc0000000000000001",
            timestamp_ms=int(time.time() * 1000),
            pcrs=pcrs,
            public_key=public_key,
        )

    return attest


def tls_pair(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for the emulated KMS's name (and 127.0.0.1)."""
    cert, key = write_tls_certificate(directory, [KMS_HOST])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


@dataclass
class KmsPath:
    endpoints: AwsEndpoints
    proxy: KmsProxyServer
    ca: EmulatorCA
    client_tls: ssl.SSLContext

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def direct_url(self) -> str:
        return f"https://127.0.0.1:{self.endpoints.kms_port}"


@contextlib.asynccontextmanager
async def kms_path(
    fabric_root: Path, workdir: Path, pcrs: Mapping[int, bytes]
) -> AsyncIterator[KmsPath]:
    ca = EmulatorCA(workdir / "ca")
    server_tls, client_tls = tls_pair(workdir)
    endpoints = start_aws_endpoints(KmsService(ca.root.certificate, REGION), server_tls)
    broker = await start_egress_broker(
        backend=EmulatedFabric(fabric_root, 3), routes=endpoints.routes()
    )
    egress = await start_egress_proxy(
        Egress(allow=KMS_EGRESS, proxy_port=0), backend=EmulatedFabric(fabric_root, ENCLAVE_CID)
    )
    assert egress is not None
    upstream = EgressUpstream("127.0.0.1", egress.port, tls=client_tls)
    proxy = await start_kms_proxy(
        KmsProxy(listen_port=0), upstream, emulated_attest(ca, pcrs), port=0
    )
    assert proxy is not None
    try:
        yield KmsPath(endpoints, proxy, ca, client_tls)
    finally:
        await proxy.close()
        await egress.close()
        await broker.close()
        endpoints.close()


def boto_client(endpoint_url: str, verify: Any = None, credentials: Any = None) -> Any:
    """A boto3 KMS client as an application would make it (the proxy ignores its credentials)."""
    import boto3

    creds = credentials or {"aws_access_key_id": "AKIDAPP", "aws_secret_access_key": "app"}
    return boto3.client(
        "kms", region_name=REGION, endpoint_url=endpoint_url, verify=verify, **creds
    )


def imds_credentials(imds_port: int) -> dict[str, str]:
    """The role credentials the emulated IMDS hands out, fetched as an EC2 SDK does (IMDSv2)."""
    import json
    import urllib.request

    base = f"http://127.0.0.1:{imds_port}/latest"
    put = urllib.request.Request(
        base + "/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    )
    with urllib.request.urlopen(put, timeout=10) as answer:
        token = {"X-aws-ec2-metadata-token": answer.read().decode()}
    path = base + "/meta-data/iam/security-credentials/"
    with urllib.request.urlopen(urllib.request.Request(path, headers=token), timeout=10) as answer:
        role = answer.read().decode()
    request = urllib.request.Request(path + role, headers=token)
    with urllib.request.urlopen(request, timeout=10) as answer:
        document = json.loads(answer.read())
    return {
        "access_key": document["AccessKeyId"],
        "secret_key": document["SecretAccessKey"],
        "session_token": document["Token"],
    }

"""KMS Decrypt round trips per second through odyn's KMS proxy, against direct calls to the same
emulated KMS, in one run.

Path through the proxy (tests/kms_support.py): boto3 -> KMS proxy (attestation document from the
emulated NSM, SigV4 re-signing with IMDS credentials) -> egress proxy -> emulated vsock -> broker
-> emulated KMS (TLS, policy pinned to PCR0, CMS envelope) -> proxy opens the envelope. Direct:
boto3 -> the emulated KMS over TLS with the role's credentials. Each Decrypt is sequential, one
client, so the figure is latency-bound; the proxy opens a new egress tunnel and TLS session per
request (as enclaver's does), which the direct client, keeping its connection, does not.

    .venv/bin/python bench/kms.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.kms_support import PCR0, boto_client, imds_credentials, kms_path, pcrs_for

POLICY = (
    '{"Statement": [{"Effect": "Allow", "Action": "kms:Encrypt"}, {"Effect": "Allow", '
    '"Action": "kms:Decrypt", "Condition": {"StringEqualsIgnoreCase": '
    '{"kms:RecipientAttestation:ImageSha384": "' + PCR0.hex() + '"}}}]}'
)
DIRECT_POLICY = '{"Statement": [{"Effect": "Allow", "Action": "kms:*"}]}'


def rate(client: object, blob: bytes, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"bench"  # type: ignore[attr-defined]
    return count / (time.perf_counter() - started)


async def run(count: int, workdir: Path, fabric: Path) -> tuple[float, float]:
    async with kms_path(fabric, workdir, pcrs_for(PCR0)) as path:
        kms = path.endpoints.kms
        pinned = kms.handle("CreateKey", {"Policy": POLICY})["KeyMetadata"]["KeyId"]
        open_key = kms.handle("CreateKey", {"Policy": DIRECT_POLICY})["KeyMetadata"]["KeyId"]
        loop = asyncio.get_running_loop()
        creds = await loop.run_in_executor(None, imds_credentials, path.endpoints.imds_port)
        direct = boto_client(
            path.direct_url,
            verify=str(workdir / "ca.pem"),
            credentials={
                "aws_access_key_id": creds["access_key"],
                "aws_secret_access_key": creds["secret_key"],
                "aws_session_token": creds["session_token"],
            },
        )
        proxied = boto_client(path.proxy_url)
        pinned_blob = direct.encrypt(KeyId=pinned, Plaintext=b"bench")["CiphertextBlob"]
        open_blob = direct.encrypt(KeyId=open_key, Plaintext=b"bench")["CiphertextBlob"]
        via_proxy = await loop.run_in_executor(None, rate, proxied, pinned_blob, count)
        straight = await loop.run_in_executor(None, rate, direct, open_blob, count)
        return via_proxy, straight


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 requests per side, not 200")
    args = parser.parse_args()
    count = 20 if args.quick else 200
    workdir = Path(tempfile.mkdtemp(prefix="kmsb"))
    fabric = Path(tempfile.mkdtemp(prefix="fab", dir="/tmp"))
    try:
        via_proxy, straight = asyncio.run(run(count, workdir, fabric))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(fabric, ignore_errors=True)
    print(f"KMS Decrypt, {count} sequential requests per side (one process, emulated fabric)")
    print(f"  through the KMS proxy (attested): {via_proxy:8.1f} round trips/s")
    print(f"  direct to the emulated KMS:       {straight:8.1f} round trips/s")
    print(f"  proxy / direct:                   {via_proxy / straight:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The native EIF builder on real Docker images: reproducible bytes, PCRs, layout, nitro-cli's CLI.

The test images are built here from the local Debian base with the Docker SDK, without network
(the base comes from scripts/build-base-image.sh). Needs Docker and root (the base image build).
"""

from __future__ import annotations

import datetime
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from enclave_runtime.build.eif_builder import build_eif_from_image
from enclave_runtime.emulator import cli
from enclave_runtime.formats.cpio import CpioEntry, read_archive
from enclave_runtime.formats.eif import EifImage, read_eif
from enclave_runtime.formats.eif_signature import certificate_pcr
from enclave_runtime.host import docker_engine
from enclave_runtime.host.docker_engine import ImageNotFoundError

pytestmark = [pytest.mark.docker, pytest.mark.root]

APP_REPOSITORY = "enclaveops-test/native-builder"
DOCKERFILE = """\
FROM {base}
COPY --chown=1000:1000 hello.txt /app/hello.txt
RUN ln /app/hello.txt /app/hello-link.txt && chmod 4750 /app/hello.txt
ENV GREETING="hello enclave"
WORKDIR /app
ENTRYPOINT ["/bin/echo", "never run by nitro-cli"]
CMD ["/bin/cat", "/app/hello.txt"]
"""


@pytest.fixture(scope="module")
def docker_client() -> Any:
    return docker_engine.docker_client()


@pytest.fixture(scope="module")
def app_images(
    docker_client: Any, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Two images that differ in the content of one file: ``v1`` and ``v2``."""
    tags = {}
    for version, text in (("v1", "hello from v1\n"), ("v2", "hello from v2\n")):
        context = tmp_path_factory.mktemp(f"context-{version}")
        (context / "Dockerfile").write_text(DOCKERFILE.format(base=base_image))
        (context / "hello.txt").write_text(text)
        tag = f"{APP_REPOSITORY}:{version}"
        docker_client.images.build(
            path=str(context), tag=tag, rm=True, forcerm=True, pull=False, network_mode="none"
        )
        tags[version] = tag
    yield tags
    for tag in tags.values():
        docker_client.images.remove(tag, force=True)


def _build(reference: str, output: Path, **options: Any) -> EifImage:
    measurements = build_eif_from_image(reference, output, **options)
    image = read_eif(output)
    assert image.crc_ok
    assert image.measurements == measurements
    return image


def _ramdisk(image: EifImage, index: int) -> list[CpioEntry]:
    with image.open_section(image.ramdisk_sections()[index]) as section:
        return read_archive(section.read())


def test_the_same_image_builds_byte_identical_eifs(app_images: dict[str, str], tmp_path) -> None:
    first = _build(app_images["v1"], tmp_path / "first.eif")
    second = _build(app_images["v1"], tmp_path / "second.eif")

    assert (tmp_path / "first.eif").read_bytes() == (tmp_path / "second.eif").read_bytes()
    assert first.measurements == second.measurements


def test_changing_one_file_changes_pcr0_and_pcr2_but_not_pcr1(
    app_images: dict[str, str], tmp_path
) -> None:
    v1 = _build(app_images["v1"], tmp_path / "v1.eif").measurements
    v2 = _build(app_images["v2"], tmp_path / "v2.eif").measurements

    assert v1.pcr0 != v2.pcr0
    assert v1.pcr2 != v2.pcr2
    assert v1.pcr1 == v2.pcr1


def test_the_ramdisks_are_laid_out_as_nitro_cli_lays_them_out(
    app_images: dict[str, str], tmp_path
) -> None:
    image = _build(app_images["v1"], tmp_path / "app.eif")
    bootstrap = _ramdisk(image, 0)
    customer = _ramdisk(image, 1)
    by_name = {entry.name: entry for entry in customer}
    names = [entry.name for entry in customer]

    assert [(e.name, e.kind, e.permissions) for e in bootstrap] == [
        ("dev", "directory", 0o755),
        ("init", "file", 0o755),
        ("nsm.ko", "file", 0o755),
    ]
    assert names[:3] == ["cmd", "env", "rootfs"]
    assert names == sorted(names, key=lambda name: name.encode())
    # nitro-cli runs CMD alone when the image has ENTRYPOINT and CMD.
    assert by_name["cmd"].data == b"/bin/cat\n/app/hello.txt\n"
    assert b"GREETING=hello enclave\n" in by_name["env"].data
    hello, link = by_name["rootfs/app/hello.txt"], by_name["rootfs/app/hello-link.txt"]
    assert (hello.uid, hello.gid, hello.permissions) == (1000, 1000, 0o4750)
    assert (hello.ino, hello.nlink) == (link.ino, 2)
    assert hello.data + link.data == b"hello from v1\n"
    null = by_name["rootfs/dev/null"]  # debootstrap's device node, kept as a node
    assert (null.kind, null.rdevmajor, null.rdevminor, null.size) == ("char", 1, 3, 0)
    assert by_name["rootfs/etc/hosts"].data.startswith(b"127.0.0.1       localhost\n")
    assert by_name["rootfs/etc/resolv.conf"].data == b"\n# no resolv.conf configured\n"
    for left_out in ("rootfs/.dockerenv", "rootfs/etc/hostname", "rootfs/dev/console"):
        assert left_out not in by_name
    for directory in ("dev", "proc", "run", "sys", "tmp", "var"):
        assert by_name[f"rootfs/{directory}"].kind == "directory"
    assert by_name["rootfs/tmp"].permissions == stat.S_ISVTX | 0o777  # the image's mode
    assert {by_name[name].mtime for name in names if by_name[name].kind == "directory"} == {0}
    assert by_name["rootfs/usr/bin/bash"].mtime > 0  # file times are the image's own


def test_nitro_emu_build_enclave_prints_nitro_cli_json(
    app_images: dict[str, str], tmp_path, capsys
) -> None:
    output = tmp_path / "app.eif"

    status = cli.main(
        [
            "--root",
            str(tmp_path / "emu"),
            "build-enclave",
            "--docker-uri",
            app_images["v1"],
            "--output-file",
            str(output),
        ]
    )

    printed = capsys.readouterr()
    assert status == 0
    assert printed.err == (
        "Start building the Enclave Image...\n"
        "Using the locally available Docker image...\n"
        "Enclave Image successfully created.\n"
    )
    image = read_eif(output)
    assert json.loads(printed.out) == {"Measurements": image.measurements.to_nitro_cli()}
    assert printed.out.startswith('{\n  "Measurements": {\n    "HashAlgorithm": "Sha384 { ... }"')
    assert image.metadata is not None
    assert image.metadata.image_name == APP_REPOSITORY
    docker_id = image.metadata.docker_info["Id"]
    assert image.metadata.image_version == docker_id.removeprefix("sha256:")


def test_a_signed_build_carries_pcr8_of_the_certificate(
    app_images: dict[str, str], tmp_path
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "enclaveops test signer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    image = _build(
        app_images["v1"],
        tmp_path / "signed.eif",
        signing_certificate=cert_path,
        private_key=key_path,
    )

    assert image.is_signed
    assert image.signature_check is not None and image.signature_check.valid
    assert image.measurements.pcr8 == certificate_pcr(cert_path.read_bytes())


def test_a_missing_image_is_not_pulled_unless_asked(docker_client: Any, tmp_path) -> None:
    with pytest.raises(ImageNotFoundError, match="not present locally"):
        build_eif_from_image(f"{APP_REPOSITORY}:never-built", tmp_path / "x.eif")

    assert not (tmp_path / "x.eif").exists()


def test_nitro_emu_maps_a_failed_pull_to_e50(tmp_path, capsys) -> None:
    # Port 1 on loopback refuses at once: the pull fails without leaving the machine.
    status = cli.main(
        [
            "--root",
            str(tmp_path / "emu"),
            "build-enclave",
            "--docker-uri",
            "localhost:1/enclaveops/missing:never",
            "--output-file",
            str(tmp_path / "x.eif"),
        ]
    )

    err = capsys.readouterr().err
    assert status == 50
    assert "[ E50 ] Docker image pull error." in err
    assert "localhost:1/enclaveops/missing:never" in err
    assert not (tmp_path / "x.eif").exists()

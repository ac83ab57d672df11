"""The effective deployment of a manifest (what manifest_info returns and the enclave role uses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclave_runtime.formats.manifest import ManifestError
from enclave_runtime.host.deployment import effective_deployment
from enclave_runtime.host.sleeve_container import SleeveContainerError

MINIMAL = """\
version: v1
name: app
target: app-release:1
sources:
  app: app:1
ingress:
  - listen_port: 8080
  - listen_port: 9101
api:
  listen_port: 9100
aux_api: {}
"""


def _manifest(tmp_path: Path, text: str = MINIMAL) -> Path:
    path = tmp_path / "enclaver.yaml"
    path.write_text(text)
    return path


def test_aux_api_without_a_port_is_the_api_port_plus_one(tmp_path: Path) -> None:
    deployment = effective_deployment(_manifest(tmp_path))
    assert deployment["api_port"] == 9100
    assert deployment["aux_api_port"] == 9101
    assert deployment["aux_api_host_port"] == 9101
    assert deployment["app_port"] == 8080


def test_a_manifest_without_defaults_gets_the_runtime_defaults(tmp_path: Path) -> None:
    deployment = effective_deployment(_manifest(tmp_path))
    assert (deployment["cpu_count"], deployment["memory_mb"]) == (2, 4096)


def test_ingress_ports_are_published_on_the_same_host_port_by_default(tmp_path: Path) -> None:
    deployment = effective_deployment(_manifest(tmp_path))
    assert deployment["ingress_ports"] == [8080, 9101]
    assert deployment["published_ports"] == ["8080:8080", "9101:9101"]


def test_published_ports_give_the_host_side(tmp_path: Path) -> None:
    deployment = effective_deployment(_manifest(tmp_path), ["127.0.0.1:18080:8080", "19101:9101"])
    assert deployment["published_ports"] == ["127.0.0.1:18080:8080", "19101:9101"]
    assert (deployment["app_host_port"], deployment["aux_api_host_port"]) == (18080, 19101)


def test_a_port_published_by_no_binding_has_no_host_port(tmp_path: Path) -> None:
    deployment = effective_deployment(_manifest(tmp_path), ["18080:8080"])
    assert deployment["aux_api_host_port"] is None


def test_a_malformed_binding_is_refused_with_the_format(tmp_path: Path) -> None:
    with pytest.raises(SleeveContainerError, match="HOST:CONTAINER"):
        effective_deployment(_manifest(tmp_path), ["8080"])


def test_names_sources_services_and_signing_files_come_from_the_manifest(
    tmp_path: Path,
) -> None:
    text = MINIMAL + (
        "defaults:\n  cpu_count: 4\n  memory_mb: 2048\n"
        "signature:\n  certificate: keys/cert.pem\n  key: keys/key.pem\n"
        "services:\n  units:\n    worker:\n      ExecStart: /bin/true\n"
    )
    deployment = effective_deployment(_manifest(tmp_path, text))
    assert deployment["name"] == "app"
    assert deployment["target"] == "app-release:1"
    assert deployment["sources"] == {"app": "app:1", "odyn": None, "sleeve": None}
    assert (deployment["cpu_count"], deployment["memory_mb"]) == (4, 2048)
    assert deployment["services"] == ["worker"]
    assert deployment["signing_files"] == ["keys/cert.pem", "keys/key.pem"]
    assert deployment["signing_key"] == "keys/key.pem"


def test_an_invalid_manifest_fails_with_the_runtimes_message(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="name"):
        effective_deployment(_manifest(tmp_path, MINIMAL.replace("name: app\n", "")))

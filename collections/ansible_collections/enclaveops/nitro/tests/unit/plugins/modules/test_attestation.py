"""enclaveops.nitro.attestation: fetch and verify, never changed, fail with the failed check."""

from __future__ import annotations

import pytest
from ansible_collections.enclaveops.nitro.plugins.modules import attestation
from ansible_collections.enclaveops.nitro.tests.unit.plugins.modules.fake_aux_api import (
    PCRS,
    FakeAuxApi,
)


@pytest.fixture
def emulator_root(tmp_path_factory):
    # Short: fabric paths are Unix socket paths.
    return tmp_path_factory.mktemp("e", numbered=True)


@pytest.fixture
def aux(emulator_root):
    api = FakeAuxApi(emulator_root / "ca")
    yield api
    api.close()


def test_verifies_by_url_against_the_emulator_root(run_module, aux, emulator_root) -> None:
    url = aux.serve_tcp()
    measurements = {"HashAlgorithm": "Sha384 { ... }", "PCR0": PCRS[0].hex()}
    result = run_module(
        attestation.main,
        dict(url=url, emulator_root=str(emulator_root), expected_pcrs=measurements),
        check_mode=True,
    )
    assert result["changed"] is False
    assert result["verified"] is True
    assert result["document"]["pcrs"]["0"] == PCRS[0].hex()
    assert result["source"] == url + "/v1/attestation"


def test_the_nonce_given_is_sent_and_returned(run_module, aux, emulator_root) -> None:
    url = aux.serve_tcp()
    result = run_module(
        attestation.main, dict(url=url, emulator_root=str(emulator_root), nonce="0xc0ffee")
    )
    assert result["document"]["nonce"] == "c0ffee"
    assert aux.requests == [{"nonce": "wP/u"}]


def test_by_cid_and_port_over_the_emulator_fabric(run_module, aux, emulator_root) -> None:
    aux.serve_fabric(emulator_root, 16, 9001)
    result = run_module(
        attestation.main, dict(enclave_cid=16, port=9001, emulator_root=str(emulator_root))
    )
    assert result["verified"] is True
    assert result["source"] == "vsock(16:9001)/v1/attestation"


def test_a_wrong_expected_pcr_fails_naming_the_check(run_module, aux, emulator_root) -> None:
    url = aux.serve_tcp()
    result = run_module(
        attestation.main,
        dict(url=url, emulator_root=str(emulator_root), expected_pcrs={"0": "00" * 48}),
    )
    assert result["failed"]
    assert result["changed"] is False
    assert result["check"] == "pcr 0"
    assert result["msg"].startswith("attestation failed: pcr 0")


def test_an_unreachable_enclave_fails_marked_retryable(run_module, aux, emulator_root) -> None:
    url = aux.serve_tcp()
    aux.error = (503, "Internal API service unavailable")
    result = run_module(
        attestation.main,
        dict(url=url, emulator_root=str(emulator_root), wait=True, wait_timeout=0),
    )
    assert result["failed"]
    assert result["retryable"] is True
    assert "answered 503 Service Unavailable" in result["msg"]


def test_a_document_that_does_not_verify_is_not_retryable(run_module, aux, emulator_root) -> None:
    url = aux.serve_tcp()
    result = run_module(
        attestation.main,
        dict(url=url, emulator_root=str(emulator_root), expected_pcrs={"0": "00" * 48}, wait=True),
    )
    assert result["failed"]
    assert result["retryable"] is False


def test_without_emulator_root_the_aws_root_is_pinned(run_module, aux) -> None:
    result = run_module(attestation.main, dict(url=aux.serve_tcp()))
    assert result["failed"]
    assert result["check"] == "certificate chain"


def test_url_and_cid_are_exclusive(run_module) -> None:
    result = run_module(attestation.main, dict(url="http://127.0.0.1:1", enclave_cid=16, port=1))
    assert result["failed"]
    assert "mutually exclusive" in result["msg"]

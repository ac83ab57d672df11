"""Fetching attestations from an enclave's aux API (by URL, or by CID and port) and verifying them.

The enclave side is the collection's fake aux API: real documents, signed by an emulator CA with
the caller's nonce, served over loopback TCP or the emulated fabric.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclave_runtime.formats.attestation import AttestationError
from enclave_runtime.host.attestation_client import (
    AttestationFetchError,
    AttestationInputError,
    AttestationSource,
    attest,
    attest_waiting,
    load_root,
    parse_expected_pcrs,
    parse_nonce,
)
from enclave_runtime.transport.vsock import EmulatedFabric
from tests.conftest import REPO_ROOT

FAKE_PATH = (
    REPO_ROOT
    / "collections/ansible_collections/enclaveops/nitro/tests/unit/plugins/modules"
    / "fake_aux_api.py"
)
_spec = importlib.util.spec_from_file_location("fake_aux_api", FAKE_PATH)
assert _spec is not None and _spec.loader is not None
fake_aux_api = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_aux_api)

PCR0_HEX = fake_aux_api.PCRS[0].hex()


@pytest.fixture
def aux(fabric_root: Path) -> Iterator[object]:
    api = fake_aux_api.FakeAuxApi(fabric_root / "ca")
    yield api
    api.close()


@pytest.fixture
def url(aux) -> str:
    return aux.serve_tcp()


def test_a_document_from_the_url_verifies_with_the_nonce_sent(aux, url) -> None:
    nonce = bytes(range(32))
    result = attest(
        AttestationSource(url=url),
        nonce=nonce,
        root=load_root(aux.root_pem),
        expected_pcrs={0: fake_aux_api.PCRS[0]},
    )
    assert aux.requests == [{"nonce": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}]
    summary = result.summary()
    assert summary["nonce"] == nonce.hex()
    assert summary["pcrs"]["0"] == PCR0_HEX
    assert summary["module_id"] == fake_aux_api.MODULE_ID
    assert result.source == url + "/v1/attestation"


def test_a_random_nonce_is_sent_when_none_is_given(aux, url) -> None:
    first = attest(AttestationSource(url=url), root=load_root(aux.root_pem))
    second = attest(AttestationSource(url=url), root=load_root(aux.root_pem))
    assert len(first.nonce) == 32
    assert first.nonce != second.nonce


def test_nitro_cli_measurements_are_accepted_as_expected_pcrs(aux, url) -> None:
    measurements = {
        "HashAlgorithm": "Sha384 { ... }",
        "PCR0": PCR0_HEX,
        "PCR1": fake_aux_api.PCRS[1].hex(),
    }
    expected = parse_expected_pcrs(measurements)
    assert sorted(expected) == [0, 1]
    attest(AttestationSource(url=url), root=load_root(aux.root_pem), expected_pcrs=expected)


def test_a_wrong_expected_pcr_fails_naming_the_pcr(aux, url) -> None:
    with pytest.raises(AttestationError) as caught:
        attest(
            AttestationSource(url=url),
            root=load_root(aux.root_pem),
            expected_pcrs=parse_expected_pcrs({"0": "00" * 48}),
        )
    assert caught.value.check == "pcr 0"


def test_the_aws_root_does_not_trust_an_emulator_document(url) -> None:
    with pytest.raises(AttestationError) as caught:
        attest(AttestationSource(url=url))
    assert caught.value.check == "certificate chain"
    assert "is not the pinned root" in str(caught.value)


def test_a_replayed_document_fails_on_the_nonce(aux, url) -> None:
    aux.replayed_nonce = b"an old nonce"
    with pytest.raises(AttestationError) as caught:
        attest(AttestationSource(url=url), root=load_root(aux.root_pem))
    assert caught.value.check == "nonce"


def test_an_api_error_is_reported_with_its_message(aux, url) -> None:
    aux.error = (503, "Internal API service unavailable")
    with pytest.raises(AttestationFetchError) as caught:
        attest(AttestationSource(url=url), root=load_root(aux.root_pem))
    assert "answered 503 Service Unavailable: Internal API service unavailable" in str(caught.value)


def test_nothing_listening_says_what_to_check() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(AttestationFetchError) as caught:
        attest(AttestationSource(url=f"http://127.0.0.1:{port}"))
    message = str(caught.value)
    assert f"cannot fetch an attestation from http://127.0.0.1:{port}/v1/attestation" in message
    assert "aux API" in message


def test_by_cid_and_port_over_the_fabric(aux, fabric_root) -> None:
    aux.serve_fabric(fabric_root, 16, 9001)
    result = attest(
        AttestationSource(enclave_cid=16, port=9001),
        root=load_root(aux.root_pem),
        expected_pcrs={2: fake_aux_api.PCRS[2]},
        fabric=EmulatedFabric(fabric_root),
    )
    assert result.source == "vsock(16:9001)/v1/attestation"
    assert result.summary()["pcrs"]["2"] == fake_aux_api.PCRS[2].hex()


def test_by_cid_with_no_listener_points_at_ingress(fabric_root) -> None:
    with pytest.raises(AttestationFetchError) as caught:
        attest(AttestationSource(enclave_cid=16, port=9001), fabric=EmulatedFabric(fabric_root))
    assert "ingress listen_port that forwards to the aux API" in str(caught.value)


def test_source_is_a_url_or_a_cid_and_port() -> None:
    with pytest.raises(AttestationInputError, match="either url"):
        AttestationSource(url="http://127.0.0.1:1", enclave_cid=16, port=1)
    with pytest.raises(AttestationInputError, match="either url"):
        AttestationSource()
    with pytest.raises(AttestationInputError, match="go together"):
        AttestationSource(enclave_cid=16)


def test_a_url_must_be_http() -> None:
    with pytest.raises(AttestationInputError, match="is not an http:// or https:// URL"):
        attest(AttestationSource(url="127.0.0.1:18001"))


@pytest.mark.parametrize(
    ("pcrs", "message"),
    [
        ({"PCR32": "00" * 48}, "is not a PCR index: write 0 to 31"),
        ({"PCR²": "00" * 48}, "in ASCII digits"),
        ({"٣": "00" * 48}, "in ASCII digits"),
        ({True: "00" * 48}, "is a bool"),
        ({"first": "00" * 48}, "is not a PCR index"),
        ({0: "abc"}, "expected PCR 0 is not 96 hex digits"),
        ({0: "00" * 32}, "expected PCR 0 is not 96 hex digits"),
    ],
)
def test_bad_expected_pcrs_name_the_entry(pcrs, message) -> None:
    with pytest.raises(AttestationInputError) as caught:
        parse_expected_pcrs(pcrs)
    assert message in str(caught.value)


def test_nonce_is_hex_of_a_usable_length() -> None:
    assert parse_nonce("0x0a1b") == b"\x0a\x1b"
    with pytest.raises(AttestationInputError, match="not hex"):
        parse_nonce("xyz")
    assert parse_nonce("00" * 1024) == bytes(1024)
    with pytest.raises(AttestationInputError, match="give 1 to 1024 bytes"):
        parse_nonce("00" * 1025)


def test_a_missing_root_file_names_the_emulator_location(tmp_path) -> None:
    with pytest.raises(AttestationInputError) as caught:
        load_root(tmp_path / "root.pem")
    assert "for the emulator it is <emulator_root>/ca/root.pem" in str(caught.value)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_waiting_asks_again_while_the_enclave_cannot_be_reached(aux, url) -> None:
    clock = _Clock()
    aux.error = (503, "Internal API service unavailable")

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        aux.error = None  # the enclave's odyn listens now

    result = attest_waiting(
        AttestationSource(url=url),
        10,
        root=load_root(aux.root_pem),
        clock=lambda: clock.now,
        sleep=sleep,
    )
    assert result.verified.document.pcrs[0] == fake_aux_api.PCRS[0]
    assert clock.now == 2.0


def test_waiting_ends_with_the_last_reach_error_marked_retryable(aux, url) -> None:
    clock = _Clock()
    aux.error = (503, "Internal API service unavailable")
    with pytest.raises(AttestationFetchError) as caught:
        attest_waiting(
            AttestationSource(url=url),
            5,
            root=load_root(aux.root_pem),
            clock=lambda: clock.now,
            sleep=clock.sleep,
        )
    assert caught.value.retryable is True
    assert clock.now == 6.0


def test_waiting_does_not_retry_a_document_that_does_not_verify(aux, url) -> None:
    clock = _Clock()
    aux.replayed_nonce = b"an old nonce"
    with pytest.raises(AttestationError) as caught:
        attest_waiting(
            AttestationSource(url=url),
            10,
            root=load_root(aux.root_pem),
            clock=lambda: clock.now,
            sleep=clock.sleep,
        )
    assert caught.value.check == "nonce"
    assert not getattr(caught.value, "retryable", False)
    assert clock.now == 0.0

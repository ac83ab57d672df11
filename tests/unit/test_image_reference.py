"""Digest references (``repository[:tag]@sha256:…``) and push destinations: what a fleet pulls
by must parse exactly, and anything else is refused before a registry is asked."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclave_runtime.formats.image_reference import (
    DigestReference,
    ImageReferenceError,
    parse_digest_reference,
    parse_repository,
)

DIGEST = "sha256:" + "ab" * 32

components = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,8}){0,2}", fullmatch=True)
hosts = st.one_of(
    st.none(),
    st.sampled_from(
        ["127.0.0.1:5000", "registry.example", "123456789012.dkr.ecr.eu-west-1.amazonaws.com"]
    ),
)
tags = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True))
hexes = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@given(hosts, st.lists(components, min_size=1, max_size=3), tags, hexes)
def test_every_well_formed_reference_parses_into_its_parts(host, path, tag, hex_digest) -> None:
    repository = "/".join(([host] if host else []) + path)
    text = repository + (f":{tag}" if tag else "") + f"@sha256:{hex_digest}"
    parsed = parse_digest_reference(text)
    assert parsed == DigestReference(repository, f"sha256:{hex_digest}", tag)
    assert str(parsed) == f"{repository}@sha256:{hex_digest}"
    assert parsed.short_digest == hex_digest[:12]


@given(st.text(alphabet=string.hexdigits, max_size=80).filter(lambda h: len(h) != 64))
def test_a_digest_of_the_wrong_length_is_refused(hex_digest: str) -> None:
    with pytest.raises(ImageReferenceError, match="is not sha256: followed by 64"):
        parse_digest_reference(f"127.0.0.1:5000/hello@sha256:{hex_digest}")


@given(st.text(max_size=60))
def test_any_text_either_parses_or_is_refused_with_the_form(text: str) -> None:
    try:
        parsed = parse_digest_reference(text)
    except ImageReferenceError as err:
        assert "REPOSITORY@sha256:" in str(err)
    else:
        assert text.endswith(parsed.digest)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("127.0.0.1:5000/hello", "has no @sha256: digest"),
        ("127.0.0.1:5000/hello:1.0", "has no @sha256: digest"),
        ("hello@sha512:" + "ab" * 64, "is not sha256: followed by 64"),
        ("hello@sha256:" + "AB" * 32, "is not sha256: followed by 64"),
        ("hello@" + "ab" * 32, "is not sha256: followed by 64"),
        ("Hello@" + DIGEST, "is not a repository name"),
        ("@" + DIGEST, "is not a repository name"),
        ("a//b@" + DIGEST, "is not a repository name"),
        ("hello:-x@" + DIGEST, "is not a Docker tag"),
    ],
)
def test_malformed_references_say_what_is_wrong(text: str, said: str) -> None:
    with pytest.raises(ImageReferenceError, match=said):
        parse_digest_reference(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.231.0.1:5000/hello", ("10.231.0.1:5000/hello", None)),
        ("10.231.0.1:5000/hello:1.0", ("10.231.0.1:5000/hello", "1.0")),
        (
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/apps/hello:v2",
            ("123456789012.dkr.ecr.eu-west-1.amazonaws.com/apps/hello", "v2"),
        ),
    ],
)
def test_push_destinations_split_the_tag_not_the_port(text: str, expected: tuple) -> None:
    assert parse_repository(text) == expected


@pytest.mark.parametrize("text", ["hello@" + DIGEST, "Hello", "", "a/:b"])
def test_a_bad_push_destination_names_the_option(text: str) -> None:
    with pytest.raises(ImageReferenceError, match="push_repository"):
        parse_repository(text)

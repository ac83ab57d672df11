"""Image references pinned by registry digest: ``repository[:tag]@sha256:<64 hex>``.

A fleet deploys what a build record names, and a record names the release image by the digest
the registry gave its manifest (``RepoDigests``), never by a tag that can move. The grammar is
the one of the distribution reference (docs/build.md, "Pull by digest"): an optional registry
host (with a port), path components of lower-case letters and digits joined by ``.``, ``_``,
``__`` or dashes, an optional tag, and a SHA-256 digest. Anything else is refused here, before a
pull asks a registry for it.
"""

from __future__ import annotations

import dataclasses
import re

from enclave_runtime.errors import FormatError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_HOST_COMPONENT}(?:\.{_HOST_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_REPOSITORY = re.compile(rf"^(?:(?P<host>{_HOST})/)?{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_FIX = "write it as REPOSITORY@sha256:<64 lower-case hex digits>, the repo_digest a push returned"


class ImageReferenceError(FormatError):
    """An image reference that is not ``repository[:tag]@sha256:<digest>``."""


@dataclasses.dataclass(frozen=True)
class DigestReference:
    """A release image as a registry serves it: repository, optional tag, manifest digest."""

    repository: str
    digest: str  # sha256:<64 hex>
    tag: str | None = None

    def __str__(self) -> str:
        """``repository@digest``: the tag is left out, the digest alone decides what is pulled."""
        return f"{self.repository}@{self.digest}"

    @property
    def short_digest(self) -> str:
        """The first 12 hex digits of the digest, as Docker abbreviates IDs."""
        return self.digest.split(":", 1)[1][:12]


def parse_digest_reference(text: str) -> DigestReference:
    """``repository[:tag]@sha256:<64 hex>`` parsed, or ImageReferenceError naming what is wrong."""
    if not isinstance(text, str) or "@" not in text:
        raise ImageReferenceError(f"image reference {text!r:.200} has no @sha256: digest; {_FIX}")
    name, _, digest = text.rpartition("@")
    if not _DIGEST.match(digest):
        raise ImageReferenceError(
            f"image reference {text!r:.200}: the digest {digest!r:.80} is not sha256: followed "
            f"by 64 lower-case hex digits; {_FIX}"
        )
    repository, tag = split_tag(name)
    if not _REPOSITORY.match(repository) or len(repository) > 255:
        raise ImageReferenceError(
            f"image reference {text!r:.200}: {repository!r:.200} is not a repository name "
            "([HOST[:PORT]/]path, lower-case letters, digits and . _ - separators); " + _FIX
        )
    if tag is not None and not _TAG.match(tag):
        raise ImageReferenceError(
            f"image reference {text!r:.200}: the tag {tag!r:.140} is not a Docker tag "
            "(letters, digits, _ . -, at most 128, not starting with . or -); " + _FIX
        )
    return DigestReference(repository, digest, tag)


def parse_digest(text: str, field: str = "expected_digest") -> str:
    """A registry digest alone, ``sha256:<64 lower-case hex>``; ImageReferenceError naming
    ``field`` otherwise."""
    if not isinstance(text, str) or not _DIGEST.match(text):
        raise ImageReferenceError(
            f"{field} {text!r:.120} is not sha256: followed by 64 lower-case hex digits; use the "
            "build record's image.digest"
        )
    return text


def parse_repository(text: str, field: str = "push_repository") -> tuple[str, str | None]:
    """``[HOST[:PORT]/]path[:tag]`` (no digest: where to push), split into repository and tag."""
    repository, tag = split_tag(text) if isinstance(text, str) else ("", None)
    if "@" in text or not _REPOSITORY.match(repository) or len(repository) > 255:
        raise ImageReferenceError(
            f"{field} {text!r:.200} is not a repository to push to: write "
            "[HOST[:PORT]/]path[:tag] in lower case, e.g. 10.0.0.1:5000/hello or "
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/hello:1.0, without a digest"
        )
    if tag is not None and not _TAG.match(tag):
        raise ImageReferenceError(
            f"{field} {text!r:.200}: the tag {tag!r:.140} is not a Docker tag (letters, digits, "
            "_ . -, at most 128, not starting with . or -)"
        )
    return repository, tag


def split_tag(name: str) -> tuple[str, str | None]:
    """``repository[:tag]`` split; a colon before the last slash belongs to a registry port."""
    head, colon, tail = name.rpartition(":")
    if not colon or "/" in tail:
        return name, None
    return head, tail


def is_digest_reference(text: str) -> bool:
    """Whether ``text`` is pinned by a registry digest (it may still be malformed)."""
    return "@" in text and text.rpartition("@")[2].startswith("sha256:")

"""Fixtures of the end-to-end tests: the local Debian base image every test image starts from.

The image is built once per machine from Debian packages (scripts/build-base-image.sh, debootstrap
+ docker import, no registry); the script returns at once when the tag exists.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import REPO_ROOT

BASE_IMAGE = "enclaveops/debian-base:bookworm"


@pytest.fixture(scope="session")
def base_image() -> str:
    """The tag of the local base image, built first if this machine lacks it (needs root)."""
    script = REPO_ROOT / "scripts" / "build-base-image.sh"
    result = subprocess.run(
        [str(script), BASE_IMAGE], capture_output=True, text=True, timeout=900, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"{script} failed (exit {result.returncode}):\n{result.stderr}")
    return BASE_IMAGE

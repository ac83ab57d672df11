"""The enclave runtime as a directory of Python packages, ready to add to an image.

``bundle_runtime(target)`` copies the ``enclave_runtime`` package and every installed
distribution it needs at run time (the closure of its requirements, extras excluded) from the
running Python environment into ``target``, so that ``PYTHONPATH=target`` runs odyn in an image
whose Python has the same version and ABI (compiled wheels are copied as they are installed).
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

import enclave_runtime
from enclave_runtime.errors import EnclaveOpsError

RUNTIME_DISTRIBUTION = "enclave-runtime"


class BundleError(EnclaveOpsError):
    """The runtime's dependencies are not installed in this environment."""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_requirements(requirements: list[str] | None) -> Iterator[str]:
    """Names of the requirements that apply to this interpreter, without extras.

    Markers are evaluated for the running Python, which must be the image's Python version.
    """
    for text in requirements or ():
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            yield requirement.name


def runtime_distributions(root: str = RUNTIME_DISTRIBUTION) -> list[metadata.Distribution]:
    """The installed distributions ``root`` needs at run time, ``root`` excluded, sorted."""
    found: dict[str, metadata.Distribution] = {}
    pending = list(_runtime_requirements(metadata.requires(root)))
    while pending:
        name = _normalise(pending.pop())
        if name in found:
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError as err:
            raise BundleError(
                f"{name}, needed by {root}, is not installed in {sys.prefix}; "
                f"install {root} there first"
            ) from err
        found[name] = distribution
        pending.extend(_runtime_requirements(distribution.requires))
    return [found[name] for name in sorted(found)]


def _copy_distribution(distribution: metadata.Distribution, target: Path) -> None:
    for file in distribution.files or ():
        if file.parts[0] == ".." or "__pycache__" in file.parts:
            continue  # scripts outside site-packages, and caches of this host's interpreter
        source = Path(str(distribution.locate_file(file)))
        if source.is_file():
            destination = target / file
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)


def bundle_runtime(target: Path) -> list[str]:
    """Copy enclave_runtime and its run-time dependencies into ``target``; return their names."""
    target.mkdir(parents=True, exist_ok=True)
    distributions = runtime_distributions()
    for distribution in distributions:
        _copy_distribution(distribution, target)
    package = Path(enclave_runtime.__file__).parent  # the source itself, editable installs too
    shutil.copytree(
        package, target / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return [RUNTIME_DISTRIBUTION] + [d.metadata["Name"] for d in distributions]

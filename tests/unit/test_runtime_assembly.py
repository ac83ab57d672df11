"""The slimmed runtime (images/runtime/assemble.py) keeps every module enclave_runtime imports.

Each ``import`` statement of the package, at any depth (lazy imports included), is checked
against what the assembly leaves out of the standard library and of the bundled distributions:
a new import of a left-out module fails here, before an enclave fails on it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.unit.test_project_images import _assemble_module

# The runtime image ships its own Python 3.11 (docs/images.md): the leave-out list is checked
# against that stdlib, and sys.stdlib_module_names exists from 3.10.
pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 10), reason="the runtime image's stdlib is Python 3.11's"
)

PACKAGE = REPO_ROOT / "enclave_runtime"
assemble = _assemble_module()


def imported_modules() -> Iterator[tuple[Path, str]]:
    """(file, dotted module) for every absolute import in enclave_runtime, ``from A import b``
    giving both ``A`` and ``A.b`` (``b`` may be a module)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                yield from ((path, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield path, node.module
                yield from ((path, f"{node.module}.{alias.name}") for alias in node.names)


def _left_out_of_stdlib(top: str) -> bool:
    names = {entry.removesuffix(".py") for entry in assemble.STDLIB_LEFT_OUT}
    return top in names or assemble.DYNLOAD_LEFT_OUT.match(f"{top}.") is not None


def test_no_import_needs_a_left_out_standard_module() -> None:
    missing = [
        f"{path.relative_to(REPO_ROOT)}: {module}"
        for path, module in imported_modules()
        if module.split(".")[0] in sys.stdlib_module_names
        and _left_out_of_stdlib(module.split(".")[0])
    ]
    assert not missing, "the runtime leaves these out (images/runtime/assemble.py):\n" + "\n".join(
        missing
    )


def _shipped(module: str) -> bool:
    """Whether the module's file (or its package's) is kept by SITE_PACKAGES_KEPT."""
    base = Path(*module.split("."))
    candidates = [base.with_suffix(".py"), base / "__init__.py"]
    return any(assemble._kept(candidate) for candidate in candidates)


@pytest.mark.parametrize("distribution", sorted(assemble.SITE_PACKAGES_KEPT))
def test_the_partly_kept_distributions_keep_what_is_imported(distribution: str) -> None:
    imported = {module for _, module in imported_modules() if module.split(".")[0] == distribution}
    assert imported, f"nothing imports {distribution}: bundle none of it"
    # "from Crypto.Hash import keccak" names a module; a name inside one is kept with it.
    missing = [
        module
        for module in sorted(imported)
        if not _shipped(module) and not _shipped(module.rpartition(".")[0])
    ]
    assert not missing


def test_the_keccak_files_are_kept_and_the_rest_of_pycryptodome_is_not() -> None:
    kept = assemble._kept
    assert kept(Path("Crypto/Hash/keccak.py"))
    assert kept(Path("Crypto/Hash/_keccak.abi3.so"))
    assert kept(Path("Crypto/Util/_raw_api.py"))
    assert not kept(Path("Crypto/Cipher/_raw_aes.abi3.so"))
    assert not kept(Path("Crypto/Hash/SHA256.py"))
    assert kept(Path("cryptography/hazmat/bindings/_rust.abi3.so"))  # other distributions whole


def test_botocore_keeps_its_code_and_top_data_but_no_service_model() -> None:
    kept = assemble._kept
    assert kept(Path("botocore/auth.py"))
    assert kept(Path("botocore/data/endpoints.json"))
    assert not kept(Path("botocore/data/kms/2014-11-01/service-2.json.gz"))

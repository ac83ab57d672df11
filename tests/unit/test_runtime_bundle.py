"""The runtime bundle: enclave_runtime and exactly the run-time dependencies this Python needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from enclave_runtime.build.runtime_bundle import _runtime_requirements, bundle_runtime


def test_markers_are_evaluated_for_this_interpreter_and_extras_left_out() -> None:
    requirements = [
        "PyYAML>=6.0",
        "tomli>=1.1; python_version < '3.0'",
        "docker>=7.0; extra == 'host'",
        "cbor2>=5.6; python_version >= '3.0'",
    ]
    assert list(_runtime_requirements(requirements)) == ["PyYAML", "cbor2"]


def test_the_bundle_imports_odyn_in_a_clean_interpreter(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    names = bundle_runtime(lib)
    assert {"enclave-runtime", "cbor2", "cryptography", "PyYAML"} <= set(names)
    assert not (lib / "enclave_runtime" / "__pycache__").exists()
    probe = "import enclave_runtime.odyn.supervisor, enclave_runtime.odyn.api, cbor2, yaml"
    result = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path[:0] = [{str(lib)!r}]; {probe}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr

"""odyn loads a service's code only when the manifest asks for it (odyn/supervisor.py): starting
it imports no API, egress, ingress, key or init module, and none of the libraries only
they need. Each import counts in every enclave's memory (docs/images.md, footprint).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# odyn runs on the runtime image's own Python 3.11 (docs/images.md); under 3.9 the older
# jsonschema pip picks imports http at start, which says nothing about the enclave.
pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 10), reason="odyn runs on the runtime image's Python 3.11"
)

# Modules (and their submodules) a manifest without api, egress, ingress or services never needs.
LAZY = (
    "enclave_runtime.odyn.api",
    "enclave_runtime.odyn.egress",
    "enclave_runtime.odyn.ingress",
    "enclave_runtime.odyn.http",
    "enclave_runtime.odyn.keys",
    "enclave_runtime.init",
    "cryptography",
    "Crypto",
    "http",
)


def _modules_after(statement: str) -> list[str]:
    probe = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(result.stdout)


def _lazy_loaded(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == lazy or m.startswith(lazy + ".") for lazy in LAZY)]


def test_starting_odyn_loads_no_service_code() -> None:
    assert _lazy_loaded(_modules_after("import enclave_runtime.odyn.cli")) == []


def test_the_probe_sees_a_service_module_when_it_is_imported() -> None:
    loaded = _lazy_loaded(_modules_after("import enclave_runtime.odyn.ingress"))
    assert "enclave_runtime.odyn.ingress" in loaded

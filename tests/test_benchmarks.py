"""Every benchmark runs to its last line in its quick mode (bench/README.md): a smoke test, so that
a benchmark cannot rot unseen. No timing is asserted; the report's lines are.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

BENCH = REPO_ROOT / "bench"
NEEDS_DOCKER = [pytest.mark.root, pytest.mark.docker, pytest.mark.slow]
RELAY_LINES = (
    r"throughput vs direct: +\d+\.\d\d",
    r"added p50 per hop \(us\): +-?\d+\.\d",
    r"^20 concurrent: 0 errors; .*\(leaked: 0\)$",
)
# Each benchmark: the lines its report must have, the last one last, and its marks.
BENCHMARKS: dict[str, tuple[tuple[str, ...], list[pytest.MarkDecorator]]] = {
    "build.py": (
        (r"examples/hello \(amended\): native build", r"^  EIF\+PCR .* ratio +\d+\.\d$"),
        NEEDS_DOCKER,
    ),
    "egress.py": (RELAY_LINES, []),
    "eif_pcr.py": ((r"^ratio: +\d+\.\d\d",), []),
    "emulator_boot.py": (
        (r"first boot", r"^cached boot \(best of 1\): .* ratio .*x$"),
        NEEDS_DOCKER,
    ),
    "fleet.py": ((r"deploy-enclave.yml, no change", r"^ratio: +\d+\.\d x$"), NEEDS_DOCKER),
    "footprint.py": (
        (
            r"runtime in the EIF: +\d+\.\d MB",
            r"odyn RSS idle: +\d+\.\d MiB",
            r"^minimum enclave memory \(busybox app\): \d+ MiB$",
        ),
        NEEDS_DOCKER,
    ),
    "ingress.py": (RELAY_LINES, []),
    "kms.py": ((r"through the KMS proxy", r"^  proxy / direct: +\d+\.\d\d$"), []),
    "init.py": (
        (r"ServiceStatus request", r"^crash loop, successive restarts \(ms\): \d+, \d+$"),
        [],
    ),
}


def test_every_benchmark_has_a_smoke_run() -> None:
    assert sorted(path.name for path in BENCH.glob("*.py")) == sorted(BENCHMARKS)


def _run_quick(name: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(BENCH / name), "--quick"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{name} --quick failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout.splitlines()


def _socat_expected() -> bool:
    """CI installs socat (scripts/bench-setup.sh); a developer's machine may lack it."""
    return shutil.which("socat") is not None or os.environ.get("CI") == "true"


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=marks) for name, (_, marks) in BENCHMARKS.items()],
)
def test_the_quick_run_reaches_its_last_line(name: str) -> None:
    lines = _run_quick(name)
    expected = BENCHMARKS[name][0]
    if expected is RELAY_LINES and _socat_expected():
        expected = (r"^throughput vs socat: +\d+\.\d\d", r"^connections/s vs socat", *expected)
    for pattern in expected:
        assert any(re.search(pattern, line) for line in lines), (pattern, lines)
    assert re.search(expected[-1], lines[-1]), lines

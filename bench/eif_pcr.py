"""How fast ``measure()`` reads an EIF, against ``sha384sum`` of the same file in the same run.

The image is shaped like nitro-cli's: a small kernel, a small bootstrap ramdisk and a ~300 MB
customer ramdisk, the costly case (its bytes feed both PCR0 and PCR2, plus the CRC), while
``sha384sum`` hashes the file once. Best of 3 for each; the goal is a ratio of at least 0.8.
Run: ``.venv/bin/python bench/eif_pcr.py [--quick]``; ``--quick`` (CI's smoke run) measures a
16 MB customer ramdisk once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from enclave_runtime.formats.eif import build_eif, measure

FULL = (300, 3)  # customer ramdisk MB, rounds (the best counts)
QUICK = (16, 1)
MB = 1024 * 1024


def write_random(path: Path, size: int) -> None:
    with path.open("wb") as stream:
        for _ in range(size // MB):
            stream.write(os.urandom(MB))
        stream.write(os.urandom(size % MB))


def best_seconds(action: object, rounds: int) -> float:
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()  # type: ignore[operator]
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small EIF, measured once")
    customer_mb, rounds = QUICK if parser.parse_args().quick else FULL
    sha384sum = shutil.which("sha384sum")
    if sha384sum is None:
        print("sha384sum (GNU coreutils) is needed as the baseline", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="eif-bench-") as workdir:
        root = Path(workdir)
        write_random(root / "kernel", 8 * MB)
        write_random(root / "bootstrap", 4 * MB)
        write_random(root / "customer", customer_mb * MB)
        eif = root / "bench.eif"
        build_eif(root / "kernel", "console=ttyS0", [root / "bootstrap", root / "customer"], eif)
        size_mb = eif.stat().st_size / MB
        ours = best_seconds(lambda: measure(eif), rounds)
        baseline = best_seconds(
            lambda: subprocess.run([sha384sum, str(eif)], check=True, capture_output=True), rounds
        )
    ours_rate = size_mb / ours
    baseline_rate = size_mb / baseline
    print(f"EIF size:         {size_mb:.0f} MB (best of {rounds})")
    print(f"measure():        {ours_rate:8.0f} MB/s  ({ours:.3f} s)")
    print(f"sha384sum:        {baseline_rate:8.0f} MB/s  ({baseline:.3f} s)")
    print(f"ratio:            {ours_rate / baseline_rate:8.2f}  (goal >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

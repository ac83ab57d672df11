"""nitro-emu boot time: run-enclave until the heartbeat, for a ~100 MB image, first and cached.

Baseline, measured in the same run: copying the EIF's bytes (``cp``), the least a boot that reads
its image must cost. Prints each boot time and its ratio to the copy. Needs root and Docker.

    .venv/bin/python bench/emulator_boot.py [--runs 3] [--quick]

``--quick`` (CI's smoke run) is ``--runs 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NITRO_EMU = str(Path(sys.executable).parent / "nitro-emu")
IMAGE = "enclaveops-bench/boot:latest"
DOCKERFILE = """\
FROM enclaveops/debian-base:bookworm
CMD ["sleep", "infinity"]
"""


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, result.stdout


def build_eif(work: Path, env: dict[str, str]) -> Path:
    subprocess.run([str(REPO / "scripts" / "build-base-image.sh")], check=True)
    context = work / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    subprocess.run(["docker", "build", "-q", "-t", IMAGE, str(context)], check=True)
    eif = work / "boot.eif"
    subprocess.run(
        [NITRO_EMU, "build-enclave", "--docker-uri", IMAGE, "--output-file", str(eif)],
        env=env,
        check=True,
        capture_output=True,
    )
    return eif


def boot_once(eif: Path, env: dict[str, str]) -> float:
    run = [NITRO_EMU, "run-enclave", "--eif-path", str(eif), "--memory", "1024", "--cpu-count", "1"]
    seconds, output = timed(run, env)
    enclave_id = json.loads(output)["EnclaveID"]
    subprocess.run(
        [NITRO_EMU, "terminate-enclave", "--enclave-id", enclave_id],
        env=env,
        check=True,
        capture_output=True,
    )
    return seconds


def copy_once(eif: Path, work: Path) -> float:
    target = work / "copy.eif"
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    shutil.copyfile(eif, target)
    seconds = time.perf_counter() - start
    target.unlink()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="cached boots to take the best of")
    parser.add_argument("--quick", action="store_true", help="one cached boot")
    args = parser.parse_args()
    if args.quick:
        args.runs = 1
    if os.geteuid() != 0:
        print("emulator_boot: needs root (namespaces, mounts)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench", dir="/tmp"))
    env = dict(os.environ, NITRO_EMU_ROOT=str(work / "emu"))
    allocator = work / "allocator.yaml"
    allocator.write_text("---\nmemory_mib: 2048\ncpu_count: 2\n")
    env["NITRO_EMU_ALLOCATOR"] = str(allocator)
    try:
        eif = build_eif(work, env)
        size_mb = eif.stat().st_size / 1e6
        first = boot_once(eif, env)  # the ramdisk cache is empty: unpacks the image
        cached = min(boot_once(eif, env) for _ in range(args.runs))
        copy = min(copy_once(eif, work) for _ in range(args.runs))
    finally:
        subprocess.run(
            [NITRO_EMU, "terminate-enclave", "--all"], env=env, capture_output=True, check=False
        )
        shutil.rmtree(work, ignore_errors=True)
    print(f"EIF: {size_mb:.0f} MB")
    print(f"copy of the EIF (baseline): {copy * 1000:8.1f} ms")
    print(f"first boot (unpacks):       {first * 1000:8.1f} ms   ratio {first / copy:6.1f}x")
    print(
        f"cached boot (best of {args.runs}):  {cached * 1000:8.1f} ms   ratio {cached / copy:6.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

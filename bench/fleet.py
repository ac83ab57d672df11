"""A no-change run of playbooks/deploy-enclave.yml on localhost, against `ansible -m ping`.

What an operator pays to keep a converged host converged: the main playbook on the emulator
when nothing has to change (every module only reads state), as a ratio to the cheapest Ansible
round trip on the same inventory, `ansible nitro_parents -m ansible.builtin.ping`, measured in
the same run. Deploys once first (not timed), tears down at the end. Needs root and Docker.

    .venv/bin/python bench/fleet.py [--runs 3] [--quick]

``--quick`` (CI's smoke run) is ``--runs 1``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.ansible.playbook_runner import (  # noqa: E402
    VENV_BIN,
    extra_vars,
    private_emulator_root,
    run_playbook,
)


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def ping() -> None:
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [str(VENV_BIN / "ansible"), "nitro_parents", "-m", "ansible.builtin.ping"],
        cwd=REPO,
        env=env,
        capture_output=True,
        check=True,
    )


def converge(variables: str) -> None:
    result = run_playbook("deploy-enclave.yml", "-e", variables)
    if result.returncode != 0 or result.changed != 0:
        raise SystemExit(f"the no-change run did not converge cleanly:\n{result.output[-4000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one timed run of each")
    args = parser.parse_args()
    if args.quick:
        args.runs = 1
    root = private_emulator_root()
    variables = extra_vars(root)
    try:
        first = run_playbook("deploy-enclave.yml", "-e", variables)
        if first.returncode != 0:
            print(first.output[-4000:], file=sys.stderr)
            return 1
        pings = [timed(ping) for _ in range(args.runs)]
        runs = [timed(lambda: converge(variables)) for _ in range(args.runs)]
    finally:
        run_playbook("teardown.yml", "-e", variables)
        subprocess.run(["rm", "-rf", str(root)], check=False)
    baseline = statistics.median(pings)
    playbook = statistics.median(runs)
    print(f"ansible -m ping (baseline):      {baseline:7.2f} s (median of {args.runs})")
    print(f"deploy-enclave.yml, no change:   {playbook:7.2f} s (median of {args.runs})")
    print(f"ratio:                           {playbook / baseline:7.1f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

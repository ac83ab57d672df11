"""A stateful fake nitro-cli for tests that cannot boot enclaves (no root, no emulator sandbox).

It keeps its enclaves in ``$NITRO_EMU_ROOT/fake-state.json``, so the modules' ``emulator_root``
option points it at a test's directory exactly as it points nitro-emu at its root. EIFs are
real: describe-eif and run-enclave measure them with enclave_runtime, so measurements compare as
they do with nitro-cli. A file ``fail-run`` in the state directory makes run-enclave fail with
its text on stderr (and exit 26, as nitro-cli does for E26); ``boot-state`` sets the State a new
enclave reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCRIPT = """\
#!{python}
import argparse, json, os, sys
from pathlib import Path
from enclave_runtime.formats.eif import read_eif

state_dir = Path(os.environ["NITRO_EMU_ROOT"])
state_file = state_dir / "fake-state.json"
state = {{"enclaves": [], "next": 16}}
if state_file.exists():
    state = json.loads(state_file.read_text())
with open(state_dir / "calls.jsonl", "a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")

parser = argparse.ArgumentParser()
commands = parser.add_subparsers(dest="command")
run = commands.add_parser("run-enclave")
run.add_argument("--eif-path")
run.add_argument("--memory", type=int)
run.add_argument("--cpu-count", type=int)
run.add_argument("--enclave-cid", type=int)
run.add_argument("--debug-mode", action="store_true")
run.add_argument("--enclave-name")
commands.add_parser("describe-enclaves")
terminate = commands.add_parser("terminate-enclave")
terminate.add_argument("--enclave-id")
describe_eif = commands.add_parser("describe-eif")
describe_eif.add_argument("--eif-path")
args = parser.parse_args()

if args.command == "describe-eif":
    print(json.dumps(read_eif(args.eif_path).describe()))
elif args.command == "describe-enclaves":
    print(json.dumps(state["enclaves"]))
elif args.command == "terminate-enclave":
    found = [e for e in state["enclaves"] if e["EnclaveID"] == args.enclave_id]
    if not found:
        sys.stderr.write("[ E11 ] Unspecified enclave ID.\\n")
        sys.exit(11)
    state["enclaves"].remove(found[0])
    print(json.dumps({{"EnclaveName": found[0]["EnclaveName"], "EnclaveID": args.enclave_id,
                      "Terminated": True}}))
else:
    failure = state_dir / "fail-run"
    if failure.exists():
        sys.stderr.write(failure.read_text())
        sys.exit(26)
    cid = args.enclave_cid or state["next"]
    state["next"] = cid + 1
    cpus = list(range(1, args.cpu_count + 1))
    info = {{"EnclaveName": args.enclave_name, "EnclaveID": "i-0000000000000000-enc%016x" % cid,
            "ProcessID": 1000 + cid, "EnclaveCID": cid, "NumberOfCPUs": args.cpu_count,
            "CPUIDs": cpus, "MemoryMiB": args.memory}}
    boot_state = state_dir / "boot-state"
    state["enclaves"].append(dict(
        info,
        State=boot_state.read_text().strip() if boot_state.exists() else "RUNNING",
        Flags="DEBUG_MODE" if args.debug_mode else "NONE",
        Measurements=read_eif(args.eif_path).describe()["Measurements"],
    ))
    print(json.dumps(info))
state_file.write_text(json.dumps(state))
"""


def install(directory: Path) -> Path:
    """Write the fake as ``directory/nitro-cli`` (run by this Python) and return its path."""
    path = Path(directory) / "nitro-cli"
    path.write_text(SCRIPT.format(python=sys.executable))
    path.chmod(0o755)
    return path


def calls(state_dir: Path) -> list[list[str]]:
    """The argument lists the fake was called with, oldest first."""
    log = Path(state_dir) / "calls.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]

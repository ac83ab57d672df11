#!/usr/bin/python
# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module enclaveops.nitro.enclave: thin over enclave_runtime.host.enclave_lifecycle."""

from __future__ import annotations

DOCUMENTATION = r"""
module: enclave
short_description: Run, replace, restart or terminate a Nitro enclave by name
version_added: 0.1.0
description:
  - Ensures that an enclave called O(name) runs a given EIF with given resources, directly with
    C(nitro-cli run-enclave) (no sleeve container). With the emulator, set O(nitro_cli_path) to
    C(nitro-emu) and O(emulator_root).
  - A running enclave is left alone when its name, its EIF measurements (PCR0, PCR1, PCR2, and
    PCR8 when signed, from C(describe-eif) of O(eif_path)) and its resources (O(cpu_count),
    O(memory_mib), O(debug_mode), O(enclave_cid) when given) match. Otherwise it is replaced
    (terminated, then the new one is run, because the allocator's pool usually cannot hold
    both). The result's RV(reasons) says what differed.
  - If the replacement fails to start, the previous enclave is not running any more; the error
    says so, and running the previous EIF again restores it.
  - With O(wait=true) the module returns once C(describe-enclaves) reports the enclave
    C(RUNNING) (C(run-enclave) itself waits for the boot heartbeat).
author:
  - EnclaveOps contributors (@enclaveops)
options:
  name:
    description:
      - The enclave's name (C(run-enclave --enclave-name)); the module manages the one enclave
        with this name.
    type: str
    required: true
  state:
    description:
      - V(running) starts the enclave, or replaces it when it differs.
      - V(restarted) always terminates and starts it again.
      - V(absent) terminates it when it runs.
    type: str
    choices: [running, absent, restarted]
    default: running
  eif_path:
    description:
      - The EIF to run. Required for O(state=running) and O(state=restarted).
    type: path
  expected_sha384:
    description:
      - The SHA-384 the file at O(eif_path) must have, as a build record's C(eif.sha384) gives
        it (an EIF copied to the parent from the build machine). A different file fails the
        task before any enclave is started or terminated, in check mode too.
    type: str
    version_added: 0.1.0
  cpu_count:
    description:
      - vCPUs for the enclave (C(--cpu-count)). Required for O(state=running) and
        O(state=restarted).
    type: int
  memory_mib:
    description:
      - Memory for the enclave in MiB (C(--memory)); at least 4 times the EIF's size. Required
        for O(state=running) and O(state=restarted).
    type: int
  debug_mode:
    description:
      - Run in debug mode (C(--debug-mode)); the console is readable and attestation documents
        carry zero PCR0-2, so never use it for production secrets.
    type: bool
    default: false
  enclave_cid:
    description:
      - The CID to ask for (C(--enclave-cid)); unset lets the driver choose a free one.
    type: int
  wait:
    description:
      - Wait until C(describe-enclaves) reports the enclave C(RUNNING).
    type: bool
    default: true
  wait_timeout:
    description:
      - How long to wait, in seconds.
    type: int
    default: 120
extends_documentation_fragment:
  - enclaveops.nitro.nitro
  - enclaveops.nitro.attributes
attributes:
  check_mode:
    support: full
    description:
      - Reads the enclaves and the EIF and predicts the action and whether anything changes.
      - Runs and terminates nothing.
  diff_mode:
    support: full
    description: Shows the enclave before and after (describe-enclaves data).
  idempotent:
    support: full
    description: A matching running enclave is left alone; O(state=restarted) always restarts.
"""

EXAMPLES = r"""
- name: Run the application enclave (replaced when the EIF or resources change)
  enclaveops.nitro.enclave:
    name: app
    eif_path: /opt/enclaves/app.eif
    cpu_count: 2
    memory_mib: 1024
  become: true
  register: app_enclave

- name: On a fleet parent, copy the recorded build's EIF and run it only if it is that build's
  block:
    - name: Copy the EIF the build machine wrote (image eif_output), fetched to the controller
      ansible.builtin.copy:
        src: "{{ hello_eif }}"
        dest: /opt/enclaves/hello.eif
        mode: "0644"
    - name: Run it, checked against the build record
      enclaveops.nitro.enclave:
        name: hello
        eif_path: /opt/enclaves/hello.eif
        expected_sha384: "{{ record.eif.sha384 }}"
        cpu_count: 2
        memory_mib: 1024

- name: Restart it
  enclaveops.nitro.enclave:
    name: app
    state: restarted
    eif_path: /opt/enclaves/app.eif
    cpu_count: 2
    memory_mib: 1024

- name: Terminate it
  enclaveops.nitro.enclave:
    name: app
    state: absent

- name: On the emulator, for every module of the play
  module_defaults:
    group/enclaveops.nitro.nitro:
      nitro_cli_path: /usr/local/bin/nitro-emu
      emulator_root: /run/nitro-emu
  block:
    - name: Run the enclave on nitro-emu
      enclaveops.nitro.enclave:
        name: app
        eif_path: /opt/enclaves/app.eif
        cpu_count: 1
        memory_mib: 512
"""

RETURN = r"""
enclave:
  description:
    - The enclave as C(describe-enclaves) reports it; null when absent.
    - In check mode, what would run (without the IDs that only a real start assigns).
  returned: always
  type: dict
  contains:
    EnclaveName:
      description: The name.
      type: str
      sample: app
    EnclaveID:
      description: The enclave ID.
      type: str
      sample: i-0123456789abcdef0-enc0123456789abcdef
    ProcessID:
      description: The PID of the enclave's process on the parent.
      type: int
      sample: 4242
    EnclaveCID:
      description: The enclave's vsock CID.
      type: int
      sample: 16
    NumberOfCPUs:
      description: vCPUs.
      type: int
      sample: 2
    CPUIDs:
      description: The CPU ids it runs on.
      type: list
      elements: int
      sample: [1, 3]
    MemoryMiB:
      description: Memory in MiB.
      type: int
      sample: 1024
    State:
      description: C(RUNNING), C(TERMINATING) ...
      type: str
      sample: RUNNING
    Flags:
      description: C(NONE) or C(DEBUG_MODE).
      type: str
      sample: NONE
    Measurements:
      description: PCRs of the running image (hex).
      type: dict
      sample: {"HashAlgorithm": "Sha384 { ... }", "PCR0": "7fb5c55bc2ecbb68..."}
replaced:
  description:
    - Whether a running enclave was (or in check mode would be) terminated and started again.
  returned: always
  type: bool
  sample: false
action:
  description: What was done, V(none), V(start), V(replace), V(restart) or V(terminate).
  returned: always
  type: str
  sample: none
reasons:
  description: Why the running enclave was replaced (each difference found).
  returned: always
  type: list
  elements: str
  sample: ["memory_mib is 512, wanted 1024"]
previous:
  description: The enclave that was replaced or terminated (describe-enclaves data), or null.
  returned: always
  type: dict
"""

# Ansible reads the documentation above before the imports (validate-modules insists).
from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.enclaveops.nitro.plugins.module_utils.common import (  # noqa: E402
    fail_from_error,
    import_runtime,
    nitro_argument_spec,
    nitro_cli,
)

START_STATES = ("running", "restarted")


def spec_from_params(lifecycle, params):
    return lifecycle.EnclaveSpec(
        name=params["name"],
        eif_path=params["eif_path"],
        cpu_count=params["cpu_count"],
        memory_mib=params["memory_mib"],
        debug_mode=params["debug_mode"],
        enclave_cid=params["enclave_cid"],
        expected_sha384=params["expected_sha384"],
    )


def report(module, lifecycle, plan, enclave, previous):
    """exit_json with the module's result keys; ``enclave`` is already a dict or None."""
    before = lifecycle.describe(plan.current) if plan.current is not None else None
    result = dict(
        changed=plan.changed,
        enclave=enclave,
        replaced=plan.replaces,
        action=plan.action,
        reasons=list(plan.reasons),
        previous=lifecycle.describe(previous) if previous is not None else None,
    )
    if module._diff:
        result["diff"] = dict(before=before or {}, after=enclave or {})
    for warning in plan.warnings:
        module.warn(warning)
    module.exit_json(**result)


def run(module):
    errors = import_runtime(module, "enclave_runtime.errors")
    lifecycle = import_runtime(module, "enclave_runtime.host.enclave_lifecycle")
    params = module.params
    cli = nitro_cli(module)
    spec = spec_from_params(lifecycle, params)
    try:
        plan = lifecycle.plan_enclave(cli, spec, params["state"])
    except errors.EnclaveOpsError as err:
        fail_from_error(module, err, f"enclave {params['name']}")
    if module.check_mode:
        report(module, lifecycle, plan, lifecycle.predicted(spec, plan), None)
        return
    try:
        outcome = lifecycle.apply_plan(
            cli, spec, plan, wait=params["wait"], wait_timeout=params["wait_timeout"]
        )
    except errors.EnclaveOpsError as err:
        # Terminating comes first, so a failure part-way has already changed something.
        fail_from_error(module, err, f"enclave {params['name']}", changed=plan.changed)
    enclave = lifecycle.describe(outcome.enclave) if outcome.enclave is not None else None
    report(module, lifecycle, outcome.plan, enclave, outcome.previous)


def main():
    module = AnsibleModule(
        argument_spec=nitro_argument_spec(
            name=dict(type="str", required=True),
            state=dict(type="str", choices=["running", "absent", "restarted"], default="running"),
            eif_path=dict(type="path"),
            expected_sha384=dict(type="str"),
            cpu_count=dict(type="int"),
            memory_mib=dict(type="int"),
            debug_mode=dict(type="bool", default=False),
            enclave_cid=dict(type="int"),
            wait=dict(type="bool", default=True),
            wait_timeout=dict(type="int", default=120),
        ),
        required_if=[
            ("state", state, ("eif_path", "cpu_count", "memory_mib")) for state in START_STATES
        ],
        supports_check_mode=True,
    )
    run(module)


if __name__ == "__main__":
    main()

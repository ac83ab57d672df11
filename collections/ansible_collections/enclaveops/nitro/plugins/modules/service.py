#!/usr/bin/python
# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module enclaveops.nitro.service: thin over enclave_runtime.host.service_state."""

from __future__ import annotations

DOCUMENTATION = r"""
module: service
short_description: Start, stop, restart, enable or disable a service inside a running enclave
version_added: 0.1.0
description:
  - Manages one service of the init (odyn) inside a running Nitro enclave, from the parent
    instance, over the init control protocol on vsock port 9001 (the same requests as
    C(initctl --protocol vsock)).
  - Reads the service's state first and sends only the requests that change it, so a second
    run reports no change. C(state=restarted) always restarts.
  - Disabling a service also stops it (the init does so); a disabled service cannot be started,
    so C(enabled=false) with C(state=started) or C(state=restarted) is refused.
  - The enclave is chosen by CID, or by name, resolved with C(nitro-cli describe-enclaves).
  - The enclave's manifest must allow the parent (CID 3) in C(control.allowed_cids); it does by
    default.
options:
  name:
    description:
      - The service's name, as C(initctl list) shows it (the unit file C(NAME.service) or the
        manifest's C(services.units) key).
    type: str
    required: true
  state:
    description:
      - C(started) starts the service unless it is running or starting.
      - C(stopped) stops it unless nothing runs (inactive, exited, failed or blocked).
      - C(restarted) always restarts it.
      - Unset leaves the running state as it is.
    type: str
    choices: [started, stopped, restarted]
  enabled:
    description:
      - Whether the service starts with the enclave. The init persists it by renaming the unit
        file (C(NAME.service) and C(NAME.service.disabled)); for a unit from the manifest it
        lasts until the enclave restarts.
      - Unset leaves it as it is.
    type: bool
  enclave_cid:
    description:
      - The CID of the enclave (C(EnclaveCID) in C(nitro-cli describe-enclaves), or
        C(enclave.EnclaveCID) from M(enclaveops.nitro.sleeve) or M(enclaveops.nitro.enclave)).
      - Exactly one of O(enclave_cid) and O(enclave_name) is required.
    type: int
  enclave_name:
    description:
      - The name of the enclave (C(EnclaveName) in C(nitro-cli describe-enclaves)); exactly one
        running enclave must have it.
    type: str
  control_port:
    description:
      - The vsock port of the init's control server (the manifest's C(control.vsock_port)).
      - Unset, the runtime's init control port (9001, C(INIT_CONTROL_PORT)).
    type: int
  timeout:
    description:
      - Seconds to wait for each answer of the init; a stop waits for the service's stop grace
        period, so keep this above it.
    type: float
    default: 60
extends_documentation_fragment:
  - enclaveops.nitro.nitro
  - enclaveops.nitro.attributes
attributes:
  check_mode:
    description: Reads the service and predicts C(changed) and C(actions) without sending a change.
    support: full
  diff_mode:
    description: Returns no diff; C(actions) and the service before and after show the change.
    support: none
  idempotent:
    description: A second run with the same options changes nothing, except C(state=restarted).
    support: partial
seealso:
  - module: enclaveops.nitro.service_info
  - module: enclaveops.nitro.sleeve
author:
  - EnclaveOps contributors (@enclaveops)
"""

EXAMPLES = r"""
- name: Stop the heartbeat service of the enclave the sleeve started
  enclaveops.nitro.service:
    enclave_cid: "{{ hello_sleeve.enclave.EnclaveCID }}"
    name: heartbeat
    state: stopped

- name: Enable and start a service, finding the enclave by name (on the emulator)
  enclaveops.nitro.service:
    enclave_name: hello
    name: heartbeat
    state: started
    enabled: true
    nitro_cli_path: /usr/local/bin/nitro-emu
    emulator_root: /run/nitro-emu

- name: Disable a service (the init stops it too)
  enclaveops.nitro.service:
    enclave_cid: 16
    name: worker
    enabled: false
"""

RETURN = r"""
service:
  description:
    - The service after the change (in check mode, as it is now), as C(initctl --json status)
      prints it.
  returned: success
  type: dict
  sample:
    name: heartbeat
    enabled: true
    active: true
    state: running
    pid: 42
    restart_policy: always
    restart_count: 0
    restart_sec: 1
    exit_status: null
    exit_signal: null
    exec_start: /usr/bin/python3 /app/worker.py
    working_directory: null
    dependencies: {before: [], after: [], requires: [], required_by: []}
    error: null
  contains:
    name:
      description: The service's name.
      type: str
    enabled:
      description: Whether it starts with the enclave.
      type: bool
    active:
      description: Whether a process of it is starting, running or stopping.
      type: bool
    state:
      description: >-
        inactive, starting, running, stopping, exited, failed, restarting or blocked.
      type: str
    pid:
      description: The process ID inside the enclave, or null.
      type: int
    error:
      description: Why the service failed or is blocked, or null.
      type: str
actions:
  description: The requests sent to the init, in order (in check mode, the ones that would be).
  returned: success
  type: list
  elements: str
  sample: [enable, start]
enclave_cid:
  description: The CID of the enclave whose init was asked.
  returned: success
  type: int
  sample: 16
"""

# Ansible reads the documentation above before the imports (validate-modules insists).
from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.enclaveops.nitro.plugins.module_utils.common import (  # noqa: E402
    fail_from_error,
    import_runtime,
    nitro_argument_spec,
    nitro_cli,
)


def run(module):
    errors = import_runtime(module, "enclave_runtime.errors")
    protocol = import_runtime(module, "enclave_runtime.formats.init_protocol")
    service_state = import_runtime(module, "enclave_runtime.host.service_state")
    params = module.params
    try:
        desired = service_state.DesiredService(params["name"], params["state"], params["enabled"])
        cid = service_state.target_cid(
            nitro_cli(module), params["enclave_cid"], params["enclave_name"]
        )
        client = service_state.enclave_init_client(
            cid,
            params["control_port"],
            emulator_root=params["emulator_root"],
            timeout=params["timeout"],
        )
        result = service_state.apply_service_state(client, desired, module.check_mode)
    except errors.EnclaveOpsError as err:
        # A request that failed after an earlier one (enable) went through has changed things.
        sent = list(getattr(err, "sent", ()))
        fail_from_error(
            module, err, f"service {params['name']!r}", changed=bool(sent), actions=sent
        )
    module.exit_json(
        changed=result.changed,
        actions=list(result.actions),
        service=protocol.service_info_to_json(result.after),
        enclave_cid=cid,
    )


def main():
    module = AnsibleModule(
        argument_spec=nitro_argument_spec(
            name=dict(type="str", required=True),
            state=dict(type="str", choices=["started", "stopped", "restarted"]),
            enabled=dict(type="bool"),
            enclave_cid=dict(type="int"),
            enclave_name=dict(type="str"),
            control_port=dict(type="int"),
            timeout=dict(type="float", default=60),
        ),
        required_one_of=[["enclave_cid", "enclave_name"], ["state", "enabled"]],
        mutually_exclusive=[["enclave_cid", "enclave_name"]],
        supports_check_mode=True,
    )
    run(module)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module enclaveops.nitro.service_info: thin over enclave_runtime.host.service_state."""

from __future__ import annotations

DOCUMENTATION = r"""
module: service_info
short_description: Read the services of a running enclave's init
version_added: 0.1.0
description:
  - Lists the services of the init (odyn) inside a running Nitro enclave, or one of them, from
    the parent instance over the init control protocol on vsock port 9001 (the same request as
    C(initctl --protocol vsock list)).
  - Changes nothing.
  - The enclave is chosen by CID, or by name, resolved with C(nitro-cli describe-enclaves).
options:
  name:
    description:
      - Only this service; an unknown name fails with the init's message.
      - Unset returns every service the init has loaded.
    type: str
  enclave_cid:
    description:
      - The CID of the enclave (C(EnclaveCID) in C(nitro-cli describe-enclaves)).
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
      - Seconds to wait for the init's answer.
    type: float
    default: 60
extends_documentation_fragment:
  - enclaveops.nitro.nitro
  - enclaveops.nitro.attributes
  - enclaveops.nitro.attributes.info_module
seealso:
  - module: enclaveops.nitro.service
author:
  - EnclaveOps contributors (@enclaveops)
"""

EXAMPLES = r"""
- name: List the services of the enclave the sleeve started
  enclaveops.nitro.service_info:
    enclave_cid: "{{ hello_sleeve.enclave.EnclaveCID }}"
  register: hello_services

- name: Check that the heartbeat service runs
  ansible.builtin.assert:
    that: >-
      hello_services.services | selectattr('name', 'eq', 'heartbeat')
      | map(attribute='state') | first == 'running'

- name: One service of the enclave named hello, on the emulator
  enclaveops.nitro.service_info:
    enclave_name: hello
    name: heartbeat
    nitro_cli_path: /usr/local/bin/nitro-emu
    emulator_root: /run/nitro-emu
"""

RETURN = r"""
services:
  description:
    - The services, sorted by name, each as C(initctl --json status) prints it.
  returned: success
  type: list
  elements: dict
  sample:
    - name: heartbeat
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
        cid = service_state.target_cid(
            nitro_cli(module), params["enclave_cid"], params["enclave_name"]
        )
        client = service_state.enclave_init_client(
            cid,
            params["control_port"],
            emulator_root=params["emulator_root"],
            timeout=params["timeout"],
        )
        services = service_state.read_services(client, params["name"])
    except errors.EnclaveOpsError as err:
        fail_from_error(module, err, "cannot read the enclave's services")
    module.exit_json(
        changed=False,
        services=[protocol.service_info_to_json(info) for info in services],
        enclave_cid=cid,
    )


def main():
    module = AnsibleModule(
        argument_spec=nitro_argument_spec(
            name=dict(type="str"),
            enclave_cid=dict(type="int"),
            enclave_name=dict(type="str"),
            control_port=dict(type="int"),
            timeout=dict(type="float", default=60),
        ),
        required_one_of=[["enclave_cid", "enclave_name"]],
        mutually_exclusive=[["enclave_cid", "enclave_name"]],
        supports_check_mode=True,
    )
    run(module)


if __name__ == "__main__":
    main()

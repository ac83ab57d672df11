#!/usr/bin/python
# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module enclaveops.nitro.enclave_info: describe-enclaves, as module data."""

from __future__ import annotations

DOCUMENTATION = r"""
module: enclave_info
short_description: Describe the running Nitro enclaves
version_added: 0.1.0
description:
  - Lists the enclaves of this parent instance (or of the emulator) as
    C(nitro-cli describe-enclaves) reports them, optionally only the one called O(name).
author:
  - EnclaveOps contributors (@enclaveops)
options:
  name:
    description:
      - Only the enclave with this name (an empty list when none runs).
    type: str
extends_documentation_fragment:
  - enclaveops.nitro.nitro
  - enclaveops.nitro.attributes
  - enclaveops.nitro.attributes.info_module
"""

EXAMPLES = r"""
- name: List the enclaves
  enclaveops.nitro.enclave_info:
  register: enclaves

- name: Find the CID of the enclave called app
  enclaveops.nitro.enclave_info:
    name: app
  register: app_info

- name: Show it
  ansible.builtin.debug:
    msg: "app runs with CID {{ app_info.enclaves[0].EnclaveCID }}"
  when: app_info.enclaves | length > 0
"""

RETURN = r"""
enclaves:
  description: The enclaves, with nitro-cli's keys (see the enclaveops.nitro.enclave module).
  returned: always
  type: list
  elements: dict
  sample:
    - EnclaveName: app
      EnclaveID: i-0123456789abcdef0-enc0123456789abcdef
      ProcessID: 4242
      EnclaveCID: 16
      NumberOfCPUs: 2
      CPUIDs: [1, 3]
      MemoryMiB: 1024
      State: RUNNING
      Flags: NONE
      Measurements:
        HashAlgorithm: "Sha384 { ... }"
        PCR0: "7fb5c55bc2ecbb68..."
        PCR1: "235c9e6050abf6b9..."
        PCR2: "0f0ac32c300289e8..."
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
    lifecycle = import_runtime(module, "enclave_runtime.host.enclave_lifecycle")
    name = module.params["name"]
    try:
        found = nitro_cli(module).describe_enclaves()
    except errors.EnclaveOpsError as err:
        fail_from_error(module, err)
    enclaves = [
        lifecycle.describe(info) for info in found if name is None or info.enclave_name == name
    ]
    module.exit_json(changed=False, enclaves=enclaves)


def main():
    module = AnsibleModule(
        argument_spec=nitro_argument_spec(name=dict(type="str")),
        supports_check_mode=True,
    )
    run(module)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module enclaveops.nitro.allocator: thin over enclave_runtime.host.allocator."""

from __future__ import annotations

DOCUMENTATION = r"""
module: allocator
short_description: Manage the Nitro Enclaves allocator configuration (allocator.yaml)
version_added: 0.1.0
description:
  - Sets the memory and CPUs a parent instance reserves for enclaves in
    C(/etc/nitro_enclaves/allocator.yaml), the file C(nitro-enclaves-allocator.service) reads.
  - Compares by meaning, so an equivalent file (same memory and CPUs, other comments) is left
    alone; otherwise writes AWS's canonical layout atomically and restarts the allocator service.
  - Checks the request against this host first, the way the Nitro Enclaves driver will,
    so a pool that cannot be carved out fails here with the reason instead of at the restart.
    The pool is whole cores, CPU 0's core stays with the parent, and the memory must be less
    than the host's.
  - The emulator (C(nitro-emu)) reads the same file on every C(run-enclave); there, set
    O(restart=false).
author:
  - EnclaveOps contributors (@enclaveops)
options:
  memory_mib:
    description:
      - Memory for all enclaves together, in MiB.
    type: int
    required: true
  cpu_count:
    description:
      - How many CPUs to reserve for enclaves; the allocator picks whole cores, never CPU 0's.
      - Exactly one of O(cpu_count) and O(cpu_pool) is required.
    type: int
  cpu_pool:
    description:
      - The exact CPUs to reserve, in the kernel's CPU list format, for example C(2,3) or
        C(2-3,6-7). CPU 0 cannot be in it.
    type: str
  path:
    description:
      - The allocator configuration file.
    type: path
    default: /etc/nitro_enclaves/allocator.yaml
  restart:
    description:
      - Restart O(service_name) with C(systemctl) when the file changed, so the driver reserves
        the new pool. Running enclaves must be stopped for the restart to succeed.
      - Set it to V(false) on the emulator, which has no allocator service.
    type: bool
    default: true
  service_name:
    description:
      - The systemd unit of the allocator.
    type: str
    default: nitro-enclaves-allocator.service
  validate_host:
    description:
      - Check O(memory_mib), O(cpu_count) and O(cpu_pool) against this host's online CPUs, their
        cores and its memory before writing.
      - Turn it off only when the file is written for another machine (or for the emulator on a
        host smaller than the pool it models).
    type: bool
    default: true
extends_documentation_fragment:
  - enclaveops.nitro.nitro
  - enclaveops.nitro.attributes
attributes:
  check_mode:
    support: full
    description: Reports whether the file would change and the diff, writing nothing.
  diff_mode:
    support: full
    description: The diff of the file, before and after.
  idempotent:
    support: full
    description: A file that already holds the same memory and CPUs is not rewritten.
"""

EXAMPLES = r"""
- name: Reserve 2 GiB and 2 CPUs for enclaves
  enclaveops.nitro.allocator:
    memory_mib: 2048
    cpu_count: 2
  become: true

- name: Reserve CPUs 2 and 3 exactly
  enclaveops.nitro.allocator:
    memory_mib: 4096
    cpu_pool: "2,3"
  become: true

- name: The emulator's pool (no allocator service to restart)
  enclaveops.nitro.allocator:
    memory_mib: 2048
    cpu_count: 2
    path: /run/nitro-emu/allocator.yaml
    restart: false
"""

RETURN = r"""
config:
  description: The configuration now in the file (what it would be in check mode).
  returned: always
  type: dict
  contains:
    memory_mib:
      description: Memory for enclaves, in MiB.
      type: int
      sample: 2048
    cpu_count:
      description: Reserved CPU count, or null when O(cpu_pool) is used.
      type: int
      sample: 2
    cpu_pool:
      description: The reserved CPU list, or null when O(cpu_count) is used.
      type: str
      sample: "2,3"
path:
  description: The file managed.
  returned: always
  type: str
  sample: /etc/nitro_enclaves/allocator.yaml
restarted:
  description: Whether the allocator service was (or in check mode would be) restarted.
  returned: always
  type: bool
  sample: true
previous_problem:
  description:
    - Why the file found there could not be used as it was (invalid or unreadable).
    - Null when it was fine or absent.
  returned: always
  type: str
  sample: "/etc/nitro_enclaves/allocator.yaml: memory_mib is missing"
"""

# Ansible reads the documentation above before the imports (validate-modules insists).
from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.enclaveops.nitro.plugins.module_utils.common import (  # noqa: E402
    fail_from_error,
    import_runtime,
    nitro_argument_spec,
)


def argument_spec():
    return nitro_argument_spec(
        memory_mib=dict(type="int", required=True),
        cpu_count=dict(type="int"),
        cpu_pool=dict(type="str"),
        path=dict(type="path", default="/etc/nitro_enclaves/allocator.yaml"),
        restart=dict(type="bool", default=True),
        service_name=dict(type="str", default="nitro-enclaves-allocator.service"),
        validate_host=dict(type="bool", default=True),
    )


def config_result(config, format_cpu_list):
    return dict(
        memory_mib=config.memory_mib,
        cpu_count=config.cpu_count,
        cpu_pool=format_cpu_list(config.cpu_pool) if config.cpu_pool is not None else None,
    )


def run(module):
    errors = import_runtime(module, "enclave_runtime.errors")
    allocator = import_runtime(module, "enclave_runtime.host.allocator")
    formats = import_runtime(module, "enclave_runtime.formats.allocator_config")
    params = module.params
    written = False
    try:
        desired = allocator.desired_config(
            params["memory_mib"], params["cpu_count"], params["cpu_pool"]
        )
        if params["validate_host"]:
            allocator.check_host(desired, allocator.read_host_resources())
        plan = allocator.plan(params["path"], desired)
        if plan.changed and not module.check_mode:
            allocator.write(plan)
            written = True
            if params["restart"]:
                allocator.restart_service(params["service_name"])
    except errors.EnclaveOpsError as err:
        # A failed restart comes after the write: the file did change.
        fail_from_error(module, err, changed=written)
    restarted = plan.changed and params["restart"]
    result = dict(
        changed=plan.changed,
        config=config_result(desired, formats.format_cpu_list),
        path=str(plan.path),
        restarted=restarted,
        previous_problem=plan.problem,
    )
    if module._diff:
        result["diff"] = plan.diff()
    module.exit_json(**result)


def main():
    module = AnsibleModule(
        argument_spec=argument_spec(),
        mutually_exclusive=[("cpu_count", "cpu_pool")],
        required_one_of=[("cpu_count", "cpu_pool")],
        supports_check_mode=True,
    )
    run(module)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module enclaveops.nitro.manifest_info: thin over enclave_runtime.host.deployment.

The action plugin of the same name runs it on the controller; this module is the same on the
host it runs on (a manifest already on the target).
"""

from __future__ import annotations

DOCUMENTATION = r"""
module: manifest_info
short_description: Work out the deployment an enclaver.yaml describes, with the runtime's defaults
version_added: 0.1.0
description:
  - Reads an enclaver.yaml the way the runtime does (the same schema, checks and defaults) and
    returns what a deployment needs - the name, the target and sources, the ingress ports and
    the host ports that publish them, the aux API port (default the API port + 1), the CPUs and
    memory (the manifest's C(defaults), else the runtime's 2 CPUs and 4096 MiB), the init
    services and the signing files.
  - Runs on the controller (an action plugin), where the enclave role takes the manifest from.
    The controller's Python needs enclave_runtime.
  - An invalid manifest fails with the runtime's message, which names the key and the fix.
author:
  - EnclaveOps contributors (@enclaveops)
options:
  path:
    description:
      - The enclaver.yaml on the controller; a relative path is relative to the playbook's
        directory.
    type: path
    required: true
  published_ports:
    description:
      - How the host publishes the ingress ports, C([IP:]HOST:CONTAINER) as C(docker run -p)
        takes them.
      - Empty (the default) publishes each ingress port on the same host port.
    type: list
    elements: str
    default: []
extends_documentation_fragment:
  - enclaveops.nitro.nitro
  - enclaveops.nitro.attributes
  - enclaveops.nitro.attributes.info_module
attributes:
  action:
    support: full
    description: An action plugin runs it on the controller.
"""

EXAMPLES = r"""
- name: Work out the deployment of the manifest
  enclaveops.nitro.manifest_info:
    path: enclaver.yaml
  register: manifest

- name: Show where the aux API answers on the host
  ansible.builtin.debug:
    msg: "{{ manifest.deployment.aux_api_host_port }}"
"""

RETURN = r"""
deployment:
  description: The effective deployment.
  returned: success
  type: dict
  contains:
    name:
      description: The manifest's C(name).
      type: str
    target:
      description: The release image the build tags.
      type: str
    sources:
      description: C(app), C(odyn) and C(sleeve) images (C(null) when not given).
      type: dict
    ingress_ports:
      description: The ingress listen ports, in manifest order.
      type: list
      elements: int
    published_ports:
      description: The host bindings, C([IP:]HOST:CONTAINER), normalised.
      type: list
      elements: str
    app_port:
      description: The first ingress port that is not the aux API's (C(null) when none).
      type: int
    app_host_port:
      description: The host port publishing C(app_port) (C(null) when none does).
      type: int
    api_port:
      description: The API's port inside the enclave (C(null) without C(api)).
      type: int
    aux_api_port:
      description: The aux API's port, with its default (C(null) without C(aux_api)).
      type: int
    aux_api_host_port:
      description: The host port publishing C(aux_api_port) (C(null) when none does).
      type: int
    cpu_count:
      description: The enclave's CPUs, with the runtime's default.
      type: int
    memory_mb:
      description: The enclave's memory in MiB, with the runtime's default.
      type: int
    services:
      description: The names of the manifest's init services, sorted.
      type: list
      elements: str
    signing_files:
      description: C(signature.certificate) and C(signature.key) as written (empty when unsigned).
      type: list
      elements: str
    signing_key:
      description:
        - C(signature.key) as written, or null when unsigned. The enclave role refuses a
          relative one (a key on the controller) rather than copy it to parents.
      type: str
  sample:
    name: hello
    target: enclaveops-examples/hello-release:latest
    sources: {app: "enclaveops-examples/hello:latest", odyn: null, sleeve: null}
    ingress_ports: [8080, 9101]
    published_ports: ["8080:8080", "9101:9101"]
    app_port: 8080
    app_host_port: 8080
    api_port: 9100
    aux_api_port: 9101
    aux_api_host_port: 9101
    cpu_count: 2
    memory_mb: 4096
    services: [heartbeat]
    signing_files: []
    signing_key: null
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.enclaveops.nitro.plugins.module_utils.common import (  # noqa: E402
    fail_from_error,
    import_runtime,
    nitro_argument_spec,
)

OPTIONS = dict(
    path=dict(type="path", required=True),
    published_ports=dict(type="list", elements="str", default=[]),
)


def main():
    module = AnsibleModule(argument_spec=nitro_argument_spec(**OPTIONS), supports_check_mode=True)
    errors = import_runtime(module, "enclave_runtime.errors")
    deployment = import_runtime(module, "enclave_runtime.host.deployment")
    path = module.params["path"]
    try:
        info = deployment.effective_deployment(path, module.params["published_ports"])
    except errors.EnclaveOpsError as err:
        fail_from_error(module, err, msg_hint=f"manifest {path}")
    module.exit_json(changed=False, deployment=info)


if __name__ == "__main__":
    main()

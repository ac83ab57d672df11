#!/usr/bin/python
# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module enclaveops.nitro.build_record_info: thin over build/release_record.py."""

from __future__ import annotations

DOCUMENTATION = r"""
module: build_record_info
short_description: List the build records of an enclave and pick the build to roll back to
version_added: 0.1.0
description:
  - Reads the build records M(enclaveops.nitro.image) keeps under O(record_dir) (option
    C(record_dir) there) for the manifest name O(name), oldest first (by creation time, then
    file name), each checked against the record schema.
  - Returns the newest record and the one before it, or before O(before), the build a fleet
    rolls back to.
  - A record that does not follow the schema fails the task, naming the file and the field.
author:
  - EnclaveOps contributors (@enclaveops)
options:
  record_dir:
    description:
      - The directory of build records on the host the module runs on (the build machine).
    type: path
    required: true
  name:
    description:
      - The manifest's C(name); its records are in C(<record_dir>/<name>/).
    type: str
    required: true
  before:
    description:
      - A recorded build's C(repo_digest) (C(repository@sha256:DIGEST)); RV(previous) is then
        the build recorded before it. A digest no record names fails the task, listing the
        recorded ones.
      - Unset, RV(previous) is the build before the newest.
    type: str
extends_documentation_fragment:
  - enclaveops.nitro.nitro
  - enclaveops.nitro.attributes
  - enclaveops.nitro.attributes.info_module
seealso:
  - module: enclaveops.nitro.image
  - module: enclaveops.nitro.sleeve
"""

EXAMPLES = r"""
- name: Find the build before the one the fleet runs
  enclaveops.nitro.build_record_info:
    record_dir: /var/lib/enclaveops/records
    name: hello
    before: "{{ deployed_repo_digest }}"
  register: hello_records

- name: Roll back to it, checked against its record
  enclaveops.nitro.sleeve:
    name: hello
    image: "{{ hello_records.previous.image.repo_digest }}"
    pull: missing
    expected_eif_sha384: "{{ hello_records.previous.eif.sha384 }}"
    expected_pcrs: "{{ hello_records.previous.measurements }}"
  when: hello_records.previous is not none
"""

RETURN = r"""
records:
  description: Every record of O(name), oldest first (see RV(enclaveops.nitro.image#module:record)
    for a record's keys); empty when there is none.
  returned: always
  type: list
  elements: dict
latest:
  description: The newest record; null when there is none.
  returned: always
  type: dict
previous:
  description: The record before O(before), or before the newest; null when there is no
    earlier build.
  returned: always
  type: dict
"""

# Ansible reads the documentation above before the imports (validate-modules insists).
from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.enclaveops.nitro.plugins.module_utils.common import (  # noqa: E402
    fail_from_error,
    import_runtime,
    nitro_argument_spec,
)


def main():
    module = AnsibleModule(
        argument_spec=nitro_argument_spec(
            record_dir=dict(type="path", required=True),
            name=dict(type="str", required=True),
            before=dict(type="str"),
        ),
        supports_check_mode=True,
    )
    errors = import_runtime(module, "enclave_runtime.errors")
    release_record = import_runtime(module, "enclave_runtime.build.release_record")
    params = module.params
    try:
        records = release_record.RecordStore(params["record_dir"]).records(params["name"])
        try:
            previous = release_record.record_before(records, params["name"], params["before"])
        except release_record.NoEarlierRecordError:
            previous = None
    except errors.EnclaveOpsError as err:
        fail_from_error(module, err, f"build records of {params['name']}")
    documents = [dict(record.document) for record in records]
    module.exit_json(
        changed=False,
        records=documents,
        latest=documents[-1] if documents else None,
        previous=dict(previous.document) if previous is not None else None,
    )


if __name__ == "__main__":
    main()

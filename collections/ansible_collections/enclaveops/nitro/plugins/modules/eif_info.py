#!/usr/bin/python
# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module enclaveops.nitro.eif_info: thin over enclave_runtime.formats.eif.read_eif."""

from __future__ import annotations

DOCUMENTATION = r"""
module: eif_info
short_description: Read the measurements and metadata of an enclave image file (EIF)
version_added: 0.1.0
description:
  - Reads an EIF the way C(nitro-cli describe-eif) does, without nitro-cli, so it also works on
    build hosts and in CI.
  - Returns the PCRs (PCR0, PCR1, PCR2, and PCR8 for a signed EIF), the build metadata, the size,
    and whether the CRC and the signature check out.
  - A CRC or signature mismatch is reported in the result, not as a failure, unless
    O(verify=true).
author:
  - EnclaveOps contributors (@enclaveops)
options:
  path:
    description:
      - The EIF file.
    type: path
    required: true
  verify:
    description:
      - Fail when the CRC does not match or the signature does not verify (what C(run-enclave)
        would refuse).
    type: bool
    default: false
extends_documentation_fragment:
  - enclaveops.nitro.nitro
  - enclaveops.nitro.attributes
  - enclaveops.nitro.attributes.info_module
"""

EXAMPLES = r"""
- name: Read the PCRs of the application EIF
  enclaveops.nitro.eif_info:
    path: /opt/enclaves/app.eif
  register: app_eif

- name: Show PCR0
  ansible.builtin.debug:
    msg: "{{ app_eif.measurements.PCR0 }}"

- name: Refuse a corrupt or badly signed EIF
  enclaveops.nitro.eif_info:
    path: /opt/enclaves/app.eif
    verify: true
"""

RETURN = r"""
measurements:
  description: The PCRs as nitro-cli names them (hex, SHA-384).
  returned: always
  type: dict
  sample:
    HashAlgorithm: "Sha384 { ... }"
    PCR0: "7fb5c55bc2ecbb68..."
    PCR1: "235c9e6050abf6b9..."
    PCR2: "0f0ac32c300289e8..."
metadata:
  description: The EIF's build metadata (C(Metadata) of describe-eif), or null when it has none.
  returned: always
  type: dict
  sample:
    BuildTime: "1970-01-01T00:00:00+00:00"
    BuildTool: "enclaveops"
image_name:
  description: The image name recorded in the metadata, or null.
  returned: always
  type: str
  sample: "enclaveops/hello:latest"
image_version:
  description: The image version recorded in the metadata, or null.
  returned: always
  type: str
  sample: "1.0"
eif_version:
  description: The EIF format version.
  returned: always
  type: int
  sample: 4
size:
  description: The file size in bytes.
  returned: always
  type: int
  sample: 23456789
signed:
  description: Whether the EIF has a signature section (and so a PCR8).
  returned: always
  type: bool
  sample: false
signing_certificate:
  description: The signing certificate's details (C(SigningCertificate) of describe-eif), or null.
  returned: always
  type: dict
crc_ok:
  description: Whether the CRC in the header matches the content.
  returned: always
  type: bool
  sample: true
signature_valid:
  description: Whether the signature verifies; null for an unsigned EIF.
  returned: always
  type: bool
  sample: null
"""

# Ansible reads the documentation above before the imports (validate-modules insists).
import os  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.enclaveops.nitro.plugins.module_utils.common import (  # noqa: E402
    fail_from_error,
    import_runtime,
    nitro_argument_spec,
)


def describe(image):
    """The module's result for an EifImage (its describe-eif JSON, in snake_case keys)."""
    described = image.describe()
    verdict = image.signature_check
    return dict(
        measurements=described["Measurements"],
        metadata=described.get("Metadata"),
        image_name=described.get("ImageName"),
        image_version=described.get("ImageVersion"),
        eif_version=described["EifVersion"],
        size=os.path.getsize(image.path),
        signed=image.is_signed,
        signing_certificate=described.get("SigningCertificate"),
        crc_ok=image.crc_ok,
        signature_valid=verdict.valid if verdict is not None else None,
    )


def run(module):
    errors = import_runtime(module, "enclave_runtime.errors")
    eif = import_runtime(module, "enclave_runtime.formats.eif")
    path = module.params["path"]
    try:
        image = eif.verify_eif(path) if module.params["verify"] else eif.read_eif(path)
    except errors.EnclaveOpsError as err:
        fail_from_error(module, err)
    module.exit_json(changed=False, **describe(image))


def main():
    module = AnsibleModule(
        argument_spec=nitro_argument_spec(
            path=dict(type="path", required=True),
            verify=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    run(module)


if __name__ == "__main__":
    main()

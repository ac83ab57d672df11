#!/usr/bin/python
# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module enclaveops.nitro.attestation: thin over host.attestation_client."""

from __future__ import annotations

DOCUMENTATION = r"""
module: attestation
short_description: Fetch and verify an attestation document from a running enclave
version_added: 0.1.0
description:
  - Asks a running enclave for a fresh NSM attestation document (C(POST /v1/attestation) of
    odyn's aux API or API) with a nonce, then verifies it, failing with the reason when any check
    fails.
  - Verification rebuilds the certificate chain from a pinned root (the AWS Nitro Enclaves root,
    or the emulator's), checks every certificate's validity now, the ES384 signature, that the
    nonce came back, and the O(expected_pcrs).
  - The enclave is reached by O(url) (the aux API published on the host, for example by a sleeve
    container), or by O(enclave_cid) and O(port) for enclaves without published ports (HTTP over
    vsock to an ingress port that forwards to the aux API).
  - Never reports a change, and runs in check mode.
  - Documents of an enclave in debug mode carry zero PCR0-2, so expecting the EIF's PCRs fails
    there, as it should.
author:
  - EnclaveOps contributors (@enclaveops)
options:
  url:
    description:
      - The base URL of the aux API (or API), for example C(http://127.0.0.1:18001);
        C(/v1/attestation) is appended.
    type: str
  enclave_cid:
    description:
      - The enclave's CID (see M(enclaveops.nitro.enclave_info)); with O(port).
    type: int
  port:
    description:
      - The enclave's vsock port to connect to, an ingress C(listen_port) that forwards to the aux
        API (C(aux_api.listen_port)); with O(enclave_cid).
    type: int
  nonce:
    description:
      - The nonce to send, in hex; it must come back in the document.
      - Default, 32 random bytes.
    type: str
  expected_pcrs:
    description:
      - PCR values the document must carry, as a mapping of PCR index (C(0), or C(PCR0)) to hex.
      - The C(measurements) that M(enclaveops.nitro.eif) and M(enclaveops.nitro.eif_info) return
        can be given as they are (C(HashAlgorithm) is skipped).
    type: dict
  root_certificate:
    description:
      - The root certificate to pin (PEM or DER).
      - Default, the emulator's root (C(<emulator_root>/ca/root.pem)) when O(emulator_root) is
        set, else the AWS Nitro Enclaves Root G1 shipped with enclave-runtime.
    type: path
  timeout:
    description:
      - Seconds to wait for the enclave's answer.
    type: int
    default: 30
  wait:
    description:
      - Ask again every 2 seconds while the enclave cannot be reached (it has just booted, odyn
        does not listen yet), until O(wait_timeout). A document that does not verify fails at
        once.
    type: bool
    default: false
  wait_timeout:
    description:
      - Seconds to keep asking with O(wait=true).
    type: int
    default: 120
extends_documentation_fragment:
  - enclaveops.nitro.nitro
  - enclaveops.nitro.attributes
  - enclaveops.nitro.attributes.info_module
"""

EXAMPLES = r"""
- name: Verify the enclave against the PCRs of its EIF
  enclaveops.nitro.attestation:
    url: http://127.0.0.1:18001
    expected_pcrs: "{{ app_eif.measurements }}"

- name: Verify an enclave without published ports, on the emulator
  enclaveops.nitro.attestation:
    enclave_cid: 16
    port: 9001
    emulator_root: /run/nitro-emu
    expected_pcrs:
      0: "{{ pcr0 }}"
  register: attested

- name: Show the verified PCR0
  ansible.builtin.debug:
    msg: "{{ attested.document.pcrs['0'] }}"
"""

RETURN = r"""
verified:
  description: True; the module fails when the document does not verify.
  returned: success
  type: bool
  sample: true
document:
  description: What the verified document says (bytes as lowercase hex).
  returned: success
  type: dict
  contains:
    module_id:
      description: The enclave's NSM module ID.
      type: str
      sample: i-0123456789abcdef0-enc0123456789abcdef
    timestamp:
      description: When the NSM signed it (RFC 3339, UTC).
      type: str
      sample: "2025-01-31T12:00:00.123Z"
    digest:
      description: The PCR digest algorithm.
      type: str
      sample: SHA384
    pcrs:
      description: PCR index (as a string) to value (hex).
      type: dict
      sample: {"0": "7fb5c55bc2ecbb68...", "8": "000000..."}
    nonce:
      description: The nonce (hex), the one that was sent.
      type: str
    public_key:
      description: The public key the enclave bound (DER, hex), or null.
      type: str
    user_data:
      description: The user data the enclave bound (hex), or null.
      type: str
    certificate:
      description: The signing certificate's subject, issuer and validity.
      type: dict
    root:
      description: The pinned root's subject and SHA-256 fingerprint.
      type: dict
    verified_at:
      description: The time the validity checks used.
      type: str
source:
  description: Where the document came from.
  returned: success
  type: str
  sample: http://127.0.0.1:18001/v1/attestation
check:
  description:
    - On failure, the check that failed, for example C(pcr 0), C(nonce) or C(certificate chain).
  returned: failure
  type: str
  sample: pcr 0
retryable:
  description:
    - On failure, whether asking again may succeed (the enclave could not be reached) rather
      than the document being wrong. Retry on this field, never on the message.
  returned: failure
  type: bool
  sample: true
"""

# Ansible reads the documentation above before the imports (validate-modules insists).
from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.enclaveops.nitro.plugins.module_utils.common import (  # noqa: E402
    apply_environment,
    emulator_ca_root,
    fail_from_error,
    import_runtime,
    nitro_argument_spec,
)


def run(module):
    errors = import_runtime(module, "enclave_runtime.errors")
    client = import_runtime(module, "enclave_runtime.host.attestation_client")
    params = module.params
    # The vsock transport picks the emulator's fabric from NITRO_EMU_ROOT.
    apply_environment(module)
    try:
        source = client.AttestationSource(
            url=params["url"], enclave_cid=params["enclave_cid"], port=params["port"]
        )
        nonce = client.parse_nonce(params["nonce"]) if params["nonce"] else None
        expected = client.parse_expected_pcrs(params["expected_pcrs"] or {})
        root = client.load_root(params["root_certificate"] or emulator_ca_root(module))
        options = dict(nonce=nonce, expected_pcrs=expected, root=root, timeout=params["timeout"])
        if params["wait"]:
            result = client.attest_waiting(source, params["wait_timeout"], **options)
        else:
            result = client.attest(source, **options)
    except errors.EnclaveOpsError as err:
        fail_from_error(
            module,
            err,
            "attestation failed",
            changed=False,
            check=getattr(err, "check", None),
            retryable=getattr(err, "retryable", False),
        )
    document = result.summary()
    document.pop("valid", None)
    module.exit_json(changed=False, verified=True, document=document, source=result.source)


def main():
    module = AnsibleModule(
        argument_spec=nitro_argument_spec(
            url=dict(type="str"),
            enclave_cid=dict(type="int"),
            port=dict(type="int"),
            nonce=dict(type="str"),
            expected_pcrs=dict(type="dict"),
            root_certificate=dict(type="path"),
            timeout=dict(type="int", default=30),
            wait=dict(type="bool", default=False),
            wait_timeout=dict(type="int", default=120),
        ),
        mutually_exclusive=[("url", "enclave_cid"), ("url", "port")],
        required_one_of=[("url", "enclave_cid")],
        required_together=[("enclave_cid", "port")],
        supports_check_mode=True,
    )
    run(module)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module enclaveops.nitro.eif: thin over enclave_runtime.build.eif_file."""

from __future__ import annotations

DOCUMENTATION = r"""
module: eif
short_description: Build an enclave image file (EIF) from a Docker image
version_added: 0.1.0
description:
  - Builds the EIF of a local Docker image with C(nitro-cli build-enclave) or the native builder
    of enclave-runtime, optionally signed (PCR8), and returns its measurements.
  - The native builder is reproducible; the same image ID and blobs give a byte-identical EIF.
  - The digest of the inputs (image ID, builder, blobs, signing certificate, enclave-runtime
    version, E(SOURCE_DATE_EPOCH)) is recorded beside the EIF in C(<output>.build.json). When
    the digest is unchanged and the EIF is still the file that was built, nothing is done, and
    RV(reason) says so.
  - The EIF is built beside O(output) under a temporary name and renamed over it only when the
    build succeeded, so a failed build leaves the previous EIF in place, whole.
author:
  - EnclaveOps contributors (@enclaveops)
options:
  image:
    description:
      - The local Docker image to build from (a tag or an image ID). It is not pulled.
    type: str
    required: true
  output:
    description:
      - Where to write the EIF. Its directory must exist; the native builder also stages the
        image's files there (about the image's size).
    type: path
    required: true
  builder:
    description:
      - V(nitro-cli) runs O(nitro_cli_path) C(build-enclave); V(native) builds without it.
      - V(auto) is V(nitro-cli) when O(nitro_cli_path) is AWS's nitro-cli (its C(--version) says
        C(Nitro CLI)), else V(native) (for example with nitro-emu).
    type: str
    choices: [auto, nitro-cli, native]
    default: auto
  blobs:
    description:
      - The blobs directory (kernel, C(cmdline), C(init), C(nsm.ko)).
      - Defaults to E(NITRO_CLI_BLOBS), else the emulator's placeholder blobs for the native
        builder (EIFs that boot only on nitro-emu), and nitro-cli's own default for nitro-cli.
    type: path
  signing_certificate:
    description:
      - PEM signing certificate; with O(signing_key) the EIF is signed and gets a PCR8.
    type: path
  signing_key:
    description:
      - PEM EC private key of O(signing_certificate).
    type: path
  force:
    description:
      - Build even when the inputs are unchanged.
    type: bool
    default: false
extends_documentation_fragment:
  - enclaveops.nitro.nitro
  - enclaveops.nitro.attributes
attributes:
  check_mode:
    support: full
    description: Computes the inputs digest and reports whether a build would run, writing nothing.
  diff_mode:
    support: none
    description: An EIF is binary; RV(reason) says why it is (re)built.
  idempotent:
    support: full
    description: Unchanged inputs leave the EIF alone (C(changed=false)).
notes:
  - Needs the Docker SDK for Python and a Docker engine on the target (O(docker_host)).
seealso:
  - module: enclaveops.nitro.image
  - module: enclaveops.nitro.eif_info
"""

EXAMPLES = r"""
- name: Build the EIF of the app image with the native builder
  enclaveops.nitro.eif:
    image: registry.example.com/app:1.4.2
    output: /opt/enclaves/app.eif
    builder: native
  register: app_eif

- name: Build a signed EIF with nitro-cli and AWS's blobs
  enclaveops.nitro.eif:
    image: registry.example.com/app:1.4.2
    output: /opt/enclaves/app.eif
    builder: nitro-cli
    blobs: /usr/share/nitro_enclaves/blobs
    signing_certificate: /etc/enclaveops/signing/cert.pem
    signing_key: /etc/enclaveops/signing/key.pem

- name: Show PCR0
  ansible.builtin.debug:
    msg: "{{ app_eif.measurements.PCR0 }}"
"""

RETURN = r"""
measurements:
  description: The PCRs as nitro-cli prints them (PCR8 when signed). Predicted only when the
    build is skipped in check mode; null when check mode would build.
  returned: always
  type: dict
  sample:
    HashAlgorithm: "Sha384 { ... }"
    PCR0: "b0080979fa132f05..."
    PCR1: "0c18a7fbcb7a6614..."
    PCR2: "42b6aee0a01cb8af..."
path:
  description: The EIF.
  returned: always
  type: str
  sample: /opt/enclaves/app.eif
inputs_digest:
  description: SHA-256 of the inputs (see the description).
  returned: always
  type: str
  sample: "sha256:49c41e7db13aa2e0..."
reason:
  description: Why the EIF was built, or why it was left alone.
  returned: always
  type: str
  sample: "inputs unchanged: /opt/enclaves/app.eif was built from them"
image_id:
  description: The ID of the image the EIF was built from.
  returned: always
  type: str
  sample: "sha256:53a5146020f29006..."
builder:
  description: The builder used (V(nitro-cli) or V(native)).
  returned: always
  type: str
  sample: native
sha256:
  description: SHA-256 of the EIF file; null when check mode would build.
  returned: always
  type: str
size:
  description: Size of the EIF in bytes; null when check mode would build.
  returned: always
  type: int
"""

# Ansible reads the documentation above before the imports (validate-modules insists).
from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.enclaveops.nitro.plugins.module_utils.common import (  # noqa: E402
    apply_environment,
    fail_from_error,
    import_docker,
    import_runtime,
    nitro_argument_spec,
)


def build_options(pipeline, module):
    """The pipeline's BuildOptions from the module's parameters."""
    params = module.params
    return pipeline.BuildOptions(
        builder=params["builder"],
        nitro_cli=params["nitro_cli_path"] or "nitro-cli",
        blobs=params["blobs"],
        force=params["force"],
    )


def signing(module):
    certificate, key = module.params["signing_certificate"], module.params["signing_key"]
    return (certificate, key) if certificate else None


def built_result(build):
    return dict(
        changed=not build.skipped,
        measurements=build.measurements.to_nitro_cli(),
        path=str(build.path),
        inputs_digest=build.inputs_digest,
        reason=build.reason,
        image_id=build.image_id,
        builder=build.builder,
        sha256=build.sha256,
        size=build.size,
    )


def predicted_result(eif_file, client, module, options):
    """Check mode: the result of the build that would run, without running it."""
    output = module.params["output"]
    image, builder, digest = eif_file.plan_eif(
        client, module.params["image"], options, signing(module)
    )
    existing, reason = eif_file.up_to_date_eif(output, digest, force=options.force)
    if existing is not None:
        return built_result(existing)
    return dict(
        changed=True,
        measurements=None,
        path=output,
        inputs_digest=digest,
        reason=reason,
        image_id=str(image.id),
        builder=builder,
        sha256=None,
        size=None,
    )


def run(module):
    import_docker(module)
    errors = import_runtime(module, "enclave_runtime.errors")
    pipeline = import_runtime(module, "enclave_runtime.build.pipeline")
    eif_file = import_runtime(module, "enclave_runtime.build.eif_file")
    docker_engine = import_runtime(module, "enclave_runtime.host.docker_engine")
    apply_environment(module)
    options = build_options(pipeline, module)
    try:
        client = docker_engine.docker_client()
        if module.check_mode:
            module.exit_json(**predicted_result(eif_file, client, module, options))
        build = eif_file.build_eif_file(
            module.params["image"],
            module.params["output"],
            options,
            signing=signing(module),
            client=client,
        )
    except errors.EnclaveOpsError as err:
        fail_from_error(module, err, f"cannot build the EIF of {module.params['image']}")
    module.exit_json(**built_result(build))


def main():
    module = AnsibleModule(
        argument_spec=nitro_argument_spec(
            image=dict(type="str", required=True),
            output=dict(type="path", required=True),
            builder=dict(type="str", choices=["auto", "nitro-cli", "native"], default="auto"),
            blobs=dict(type="path"),
            signing_certificate=dict(type="path"),
            signing_key=dict(type="path", no_log=False),
            force=dict(type="bool", default=False),
        ),
        required_together=[("signing_certificate", "signing_key")],
        supports_check_mode=True,
    )
    run(module)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module enclaveops.nitro.image: thin over enclave_runtime.build.pipeline.build."""

from __future__ import annotations

DOCUMENTATION = r"""
module: image
short_description: Build the release image of an enclaver.yaml (amended image, EIF, sleeve image)
version_added: 0.1.0
description:
  - The enclaver pipeline, as C(enclaveops build) runs it. The app image (C(sources.app)) is
    amended with the enclave runtime (C(sources.odyn)) and the manifest, with C(odyn) as its
    ENTRYPOINT; its EIF is built with nitro-cli or the native builder; the release image tagged
    C(target) is the sleeve base (C(sources.sleeve)) plus C(/enclave/application.eif) and
    C(/enclave/enclaver.yaml).
  - The source images must be local, unless O(pull=true).
  - The engine must keep its images in the classic image store; an engine with the containerd
    image store (the default of fresh Docker Engine 29 installs) is refused before anything is
    done, with the C(daemon.json) setting that switches it back.
  - Each rebuild removes the untagged images earlier builds of the same C(target) left, except
    the release image C(target) named before (kept so that a failed replacement can be rolled
    back) and any image a container uses.
  - The release image carries the digest of every input (the source image IDs, the manifest's
    bytes, the enclave-runtime version, the builder, the blobs, the signing certificate,
    E(SOURCE_DATE_EPOCH)). When the local C(target) has the same digest nothing is built and
    RV(reason) says so.
  - With the native builder the same inputs give the same EIF, PCRs and image IDs on any host.
author:
  - EnclaveOps contributors (@enclaveops)
options:
  manifest:
    description:
      - The C(enclaver.yaml). Relative paths in it (the signing files) are relative to it.
    type: path
    required: true
  pull:
    description:
      - Pull every source image first, present or not, so that a tag that moved in its
        registry is refreshed; without it the local images are used and a missing one fails.
      - The project's own C(enclaveops/...) images are never pulled (no registry serves them;
        C(scripts/build-images.sh) builds them).
      - Check mode never pulls; RV(reason) says what a real run would pull.
    type: bool
    default: false
  builder:
    description:
      - V(nitro-cli) runs O(nitro_cli_path) C(build-enclave); V(native) builds without it.
      - V(auto) is V(nitro-cli) when O(nitro_cli_path) is AWS's nitro-cli, else V(native).
    type: str
    choices: [auto, nitro-cli, native]
    default: auto
  blobs:
    description:
      - The blobs directory (kernel, C(cmdline), C(init), C(nsm.ko)); defaults to
        E(NITRO_CLI_BLOBS), else the emulator's placeholder blobs (native builder).
    type: path
  force:
    description:
      - Build even when the inputs are unchanged.
    type: bool
    default: false
  eif_output:
    description:
      - Also write the release image's EIF to this path (to run it as a bare enclave with
        M(enclaveops.nitro.enclave)). It is written beside the path under a temporary name and
        renamed over it once whole, so the path never holds half an EIF.
      - When the build is skipped, a file already there with the SHA-256 the release image
        records is left alone; a missing or different one is copied out of the release image,
        checked against that SHA-256 and reported as a change.
      - The directory must exist.
    type: path
  target_architecture:
    description:
      - The CPU of the parent that will run the enclave, as C(uname -m) or Ansible's
        C(ansible_architecture) names it (C(x86_64), C(aarch64)); Docker's C(amd64)/C(arm64) are
        accepted too.
      - When set, an app image built for another architecture is refused before anything is
        built or pulled. An image built on an x86 controller cannot run on a Graviton parent;
        build it with C(--platform linux/arm64) or name an arm64 image in a registry.
    type: str
    version_added: 0.1.0
  expected_pcrs:
    description:
      - PCRs the release image must have, a mapping of PCR index (C(0), C("0") or C(PCR0)) to
        hex, or nitro-cli's C(Measurements) as a previous build returned them.
      - The module fails, naming the PCR, when the release image it built or found has others
        (it was rebuilt from other inputs in between); the release image and O(eif_output) are
        kept as they are. Not checked in check mode when a build would run.
    type: dict
  push_repository:
    description:
      - Push the release image to this repository, as C([HOST[:PORT]/]path[:tag]) (tag
        C(latest) when none is given), for example C(10.231.0.1:5000/hello:1.0) or
        C(123456789012.dkr.ecr.eu-west-1.amazonaws.com/hello:1.0), and return the registry's
        digest as RV(repo_digest). Parents deploy that digest with M(enclaveops.nitro.sleeve).
      - The push is skipped (no change) when the registry's tag already names a manifest this
        image was pushed as.
      - A registry without TLS must be listed in the engine's C(insecure-registries)
        (loopback registries are by default).
    type: str
    version_added: 0.1.0
  registry_username:
    description:
      - The user name for O(push_repository)'s registry, as C(docker login) takes it; for ECR
        C(AWS). Given together with O(registry_password).
      - Without both, the engine user's C(~/.docker/config.json) (and its credential helpers,
        such as C(docker-credential-ecr-login)) applies.
    type: str
    version_added: 0.1.0
  registry_password:
    description:
      - The password or token for O(registry_username); for ECR the output of
        C(aws ecr get-login-password --region REGION) (valid 12 hours).
    type: str
    version_added: 0.1.0
  registry:
    description:
      - The registry server the credentials are for (C(serveraddress) of Docker's auth
        configuration); defaults to the host of O(push_repository).
    type: str
    version_added: 0.1.0
  record_dir:
    description:
      - Keep a build record of the pushed release image in this directory of the build
        machine, as C(<record_dir>/<manifest name>/<PCR0 first 16 hex>-<image digest 12
        hex>.json), holding the registry digest, image ID, EIF SHA-384 and SHA-256, PCR0-2
        (PCR8 when signed), the manifest's SHA-256, ingress ports, aux API port and creation
        time.
      - Records are written once and never overwritten. The same build recorded again leaves
        its record alone (no change); another build whose record would take the same path is
        refused. M(enclaveops.nitro.build_record_info) lists them and picks the build before a
        given one for a rollback.
      - Requires O(push_repository).
    type: path
    version_added: 0.1.0
extends_documentation_fragment:
  - enclaveops.nitro.nitro
  - enclaveops.nitro.attributes
attributes:
  check_mode:
    support: full
    description: Resolves the local sources and computes the inputs digest, building, pulling and
      writing nothing. With O(pull=true) it reports C(changed), as the pull may bring a new image;
      with O(eif_output) it reports C(changed) when that file is missing or not the build's EIF.
      With O(push_repository) it asks the registry what the tag holds and reports whether a push
      would run; with O(record_dir) whether a record would be written. When a build would run,
      nothing can be pushed yet and RV(repo_digest) is null.
  diff_mode:
    support: none
    description: Images are not diffed; RV(reason) says why the image is (re)built.
  idempotent:
    support: full
    description: Unchanged inputs leave the release image, an O(eif_output) that holds its
      EIF, a registry tag that holds it and its record alone (C(changed=false)).
notes:
  - Needs the Docker SDK for Python and a Docker engine on the target (O(docker_host)).
  - The project's runtime and sleeve images are built by C(scripts/build-images.sh).
seealso:
  - module: enclaveops.nitro.eif
  - module: enclaveops.nitro.sleeve
"""

EXAMPLES = r"""
- name: Build the release image of the hello example
  enclaveops.nitro.image:
    manifest: /srv/hello/enclaver.yaml
    builder: native
  register: hello_image

- name: Build it and keep its EIF, to run as a bare enclave
  enclaveops.nitro.image:
    manifest: /srv/hello/enclaver.yaml
    eif_output: /var/lib/enclaveops/hello.eif
  register: hello_build

- name: Run the EIF of that build
  enclaveops.nitro.enclave:
    name: hello
    eif_path: "{{ hello_build.eif.path }}"
    cpu_count: 2
    memory_mib: 1024

- name: Run it
  enclaveops.nitro.sleeve:
    name: hello
    image: "{{ hello_image.image }}"
    published_ports: ["8080:8080"]

- name: Build, push to the fleet's registry and keep a record of the build
  enclaveops.nitro.image:
    manifest: /srv/hello/enclaver.yaml
    push_repository: 10.231.0.1:5000/hello:1.0
    registry_username: ci
    registry_password: "{{ registry_password }}"
    record_dir: /var/lib/enclaveops/records
  register: hello_release

- name: Get an ECR token (valid 12 hours) on the controller
  ansible.builtin.command: aws ecr get-login-password --region eu-west-1
  delegate_to: localhost
  register: ecr_login
  changed_when: false
  no_log: true

- name: Push to ECR
  enclaveops.nitro.image:
    manifest: /srv/hello/enclaver.yaml
    push_repository: 123456789012.dkr.ecr.eu-west-1.amazonaws.com/hello:1.0
    registry_username: AWS
    registry_password: "{{ ecr_login.stdout }}"
    record_dir: /var/lib/enclaveops/records

- name: Check the PCRs the build printed against an attestation
  enclaveops.nitro.attestation:
    url: http://127.0.0.1:9101
    expected_pcrs:
      0: "{{ hello_image.measurements.PCR0 }}"
"""

RETURN = r"""
sources:
  description: Each source image's reference and image ID (in check mode, those present locally).
  returned: always
  type: dict
  sample:
    app: {Reference: "enclaveops-examples/hello:latest", ImageID: "sha256:5354..."}
    odyn: {Reference: "enclaveops/runtime:0.1.0", ImageID: "sha256:f116..."}
    sleeve: {Reference: "enclaveops/sleeve-emulator:0.1.0", ImageID: "sha256:faba..."}
measurements:
  description: The EIF's PCRs as nitro-cli prints them; null when check mode would build.
  returned: always
  type: dict
  sample:
    HashAlgorithm: "Sha384 { ... }"
    PCR0: "b0080979fa132f05..."
    PCR1: "0c18a7fbcb7a6614..."
    PCR2: "42b6aee0a01cb8af..."
image:
  description: The release image as C(target@id); the target alone when check mode would build.
  returned: always
  type: str
  sample: "enclaveops-examples/hello-release:latest@sha256:c69c89b1..."
image_id:
  description: The release image's ID; null when check mode would build.
  returned: always
  type: str
eif_digest:
  description: SHA-256 of the EIF inside the image; null when check mode would build.
  returned: always
  type: str
inputs_digest:
  description: The digest of the inputs (see the description); null in check mode when a source
    image is missing locally and a real run would pull it.
  returned: always
  type: str
amended:
  description:
    - The amended image the EIF was built from (the app image + the runtime + the manifest,
      tagged C(<target repository>-amended:<tag>)).
    - Null when check mode would build, or when the build was skipped and that image was
      removed or retagged since (the release image does not need it).
  returned: always
  type: dict
  contains:
    reference:
      description: Its tag.
      type: str
      sample: "enclaveops-examples/hello-release-amended:latest"
    image_id:
      description: Its image ID.
      type: str
      sample: "sha256:319b2c0e..."
eif:
  description:
    - The EIF at O(eif_output), which is the release image's.
    - Null without O(eif_output), and when check mode would build.
  returned: always
  type: dict
  contains:
    path:
      description: O(eif_output).
      type: str
      sample: /var/lib/enclaveops/hello.eif
    sha256:
      description: Its SHA-256 (RV(eif_digest)).
      type: str
    size:
      description: Its size in bytes.
      type: int
      sample: 203960409
builder:
  description: The EIF builder (V(nitro-cli) or V(native)).
  returned: always
  type: str
eif_sha384:
  description: SHA-384 of the EIF inside the image; null when check mode would build.
  returned: always
  type: str
  version_added: 0.1.0
repo_digest:
  description:
    - The pushed release image as C(repository@sha256:DIGEST), the registry's manifest
      digest, which parents pull and check (O(enclaveops.nitro.sleeve#module:image)).
    - Null without O(push_repository), and in check mode when a push would run.
  returned: always
  type: str
  sample: "10.231.0.1:5000/hello@sha256:4f2a..."
  version_added: 0.1.0
push:
  description: What the push did; null without O(push_repository).
  returned: always
  type: dict
  version_added: 0.1.0
  contains:
    repository:
      description: The repository pushed to.
      type: str
      sample: 10.231.0.1:5000/hello
    tag:
      description: The tag pushed.
      type: str
      sample: "1.0"
    pushed:
      description: Whether the image was pushed (in check mode, would be).
      type: bool
    reason:
      description: Why it was pushed, or why not.
      type: str
      sample: "10.231.0.1:5000/hello:1.0 already holds this image"
record:
  description: The build record kept under O(record_dir); null without it, and in check mode
    when a push would run.
  returned: always
  type: dict
  version_added: 0.1.0
  contains:
    path:
      description: The record's file.
      type: str
      sample: /var/lib/enclaveops/records/hello/b0080979fa132f05-4f2a9c1d7e3b.json
    written:
      description: Whether this task wrote it (in check mode, would write it).
      type: bool
    document:
      description: The record (schema C(enclave_runtime/formats/data/build_record.schema.json)).
      type: dict
      sample:
        version: 1
        name: hello
        image:
          repository: 10.231.0.1:5000/hello
          tag: "1.0"
          digest: "sha256:4f2a..."
          repo_digest: "10.231.0.1:5000/hello@sha256:4f2a..."
          image_id: "sha256:c69c..."
        eif: {sha384: "9d1c...", sha256: "e3b0...", size: 203960409}
        measurements: {PCR0: "b008...", PCR1: "0c18...", PCR2: "42b6..."}
        manifest_digest: "sha256:77af..."
        inputs_digest: "sha256:51d0..."
        ingress_ports: [8080, 9101]
        aux_api_port: 9101
        created: "2026-12-07T15:00:00Z"
reason:
  description: Why the image was built, or why it was left alone.
  returned: always
  type: str
  sample: "inputs unchanged: enclaveops-examples/hello-release:latest already holds this build"
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
    params = module.params
    return pipeline.BuildOptions(
        pull=params["pull"],
        builder=params["builder"],
        nitro_cli=params["nitro_cli_path"] or "nitro-cli",
        blobs=params["blobs"],
        force=params["force"],
        eif_output=params["eif_output"],
        target_architecture=params["target_architecture"],
    )


def amended_result(build):
    """The amended image as RETURN documents it, or None."""
    if build.amended is None:
        return None
    return dict(reference=build.amended.reference, image_id=build.amended.image_id)


def eif_result(build, eif_output):
    """The EIF at eif_output: the release image's, so its digest and size are the build's."""
    if eif_output is None:
        return None
    return dict(path=eif_output, sha256=build.eif_sha256, size=build.eif_size)


def built_result(build, eif_output):
    document = build.to_json()
    return dict(
        changed=not build.skipped or build.eif_written,
        eif_sha384=build.eif_sha384,
        repo_digest=None,
        push=None,
        record=None,
        sources=document["Sources"],
        measurements=document["Measurements"],
        image=build.image,
        image_id=build.image_id,
        eif_digest=build.eif_sha256,
        inputs_digest=build.inputs_digest,
        builder=build.builder,
        reason=build.reason,
        amended=amended_result(build),
        eif=eif_result(build, eif_output),
    )


def predicted_result(pipeline, client, module, options):
    """Check mode: whether a build would run, from the inputs digest alone; nothing is pulled.
    Returns the result and the up-to-date build (None when a build would run)."""
    plan = pipeline.plan_build(module.params["manifest"], options, client, check_mode=True)
    existing, reason = pipeline.existing_release(client, plan, force=options.force)
    if existing is not None:
        if options.eif_output is not None:
            existing = pipeline.provide_eif(client, existing, options.eif_output, check_mode=True)
        return built_result(existing, module.params["eif_output"]), existing
    return dict(
        changed=True,
        sources={source.name: source.to_json() for source in plan.sources},
        measurements=None,
        image=plan.manifest.target,
        image_id=None,
        eif_digest=None,
        eif_sha384=None,
        repo_digest=None,
        push=None,
        record=None,
        inputs_digest=plan.inputs_digest,
        builder=plan.builder,
        reason=reason,
        amended=None,
        eif=None,
    ), None


def publish(modules, client, module, build, result):
    """Push the release image and keep its record, as the options ask; updates ``result``."""
    params = module.params
    if not params["push_repository"] or build.image_id is None:
        return
    engine, registry_push, release_record = modules
    auth = engine.registry_auth(
        params["registry_username"], params["registry_password"], params["registry"]
    )
    pushed = registry_push.push_release(
        client, build.image_id, params["push_repository"], auth=auth, check_mode=module.check_mode
    )
    result["repo_digest"] = pushed.repo_digest
    result["push"] = dict(
        repository=pushed.repository, tag=pushed.tag, pushed=pushed.pushed, reason=pushed.reason
    )
    result["changed"] = result["changed"] or pushed.pushed
    if params["record_dir"] and pushed.digest is not None:
        kept = release_record.record_build(
            params["manifest"], build, pushed, params["record_dir"], check_mode=module.check_mode
        )
        result["record"] = dict(
            path=str(kept.path), written=kept.written, document=dict(kept.record.document)
        )
        result["changed"] = result["changed"] or kept.written


def check_expected_pcrs(module, attestation_client, pcr, build):
    """Fail when the release image has other PCRs than ``expected_pcrs``."""
    expected = module.params["expected_pcrs"]
    if not expected or build.measurements is None:
        return
    wanted = attestation_client.parse_expected_pcrs(expected)
    for index, want, have in pcr.pcr_differences(wanted, build.measurements.as_pcrs()):
        module.fail_json(
            msg=f"the release image {build.image} has PCR{index} "
            f"{have.hex() if have is not None else '(none)'}, expected {want.hex()}: it was "
            "built from other inputs than the expected PCRs come from",
            **built_result(build, module.params["eif_output"]),
        )


def run(module):
    import_docker(module)
    errors = import_runtime(module, "enclave_runtime.errors")
    pipeline = import_runtime(module, "enclave_runtime.build.pipeline")
    docker_engine = import_runtime(module, "enclave_runtime.host.docker_engine")
    attestation_client = import_runtime(module, "enclave_runtime.host.attestation_client")
    pcr = import_runtime(module, "enclave_runtime.formats.pcr")
    publishing = (
        docker_engine,
        import_runtime(module, "enclave_runtime.build.registry_push"),
        import_runtime(module, "enclave_runtime.build.release_record"),
    )
    apply_environment(module)
    options = build_options(pipeline, module)
    manifest = module.params["manifest"]
    result = None
    try:
        client = docker_engine.docker_client()
        if module.check_mode:
            result, existing = predicted_result(pipeline, client, module, options)
            if existing is not None:
                publish(publishing, client, module, existing, result)
            module.exit_json(**result)
        build = pipeline.build(manifest, options, client=client)
        check_expected_pcrs(module, attestation_client, pcr, build)
        result = built_result(build, module.params["eif_output"])
        publish(publishing, client, module, build, result)
    except errors.EnclaveOpsError as err:
        fail_from_error(
            module, err, f"cannot build the release image of {manifest}", **(result or {})
        )
    module.exit_json(**result)


def main():
    module = AnsibleModule(
        argument_spec=nitro_argument_spec(
            manifest=dict(type="path", required=True),
            pull=dict(type="bool", default=False),
            builder=dict(type="str", choices=["auto", "nitro-cli", "native"], default="auto"),
            blobs=dict(type="path"),
            force=dict(type="bool", default=False),
            eif_output=dict(type="path"),
            target_architecture=dict(type="str"),
            expected_pcrs=dict(type="dict"),
            push_repository=dict(type="str"),
            registry_username=dict(type="str"),
            registry_password=dict(type="str", no_log=True),
            registry=dict(type="str"),
            record_dir=dict(type="path"),
        ),
        required_by=dict(record_dir="push_repository"),
        required_together=[("registry_username", "registry_password")],
        supports_check_mode=True,
    )
    run(module)


if __name__ == "__main__":
    main()

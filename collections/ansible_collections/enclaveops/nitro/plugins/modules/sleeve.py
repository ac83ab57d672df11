#!/usr/bin/python
# Copyright: EnclaveOps contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Ansible module enclaveops.nitro.sleeve: thin over enclave_runtime.host.sleeve_container."""

from __future__ import annotations

DOCUMENTATION = r"""
module: sleeve
short_description: Run a release image (its enclave) as a sleeve container
version_added: 0.1.0
description:
  - Ensures that the container O(name) runs the release image O(image) (built by
    C(enclaveops build) or M(enclaveops.nitro.image)), whose entrypoint, the sleeve, starts the
    enclave, publishes its ingress ports and terminates it when the container stops.
  - On a Nitro parent instance the container gets the device C(/dev/nitro_enclaves), the host
    PID namespace and nitro-cli's directories C(/run/nitro_enclaves) (enclave process sockets)
    and C(/var/log/nitro_enclaves) at the same paths, so that C(nitro-cli describe-enclaves) and
    C(terminate-enclave) on the host see the enclave the container started. With the
    emulator (O(emulator), by default when O(emulator_root) is set) the emulator's directory is
    shared with the container at the same path, with the privileges the emulator's sandbox
    needs, so that C(nitro-emu describe-enclaves) and C(initctl) on the host reach the enclave.
  - Idempotent on the image ID and the configuration. A container is left alone when it runs
    the image O(image) names now and its configuration (ports, resources, debug mode, emulator
    root, restart policy) matches; it is replaced otherwise. The configuration is stored on the
    container as labels (C(org.enclaveops.sleeve.config) and a digest of the whole container
    specification).
  - With O(wait=true) the module returns once the enclave is C(RUNNING) (the sleeve's
    C(started enclave) line, confirmed by C(describe-enclaves) through O(nitro_cli_path)).
  - Stopping or removing the container terminates the enclave first (C(docker stop) gives the
    sleeve SIGTERM; it terminates the enclave and exits).
author:
  - EnclaveOps contributors (@enclaveops)
options:
  name:
    description:
      - The container's name; the module manages the one container with this name.
    type: str
    required: true
  image:
    description:
      - The release image, as a local Docker reference, either a tag (C(repository:tag)), an
        image ID, or C(repository:tag@sha256:ID), the C(Image) that C(enclaveops build) prints
        and RV(enclaveops.nitro.image#module:image) returns; or, on a fleet, the
        C(repository@sha256:DIGEST) a push returned (RV(enclaveops.nitro.image#module:repo_digest),
        a build record's C(image.repo_digest)). It is pulled only as O(pull) asks.
      - A C(@sha256:) reference whose digest is malformed (not 64 lower-case hex digits) is
        refused before any registry is asked.
      - In the C(@sha256:ID) form the image ID decides what runs (exactly what was built and
        measured), and the local image with that ID must exist. If the tag does not point to it
        (it moved, or does not exist here), the module warns and runs the image ID. A digest
        that is no local image ID is looked up by Docker as a registry digest.
      - The container is created from the image ID, so it keeps running what was resolved even
        when the tag moves.
      - Required unless O(state=absent).
    type: str
  state:
    description:
      - V(started) creates the container if needed (replacing one that differs) and starts it.
      - V(stopped) makes sure it exists and is not running (its enclave terminated).
      - V(absent) stops and removes it.
    type: str
    choices: [started, stopped, absent]
    default: started
  published_ports:
    description:
      - Ingress ports to publish on the host, as C(HOST:CONTAINER) or C(IP:HOST:CONTAINER)
        (TCP), where CONTAINER is an C(ingress[].listen_port) of the manifest.
    type: list
    elements: str
    default: []
  cpu_count:
    description:
      - vCPUs for the enclave; unset uses the manifest's C(defaults.cpu_count).
    type: int
  memory_mib:
    description:
      - Memory for the enclave in MiB (at least 4 times the EIF's size); unset uses the
        manifest's C(defaults.memory_mb).
    type: int
  debug_mode:
    description:
      - Run the enclave in debug mode; its console is relayed to the container's log and its
        attestation documents carry zero PCR0-2, so never use it for production secrets.
    type: bool
    default: false
  emulator:
    description:
      - Run on the nitro-emu emulator rather than on a Nitro parent instance.
      - Defaults to V(true) when O(emulator_root) is set, else V(false).
      - The emulator root shared with the container is O(emulator_root), else E(NITRO_EMU_ROOT),
        else C(/run/nitro-emu).
    type: bool
  emulator_allocator:
    description:
      - The emulator's allocator file, shared read-only with the container.
      - Defaults to E(NITRO_EMU_ALLOCATOR); unset, none is shared and the container's nitro-emu
        uses its default pool. Name C(/etc/nitro_enclaves/allocator.yaml) here to share it (the
        default never depends on which files exist, so a file appearing later does not replace
        the container).
    type: path
  restart_policy:
    description:
      - Docker's restart policy for the container.
    type: str
    choices: ["no", on-failure, unless-stopped, always]
    default: "no"
  pull:
    description:
      - V(never) (the default) uses the local image only; a missing one fails.
      - V(missing) pulls O(image) when it is not present locally, V(always) pulls it every run
        (for a C(@sha256:) digest that is only a check with the registry). A pull that brings an
        image that was not here is a change (RV(pulled)).
      - Check mode never pulls; it reports that a pull would happen.
    type: str
    choices: [never, missing, always]
    default: never
    version_added: 0.1.0
  registry_username:
    description:
      - The user name for the registry O(image) is pulled from, as C(docker login) takes it;
        for ECR C(AWS). Given together with O(registry_password).
      - Without both, the engine user's C(~/.docker/config.json) (and credential helpers)
        applies.
    type: str
    version_added: 0.1.0
  registry_password:
    description:
      - The password or token for O(registry_username); for ECR the output of
        C(aws ecr get-login-password --region REGION).
    type: str
    version_added: 0.1.0
  registry:
    description:
      - The registry server the credentials are for; defaults to the host of O(image).
    type: str
    version_added: 0.1.0
  expected_digest:
    description:
      - The registry digest (C(sha256:...)) the release image must have among its
        C(RepoDigests), as the build record's C(image.digest) gives it.
      - Defaults to the digest of O(image) when O(image) is C(repository@sha256:DIGEST) and
        O(pull) is not V(never) or an expected EIF hash or PCRs are given; set it when O(image)
        is a tag, so that an image pushed over that tag is refused.
    type: str
    version_added: 0.1.0
  expected_eif_sha384:
    description:
      - The SHA-384 of the EIF inside the release image (a build record's C(eif.sha384)). The
        image's label C(org.enclaveops.build.eif) must hold it.
    type: str
    version_added: 0.1.0
  expected_pcrs:
    description:
      - PCRs the image's label C(org.enclaveops.build.measurements) must hold, as a mapping
        of PCR index (C(0), C("0") or C(PCR0)) to hex, or nitro-cli's C(Measurements) (a
        build record's C(measurements)).
      - Any of O(expected_digest), O(expected_eif_sha384), O(expected_pcrs) that differs fails
        the task before a container is created or replaced, naming each field that differs;
        the running container is left as it is.
    type: dict
    version_added: 0.1.0
  wait:
    description:
      - With O(state=started), wait until the enclave is C(RUNNING).
    type: bool
    default: true
  wait_timeout:
    description:
      - How long to wait, in seconds.
    type: int
    default: 180
extends_documentation_fragment:
  - enclaveops.nitro.nitro
  - enclaveops.nitro.attributes
requirements:
  - docker (the Docker SDK for Python, on the target)
attributes:
  check_mode:
    support: full
    description:
      - Reads the container and the image and predicts whether it would be created, replaced,
        started, stopped or removed. Changes nothing. A pull it would make is reported in
        RV(reason) and RV(pulled), not made.
  diff_mode:
    support: full
    description: Shows the image ID, the state and the configuration before and after.
  idempotent:
    support: full
    description: A running container with the same image ID and configuration is left alone.
"""

EXAMPLES = r"""
- name: Run the release image on a Nitro parent, publishing the app's port
  enclaveops.nitro.sleeve:
    name: hello
    image: enclaveops-examples/hello-release:latest
    published_ports:
      - "8080:8080"
      - "127.0.0.1:9101:9101"
  register: hello_sleeve

- name: Show where the enclave runs
  ansible.builtin.debug:
    msg: "enclave {{ hello_sleeve.enclave.EnclaveID }} (CID {{ hello_sleeve.enclave.EnclaveCID }})"

- name: Run exactly the image a build recorded, as repository:tag@sha256:ID (the ID decides)
  enclaveops.nitro.sleeve:
    name: hello
    image: "{{ (lookup('ansible.builtin.file', 'measurements/hello.json') | from_json).image }}"
    published_ports: ["8080:8080"]

- name: On a fleet parent, pull the recorded build by digest and check it against the record
  enclaveops.nitro.sleeve:
    name: hello
    image: "{{ record.image.repo_digest }}"
    pull: missing
    registry_username: ci
    registry_password: "{{ registry_password }}"
    expected_eif_sha384: "{{ record.eif.sha384 }}"
    expected_pcrs: "{{ record.measurements }}"
    published_ports: ["8080:8080"]
    restart_policy: unless-stopped

- name: On the emulator, for every module of the play
  module_defaults:
    group/enclaveops.nitro.nitro:
      nitro_cli_path: /usr/local/bin/nitro-emu
      emulator_root: /run/nitro-emu
  block:
    - name: Run the release image on nitro-emu
      enclaveops.nitro.sleeve:
        name: hello
        image: enclaveops-examples/hello-release:latest
        published_ports: ["8080:8080"]
        memory_mib: 1024

- name: Stop it (the enclave is terminated, the container kept)
  enclaveops.nitro.sleeve:
    name: hello
    image: enclaveops-examples/hello-release:latest
    state: stopped

- name: Remove it
  enclaveops.nitro.sleeve:
    name: hello
    state: absent
"""

RETURN = r"""
container:
  description: The container after the task; null when absent (or in check mode, not yet created).
  returned: always
  type: dict
  contains:
    id:
      description: The container ID.
      type: str
      sample: 5f0c4e0d8a3b...
    name:
      description: The container's name.
      type: str
      sample: hello
    image_id:
      description: The ID of the release image it runs.
      type: str
      sample: sha256:6a1e...
    status:
      description: Docker's status (V(running), V(created), V(exited) ...).
      type: str
      sample: running
enclave:
  description:
    - The enclave the sleeve started, from C(describe-enclaves); null unless O(state=started)
      with O(wait=true) (and never in check mode).
  returned: always
  type: dict
  contains:
    EnclaveID:
      description: The enclave ID.
      type: str
      sample: i-0123456789abcdef0-enc0123456789abcdef
    EnclaveCID:
      description: The enclave's vsock CID.
      type: int
      sample: 16
    EnclaveName:
      description: The enclave's name.
      type: str
      sample: application
    State:
      description: C(RUNNING).
      type: str
      sample: RUNNING
image:
  description:
    - The release image as C(repository:tag@image ID) (the image ID alone when O(image) was an
      image ID); null when O(state=absent), or in check mode when the image is not present yet.
  returned: always
  type: str
  sample: enclaveops-examples/hello-release:latest@sha256:8843cea65b25...
pulled:
  description: Whether O(image) was pulled and was not present before (in check mode, would be).
  returned: always
  type: bool
  version_added: 0.1.0
reason:
  description: Why the container was (or would be) changed, or why it was left alone.
  returned: always
  type: str
  sample: its configuration differs
"""

# Ansible reads the documentation above before the imports (validate-modules insists).
import os  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.enclaveops.nitro.plugins.module_utils.common import (  # noqa: E402
    apply_environment,
    fail_from_error,
    import_docker,
    import_runtime,
    nitro_argument_spec,
    nitro_cli,
)


def config_from_params(containers, params):
    """The SleeveConfig the options ask for (emulator settings resolved from the environment)."""
    emulator = params["emulator"]
    if emulator is None:
        emulator = bool(params["emulator_root"])
    root = allocator = None
    if emulator:
        root = params["emulator_root"] or containers.default_emulator_root(os.environ)
        allocator = params["emulator_allocator"] or containers.default_emulator_allocator(
            os.environ
        )
    return containers.SleeveConfig(
        published_ports=tuple(containers.parse_port_binding(p) for p in params["published_ports"]),
        cpu_count=params["cpu_count"],
        memory_mb=params["memory_mib"],
        debug_mode=params["debug_mode"],
        emulator_root=root,
        emulator_allocator=allocator,
        restart_policy=params["restart_policy"],
    )


def expectation(module, pulling, attestation_client):
    """What the image must be (the build record's values); empty when nothing is asked."""
    params = module.params
    pcrs = params["expected_pcrs"]
    wanted = (
        params["expected_digest"]
        or params["expected_eif_sha384"]
        or pcrs
        or params["pull"] != "never"
    )
    if not wanted:
        return pulling.ReleaseExpectation()
    return pulling.expectation_for(
        params["image"],
        digest=params["expected_digest"],
        eif_sha384=params["expected_eif_sha384"],
        pcrs=attestation_client.parse_expected_pcrs(pcrs) if pcrs else None,
    )


def release_image(module, modules, client):
    """The release image pulled as asked and checked; in check mode a missing one is a change
    to come (release None)."""
    engine, pulling, attestation_client = modules
    params = module.params
    auth = engine.registry_auth(
        params["registry_username"], params["registry_password"], params["registry"]
    )
    try:
        return pulling.prepare_release_image(
            client,
            params["image"],
            pull=params["pull"],
            auth=auth,
            expected=expectation(module, pulling, attestation_client),
            check_mode=module.check_mode,
        )
    except engine.ImageNotFoundError:
        if module.check_mode:
            return pulling.PreparedRelease(None, False)
        raise


def state_word(current):
    return "started" if current.running else "stopped"


def diff(containers, current, wanted_state, wanted_image_id, config):
    before = {}
    if current is not None:
        before = containers.diff_view(current.image_id, state_word(current), current.config)
    after = {}
    if wanted_state != "absent":
        after = containers.diff_view(wanted_image_id, wanted_state, config.to_dict())
    return dict(before=before, after=after)


def enclave_result(info):
    return dict(
        EnclaveID=info.enclave_id,
        EnclaveCID=info.enclave_cid,
        EnclaveName=info.enclave_name,
        State=info.state,
    )


def run(module):
    errors = import_runtime(module, "enclave_runtime.errors")
    containers = import_runtime(module, "enclave_runtime.host.sleeve_container")
    engine = import_runtime(module, "enclave_runtime.host.docker_engine")
    pulling = import_runtime(module, "enclave_runtime.host.release_pull")
    attestation_client = import_runtime(module, "enclave_runtime.host.attestation_client")
    import_docker(module)
    apply_environment(module)
    params = module.params
    name, state = params["name"], params["state"]
    hint = f"sleeve container {name}"
    try:
        config = config_from_params(containers, params)
        client = engine.docker_client()
        container = containers.find_container(client, name)
        current = containers.container_state(container) if container is not None else None
        prepared = release = None
        if state != "absent":
            prepared = release_image(module, (engine, pulling, attestation_client), client)
            release = prepared.release
        wanted_image = release.image_id if release else None
        spec = containers.container_spec(wanted_image or params["image"] or "", name, config)
        plan = containers.plan_sleeve(current, state, wanted_image, spec)
    except errors.EnclaveOpsError as err:
        fail_from_error(module, err, hint)
    if release is not None and release.note:
        module.warn(f"{hint}: {release.note}")
    pulled = bool(prepared and prepared.pulled)
    result = dict(
        changed=plan.changed or pulled,
        reason="; ".join(part for part in (prepared and prepared.reason, plan.reason) if part),
        enclave=None,
        image=release.pinned if release else None,
        pulled=pulled,
    )
    if module._diff:
        result["diff"] = diff(containers, current, state, wanted_image, config)
    if module.check_mode:
        module.exit_json(container=current.as_result() if current else None, **result)
    try:
        container = containers.apply_plan(client, plan, container, spec)
        if container is not None and state == "started" and params["wait"]:
            info = containers.wait_for_enclave(container, nitro_cli(module), params["wait_timeout"])
            result["enclave"] = enclave_result(info)
    except errors.EnclaveOpsError as err:
        fail_from_error(module, err, hint, **result)
    after = containers.container_state(container) if container is not None else None
    module.exit_json(container=after.as_result() if after else None, **result)


def main():
    module = AnsibleModule(
        argument_spec=nitro_argument_spec(
            name=dict(type="str", required=True),
            image=dict(type="str"),
            state=dict(type="str", choices=["started", "stopped", "absent"], default="started"),
            published_ports=dict(type="list", elements="str", default=[]),
            cpu_count=dict(type="int"),
            memory_mib=dict(type="int"),
            debug_mode=dict(type="bool", default=False),
            emulator=dict(type="bool"),
            emulator_allocator=dict(type="path"),
            restart_policy=dict(
                type="str", choices=["no", "on-failure", "unless-stopped", "always"], default="no"
            ),
            wait=dict(type="bool", default=True),
            wait_timeout=dict(type="int", default=180),
            pull=dict(type="str", choices=["never", "missing", "always"], default="never"),
            registry_username=dict(type="str"),
            registry_password=dict(type="str", no_log=True),
            registry=dict(type="str"),
            expected_digest=dict(type="str"),
            expected_eif_sha384=dict(type="str"),
            expected_pcrs=dict(type="dict"),
        ),
        required_if=[("state", "started", ("image",)), ("state", "stopped", ("image",))],
        required_together=[("registry_username", "registry_password")],
        supports_check_mode=True,
    )
    run(module)


if __name__ == "__main__":
    main()

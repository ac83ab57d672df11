"""The sleeve container's specification, its desired-state plan, and `enclaveops run`'s command
line and foreground run (with a stand-in container: no Docker needed)."""

from __future__ import annotations

import argparse
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enclave_runtime.cli import enclaveops, run_cmd
from enclave_runtime.host import sleeve_container as sc
from tests.conftest import REPO_ROOT

HELLO_MANIFEST = REPO_ROOT / "examples" / "hello" / "enclaver.yaml"


# --- port bindings ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("18080:8080", sc.PortBinding(18080, 8080)),
        ("127.0.0.1:0:9101", sc.PortBinding(0, 9101, "127.0.0.1")),
        ("[::1]:8443:8443", sc.PortBinding(8443, 8443, "::1")),
    ],
)
def test_port_bindings_take_docker_run_forms(text: str, expected: sc.PortBinding) -> None:
    assert sc.parse_port_binding(text) == expected


@pytest.mark.parametrize("text", ["8080", "a:b", "70000:80", "8080:0", "1:2:3:x", ""])
def test_a_bad_port_binding_says_which_forms_are_accepted(text: str) -> None:
    with pytest.raises(sc.SleeveContainerError, match="is not HOST:CONTAINER or IP:HOST:CONTAINER"):
        sc.parse_port_binding(text)


# --- the container specification ---


def test_on_nitro_the_container_gets_the_device_and_the_sleeve_the_resources() -> None:
    config = sc.SleeveConfig(
        published_ports=(sc.PortBinding(18080, 8080), sc.PortBinding(19101, 9101, "127.0.0.1")),
        cpu_count=4,
        memory_mb=2048,
        debug_mode=True,
    )
    spec = sc.container_spec("hello-release:1", "hello", config)
    assert spec["image"] == "hello-release:1"
    assert spec["name"] == "hello"
    assert spec["devices"] == ["/dev/nitro_enclaves:/dev/nitro_enclaves:rwm"]
    assert spec["command"] == ["--cpu-count", "4", "--memory-mb", "2048", "--debug-mode"]
    assert spec["ports"] == {"8080/tcp": [("", 18080)], "9101/tcp": [("127.0.0.1", 19101)]}
    # no emulator sandbox: the enclave runs on the hypervisor, not in the container
    assert "cap_add" not in spec and "security_opt" not in spec
    assert spec["labels"][sc.SLEEVE_LABEL] == "1"
    assert json.loads(spec["labels"][sc.CONFIG_LABEL])["published_ports"] == [
        "18080:8080",
        "127.0.0.1:19101:9101",
    ]


def test_on_nitro_host_nitro_cli_sees_the_enclave_the_container_started() -> None:
    spec = sc.container_spec("img", None, sc.SleeveConfig())
    # the host's describe-enclaves / terminate-enclave connect to the enclave process's socket
    assert spec["volumes"]["/run/nitro_enclaves"] == {"bind": "/run/nitro_enclaves", "mode": "rw"}
    assert spec["volumes"]["/var/log/nitro_enclaves"] == {
        "bind": "/var/log/nitro_enclaves",
        "mode": "rw",
    }
    # the container's nitro-cli uses exactly those directories, whatever its version's defaults
    assert spec["environment"] == {
        "NITRO_CLI_SOCKETS_PATH": "/run/nitro_enclaves",
        "NITRO_CLI_LOGS_PATH": "/var/log/nitro_enclaves",
    }
    # the ProcessID describe-enclaves reports is a host PID
    assert spec["pid_mode"] == "host"


def test_nitro_settings_are_data_the_spec_follows() -> None:
    spec = sc.container_spec("img", None, sc.SleeveConfig())
    settings = sc.NITRO_CONTAINER_SETTINGS
    assert spec["devices"] == list(settings["devices"])
    assert spec["pid_mode"] == settings["pid_mode"]
    assert set(spec["volumes"]) == set(settings["shared_directories"].values())
    assert spec["environment"] == dict(settings["shared_directories"])


def test_unset_resources_leave_the_manifest_defaults_to_the_sleeve() -> None:
    assert sc.container_spec("img", None, sc.SleeveConfig())["command"] == []


def test_on_the_emulator_the_root_and_allocator_are_shared_at_the_same_paths() -> None:
    config = sc.SleeveConfig(emulator_root="/run/ne", emulator_allocator="/etc/ne/alloc.yaml")
    spec = sc.container_spec("img", None, config)
    assert spec["volumes"]["/run/ne"] == {"bind": "/run/ne", "mode": "rw"}
    assert spec["volumes"]["/etc/ne/alloc.yaml"] == {"bind": "/etc/ne/alloc.yaml", "mode": "ro"}
    assert spec["environment"] == {
        "NITRO_EMU_ROOT": "/run/ne",
        "NITRO_EMU_ALLOCATOR": "/etc/ne/alloc.yaml",
    }
    # host tools check the PIDs the emulator records; the sandbox mounts and brings lo up
    assert spec["pid_mode"] == "host"
    assert {"SYS_ADMIN", "NET_ADMIN"} <= set(spec["cap_add"])
    assert "devices" not in spec


def test_a_relative_emulator_root_is_refused() -> None:
    with pytest.raises(Exception, match="absolute path"):
        sc.container_spec("img", None, sc.SleeveConfig(emulator_root="run/ne"))


def test_the_digest_follows_the_configuration_not_the_image_or_name() -> None:
    base = sc.SleeveConfig(cpu_count=2)
    digest = sc.container_spec("a:1", "x", base)["labels"][sc.DIGEST_LABEL]
    assert sc.container_spec("b:2", "y", base)["labels"][sc.DIGEST_LABEL] == digest
    for changed in (
        sc.SleeveConfig(cpu_count=3),
        sc.SleeveConfig(cpu_count=2, debug_mode=True),
        sc.SleeveConfig(cpu_count=2, published_ports=(sc.PortBinding(1, 2),)),
        sc.SleeveConfig(cpu_count=2, restart_policy="always"),
        sc.SleeveConfig(cpu_count=2, emulator_root="/run/ne"),
    ):
        assert sc.container_spec("a:1", "x", changed)["labels"][sc.DIGEST_LABEL] != digest


def test_an_unknown_restart_policy_names_the_choices() -> None:
    with pytest.raises(sc.SleeveContainerError, match="no, on-failure, unless-stopped, always"):
        sc.SleeveConfig(restart_policy="sometimes")


def test_emulator_defaults_come_from_the_environment(tmp_path: Path) -> None:
    assert sc.default_emulator_root({}) == "/run/nitro-emu"
    assert sc.default_emulator_root({"NITRO_EMU_ROOT": "/tmp/ne"}) == "/tmp/ne"
    named = str(tmp_path / "allocator.yaml")
    assert sc.default_emulator_allocator({"NITRO_EMU_ALLOCATOR": named}) == named


def test_the_allocator_default_does_not_depend_on_files_present_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/etc/nitro_enclaves/allocator.yaml appearing later must not replace the container."""
    monkeypatch.setenv("NITRO_EMU_ROOT", "/run/ne")
    monkeypatch.delenv("NITRO_EMU_ALLOCATOR", raising=False)
    args = _run_args("release:1", "--emulator")

    def digest() -> str:
        return sc.container_spec("img", "x", run_cmd.sleeve_config(args))["labels"][sc.DIGEST_LABEL]

    monkeypatch.setattr("os.path.isfile", lambda path: False)
    before = digest()
    monkeypatch.setattr("os.path.isfile", lambda path: True)
    assert digest() == before
    assert run_cmd.sleeve_config(args).emulator_allocator is None
    assert sc.default_emulator_allocator({"NITRO_EMU_ALLOCATOR": ""}) is None


# --- the desired-state plan ---

SPEC = sc.container_spec("rel:1", "web", sc.SleeveConfig(cpu_count=2))


def _current(status: str = "running", image_id: str = "sha256:aa", spec: Any = SPEC) -> Any:
    labels = spec["labels"]
    return sc.ContainerState(
        id="c1",
        name="web",
        image_id=image_id,
        status=status,
        config=json.loads(labels[sc.CONFIG_LABEL]),
        digest=labels[sc.DIGEST_LABEL],
        exit_code=None if status == "running" else 0,
    )


def test_a_matching_running_container_is_left_alone() -> None:
    plan = sc.plan_sleeve(_current(), "started", "sha256:aa", SPEC)
    assert not plan.changed
    assert "matches" in plan.reason


def test_a_missing_container_is_created_and_started() -> None:
    plan = sc.plan_sleeve(None, "started", "sha256:aa", SPEC)
    assert (plan.create, plan.start, plan.remove) == (True, True, False)


def test_a_new_image_replaces_the_container() -> None:
    plan = sc.plan_sleeve(_current(), "started", "sha256:bb", SPEC)
    assert (plan.remove, plan.create, plan.start) == (True, True, True)
    assert "sha256:aa" in plan.reason and "sha256:bb" in plan.reason


def test_a_changed_configuration_replaces_the_container() -> None:
    other = sc.container_spec("rel:1", "web", sc.SleeveConfig(cpu_count=4))
    plan = sc.plan_sleeve(_current(), "started", "sha256:aa", other)
    assert (plan.remove, plan.create, plan.start) == (True, True, True)
    assert plan.reason == "its configuration differs"


def test_a_stopped_container_is_started_and_a_running_one_stopped() -> None:
    restart = sc.plan_sleeve(_current("exited"), "started", "sha256:aa", SPEC)
    assert restart.start and restart.reason == "container web is exited (exit status 0)"
    stop = sc.plan_sleeve(_current(), "stopped", "sha256:aa", SPEC)
    assert (stop.stop, stop.remove, stop.create) == (True, False, False)
    assert not sc.plan_sleeve(_current("exited"), "stopped", "sha256:aa", SPEC).changed


def test_stopped_creates_a_missing_container_without_starting_it() -> None:
    plan = sc.plan_sleeve(None, "stopped", "sha256:aa", SPEC)
    assert (plan.create, plan.start) == (True, False)


def test_absent_removes_only_what_exists() -> None:
    assert sc.plan_sleeve(_current(), "absent", None, SPEC).remove
    assert not sc.plan_sleeve(None, "absent", None, SPEC).changed


# --- release image references: the Image enclaveops build prints ---

RELEASE = "enclaveops-examples/hello-release:latest"
BUILT = "sha256:" + "1" * 64
REBUILT = "sha256:" + "2" * 64


class FakeImages:
    """The engine's image lookup: by tag or by (a prefix of) an image ID; a name@digest
    reference only by registry digest, which locally built images do not have."""

    def __init__(self, tags: dict[str, str]) -> None:
        self.tags = tags

    def get(self, reference: str) -> Any:
        docker = pytest.importorskip("docker")
        bare = reference.removeprefix("sha256:")
        found = self.tags.get(reference) or next(
            (i for i in self.tags.values() if i.removeprefix("sha256:").startswith(bare)), None
        )
        if found is None or "@" in reference:
            raise docker.errors.ImageNotFound(f"No such image: {reference}")
        return type("Image", (), {"id": found})()


def _client(**tags: str) -> Any:
    return type("Client", (), {"images": FakeImages(tags)})()


def test_the_image_build_prints_resolves_to_its_id() -> None:
    release = sc.resolve_release_image(_client(**{RELEASE: BUILT}), f"{RELEASE}@{BUILT}")
    assert (release.image_id, release.note) == (BUILT, "")
    assert release.pinned == f"{RELEASE}@{BUILT}"


def test_a_moved_tag_is_said_and_the_pinned_id_runs() -> None:
    client = _client(**{RELEASE: REBUILT, "hello-release:previous": BUILT})
    release = sc.resolve_release_image(client, f"{RELEASE}@{BUILT}")
    assert release.image_id == BUILT
    assert release.note == (
        f"the tag {RELEASE} points to {REBUILT}; running {BUILT}, the image ID the reference pins"
    )


def test_a_missing_tag_is_said_and_the_pinned_id_runs() -> None:
    release = sc.resolve_release_image(_client(other=BUILT), f"{RELEASE}@{BUILT}")
    assert release.image_id == BUILT
    assert f"the tag {RELEASE} does not exist on this host; running {BUILT}" in release.note


def test_a_repository_without_a_tag_is_not_checked() -> None:
    reference = f"registry.local:5000/hello-release@{BUILT}"
    release = sc.resolve_release_image(_client(other=BUILT), reference)
    assert (release.image_id, release.note) == (BUILT, "")


def test_a_pinned_id_that_is_not_here_says_to_build_or_load_it() -> None:
    with pytest.raises(sc.ImageNotFoundError) as raised:
        sc.resolve_release_image(_client(**{RELEASE: REBUILT}), f"{RELEASE}@{BUILT}")
    assert f"no local image has the ID {BUILT}" in str(raised.value)
    assert "enclaveops build -f enclaver.yaml" in str(raised.value)
    assert "docker load" in str(raised.value)


@pytest.mark.parametrize("reference", [RELEASE, BUILT, BUILT.removeprefix("sha256:")[:12]])
def test_a_tag_or_an_image_id_resolves_as_docker_does(reference: str) -> None:
    release = sc.resolve_release_image(_client(**{RELEASE: BUILT}), reference)
    assert (release.image_id, release.note) == (BUILT, "")
    assert release.pinned == (f"{RELEASE}@{BUILT}" if reference == RELEASE else BUILT)


def test_a_missing_tag_names_the_image() -> None:
    with pytest.raises(sc.ImageNotFoundError, match="'hello-release:gone' is not present locally"):
        sc.resolve_release_image(_client(), "hello-release:gone")


@pytest.mark.docker
def test_the_engine_itself_runs_the_pinned_form_only_through_the_resolution() -> None:
    from enclave_runtime.host.docker_engine import docker_client

    client = docker_client()
    base = "enclaveops/debian-base:bookworm"
    image_id = client.images.get(base).id
    docker = pytest.importorskip("docker")
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(f"{base}@{image_id}")  # a registry digest to Docker
    release = sc.resolve_release_image(client, f"{base}@{image_id}")
    assert (release.image_id, release.note, release.pinned) == (image_id, "", f"{base}@{image_id}")


def test_run_creates_the_container_from_the_pinned_id_and_says_a_moved_tag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    created: list[dict[str, Any]] = []
    client = _client(**{RELEASE: REBUILT, "hello-release:previous": BUILT})
    monkeypatch.setattr(run_cmd, "docker_client", lambda: client)
    monkeypatch.setattr(run_cmd, "create_container", lambda _c, spec: created.append(spec))
    monkeypatch.setattr(run_cmd.Foreground, "run", lambda _self: 0)
    assert run_cmd.run_release(_run_args(f"{RELEASE}@{BUILT}", "--emulator")) == 0
    assert created[0]["image"] == BUILT
    assert f"enclaveops: the tag {RELEASE} points to {REBUILT}" in capsys.readouterr().err


# --- what the sleeve prints ---


def test_the_sleeves_started_line_gives_the_enclave_id_and_cid() -> None:
    lines = [
        "sleeve: starting the enclave: 2 CPUs, 1024 MiB",
        "sleeve: started enclave ID=i-0abc-enc01, CID=16",
        "sleeve: started enclave ID=i-0abc-enc02, CID=17",
        "sleeve: ingress 0.0.0.0:8080 -> enclave port 8080",
    ]
    assert sc.parse_started_line(lines[0]) is None
    assert sc.last_started(lines) == sc.EnclaveStarted("i-0abc-enc02", 17)
    assert sc.last_started([]) is None


# --- enclaveops run: command line ---


def _run_args(*argv: str) -> argparse.Namespace:
    return enclaveops.build_parser().parse_args(["run", *argv])


def test_run_takes_the_manifests_target() -> None:
    args = _run_args("-f", str(HELLO_MANIFEST), "-p", "18080:8080", "--debug-mode")
    assert run_cmd.release_image(args) == "enclaveops-examples/hello-release:latest"
    config = run_cmd.sleeve_config(args)
    assert config.published_ports == (sc.PortBinding(18080, 8080),)
    assert (config.debug_mode, config.emulator_root) == (True, None)


def test_run_with_emulator_shares_nitro_emu_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NITRO_EMU_ROOT", "/tmp/ne-x")
    monkeypatch.setenv("NITRO_EMU_ALLOCATOR", "/tmp/ne-x.yaml")
    config = run_cmd.sleeve_config(_run_args("release:1", "--emulator", "--cpu-count", "1"))
    assert (config.emulator_root, config.emulator_allocator) == ("/tmp/ne-x", "/tmp/ne-x.yaml")
    assert config.cpu_count == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", "8080", "img"], "is not HOST:CONTAINER"),
        (["-f", "enclaver.yaml", "img"], "not allowed with argument"),
        ([], "one of the arguments -f/--file IMAGE is required"),
        (["--cpu-count", "0", "img"], "is not a whole number of at least 1"),
    ],
)
def test_run_usage_errors_exit_2_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _run_args(*argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


# --- enclaveops run: the foreground run, with a stand-in container ---


class FakeContainer:
    """The docker SDK Container calls Foreground makes, replaying a sleeve's output."""

    name = "hello-run"
    short_id = "abc123"

    def __init__(self, chunks: list[tuple[bytes | None, bytes | None]], code: int) -> None:
        self.chunks = chunks
        self.code = code
        self.ended = threading.Event()
        self.calls: list[str] = []
        self.attrs = {
            "NetworkSettings": {
                "Ports": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "32768"}]}
            }
        }

    def attach(self, **_kwargs: Any) -> Iterator[tuple[bytes | None, bytes | None]]:
        def replay() -> Iterator[tuple[bytes | None, bytes | None]]:
            yield from self.chunks
            self.ended.set()

        return replay()

    def start(self) -> None:
        self.calls.append("start")

    def reload(self) -> None:
        pass

    def wait(self) -> dict[str, int]:
        self.ended.wait(10)
        return {"StatusCode": self.code}

    def stop(self, timeout: int) -> None:
        self.calls.append("stop")

    def remove(self, **_kwargs: Any) -> None:
        self.calls.append("remove")


def test_foreground_relays_output_announces_the_enclave_and_exits_with_its_code() -> None:
    container = FakeContainer(
        [
            (None, b"sleeve: starting the enclave\nsleeve: started enclave ID=i-1-enc2"),
            (None, b", CID=16\n"),
            (b"hello: listening\n", None),
        ],
        code=7,
    )
    out, err = io.BytesIO(), io.StringIO()
    assert run_cmd.Foreground(container, out, err).run() == 7  # type: ignore[arg-type]
    assert out.getvalue() == b"hello: listening\n"
    assert "sleeve: started enclave ID=i-1-enc2, CID=16\n" in err.getvalue()
    assert (
        "enclaveops: enclave running: ID=i-1-enc2 CID=16 container=hello-run "
        "ports=127.0.0.1:32768->8080" in err.getvalue()
    )
    assert container.calls == ["start", "stop", "remove"]  # removed however it ended

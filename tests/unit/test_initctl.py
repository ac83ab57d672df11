"""initctl and InitClient: configuration, the command line, and both kinds of init server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclave_runtime.formats.init_errors import (
    DependencyError,
    InitError,
    ServiceStateError,
    UnknownServiceError,
)
from enclave_runtime.formats.init_protocol import (
    ErrorResponse,
    Request,
    RequestKind,
    ServiceState,
)
from enclave_runtime.init import initctl
from enclave_runtime.init.initctl import InitctlConfigError, load_config, main, parse_config
from enclave_runtime.transport.init_client import (
    InitClient,
    InitConnectionError,
    InitctlConfig,
    error_from_response,
)
from enclave_runtime.transport.vsock import ENV_CID, ENV_ROOT, EmulatedFabric
from tests.unit.init_support import BackgroundServer, FakeController, unix_server
from tests.unit.odyn_support import ENCLAVE_CID

# enclave-init's rootfs/etc/initctl.yaml and initctl.host.yaml, as shipped.
ENCLAVE_INIT_INITCTL_YAML = """\
# Protocol to use: "unix" or "vsock"
protocol: unix

# Unix socket configuration
unix_socket_path: /run/init.sock

# VSOCK configuration
vsock_cid: 3      # Parent CID for enclave access
vsock_port: 9001  # Control port
"""
ENCLAVE_INIT_HOST_YAML = """\
# For host accessing enclave over VSOCK
protocol: vsock

# Unix socket (not used when protocol is vsock)
unix_socket_path: /run/init.sock

# VSOCK configuration
vsock_cid: 16     # Enclave CID
vsock_port: 9001  # Control port
"""


@pytest.fixture
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No /etc/initctl.yaml, no INITCTL_CONFIG, no INIT_SOCKET: the defaults apply."""
    monkeypatch.setattr(initctl, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    monkeypatch.delenv(initctl.CONFIG_ENV, raising=False)
    monkeypatch.delenv(initctl.SOCKET_ENV, raising=False)


@pytest.fixture
def server(tmp_path: Path, no_config: None) -> Iterator[BackgroundServer]:
    with unix_server(tmp_path / "init.sock") as running:
        yield running


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --- configuration -------------------------------------------------------------------------------


def test_enclave_inits_shipped_configurations_are_read() -> None:
    assert parse_config(ENCLAVE_INIT_INITCTL_YAML, "initctl.yaml") == InitctlConfig()
    host = parse_config(ENCLAVE_INIT_HOST_YAML, "initctl.host.yaml")
    assert (host.protocol, host.vsock_cid, host.vsock_port) == ("vsock", 16, 9001)


def test_without_a_configuration_file_the_defaults_apply(no_config: None) -> None:
    assert load_config() == InitctlConfig(
        protocol="unix", unix_socket_path="/run/init.sock", vsock_cid=3, vsock_port=9001
    )


def test_initctl_config_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_config: None
) -> None:
    path = tmp_path / "host.yaml"
    path.write_text(ENCLAVE_INIT_HOST_YAML)
    monkeypatch.setenv(initctl.CONFIG_ENV, str(path))
    assert load_config().vsock_cid == 16


def test_a_file_named_explicitly_must_exist(tmp_path: Path, no_config: None) -> None:
    with pytest.raises(InitctlConfigError, match=r"missing\.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("protocol: tcp\n", "protocol is 'tcp'; use 'unix' or 'vsock'"),
        ("vsock_port: 0\n", "vsock_port is 0; use an integer from 1 to 4294967294"),
        ("vsock_cid: -1\n", "vsock_cid is -1"),
        ("vsock_cid: '16'\n", "vsock_cid is '16'"),
        ("unix_socket: /run/x.sock\n", "unknown key 'unix_socket'; the keys are protocol"),
        ("timeout: 0\n", "timeout is 0"),
        ("- unix\n", "must be a mapping"),
        ("protocol: [unix\n", "is not valid YAML"),
    ],
)
def test_a_bad_configuration_names_file_and_key(text: str, message: str) -> None:
    with pytest.raises(InitctlConfigError, match=rf"^conf\.yaml.*{message}"):
        parse_config(text, "conf.yaml")


def test_options_override_init_socket_which_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_config: None
) -> None:
    path = tmp_path / "initctl.yaml"
    path.write_text("unix_socket_path: /from/file.sock\nvsock_cid: 20\n")
    parser = initctl.build_parser()
    monkeypatch.setenv(initctl.SOCKET_ENV, "/from/env.sock")
    config = initctl.config_from_arguments(parser.parse_args(["-c", str(path), "ping"]))
    assert (config.unix_socket_path, config.vsock_cid) == ("/from/env.sock", 20)
    argv = ["-c", str(path), "-s", "/from/cli.sock", "--vsock-cid", "21", "ping"]
    config = initctl.config_from_arguments(parser.parse_args(argv))
    assert (config.unix_socket_path, config.vsock_cid) == ("/from/cli.sock", 21)


# --- the command line against our control server -------------------------------------------------


def test_list_prints_enclave_inits_table(
    server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run_cli(capsys, "-s", str(server.server.unix_socket), "list")
    assert status == 0
    header, rule, db, web = out.splitlines()
    assert header.split() == ["NAME", "ENABLED", "ACTIVE", "RESTART", "RESTARTS", "STATE"]
    assert set(rule) == {"-"}
    assert db.split() == ["db", "enabled", "inactive", "on-failure", "0", "inactive"]
    assert web.split()[0] == "web"


def test_json_output_is_for_scripts(
    server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(server.server.unix_socket)
    status, out, _ = run_cli(capsys, "-s", sock, "--json", "list")
    assert status == 0
    services = json.loads(out)["services"]
    assert [s["name"] for s in services] == ["db", "web"]
    assert services[1]["dependencies"]["after"] == ["db"]
    status, out, _ = run_cli(capsys, "-s", sock, "--json", "start", "web")
    assert json.loads(out)["service"]["pid"] == 4242
    status, out, _ = run_cli(capsys, "-s", sock, "--json", "status", "nope")
    assert status == 1
    assert json.loads(out)["error"]["kind"] == "UnknownService"


def test_status_prints_the_service_and_its_dependencies(
    server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(server.server.unix_socket)
    run_cli(capsys, "-s", sock, "start", "web")
    status, out, _ = run_cli(capsys, "-s", sock, "status", "web")
    assert status == 0
    assert out.splitlines() == [
        "Service: web",
        "  Enabled: yes",
        "  Status: active (running)",
        "  PID: 4242",
        "  Command: /usr/bin/web --serve",
        "  Restart Policy: on-failure",
        "  Restart Delay: 5s",
        "  Restart Count: 0",
        "  After: db",
    ]


def test_an_error_is_one_line_on_stderr_and_exit_status_1(
    server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_cli(capsys, "-s", str(server.server.unix_socket), "status", "nope")
    assert (status, out) == (1, "")
    assert err.startswith("initctl: service 'nope' not found: no unit nope.service")
    assert err.count("\n") == 1


def test_service_commands_reach_the_controller(
    server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(server.server.unix_socket)
    outputs = [
        run_cli(capsys, "-s", sock, *argv)[1]
        for argv in (
            ["disable", "db"],
            ["enable", "--now", "db"],
            ["restart", "db"],
            ["stop", "db"],
            ["logs", "-n", "2", "web"],
            ["logs-clear", "web"],
            ["logs", "web"],
            ["reload"],
            ["system-status"],
            ["ping"],
            ["shutdown"],
        )
    ]
    assert outputs[:4] == [
        "Service 'db' disabled\n",
        "Service 'db' enabled and started\n",
        "Service 'db' restarted\n",
        "Service 'db' stopped\n",
    ]
    assert outputs[4] == "2025-01-01T00:00:03Z line 3\n2025-01-01T00:00:04Z line 4\n"
    assert outputs[5:7] == ["Logs cleared for service 'web'\n", "No logs available\n"]
    assert outputs[7] == "System reloaded: added cache; restarted web\n"
    assert "  Uptime: 1h 2m 5s" in outputs[8].splitlines()
    assert "  Error: cycle: a -> b -> a; a and b are not started" in outputs[8].splitlines()
    assert outputs[9:] == ["Pong - init system is responsive\n", "System shutdown initiated\n"]
    assert ("enable", ("db", True)) in server.controller.calls
    assert ("logs", ("web", 50)) in server.controller.calls
    assert server.controller.shutdown_requested.is_set()


def test_a_log_line_count_out_of_range_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["logs", "-n", "-1", "web"])
    assert exit_.value.code == 2
    assert "-n/--lines must be from 0 to 10000" in capsys.readouterr().err


def test_an_absent_init_is_explained(
    tmp_path: Path, no_config: None, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_cli(capsys, "-s", str(tmp_path / "none.sock"), "ping")
    assert status == 1
    assert "cannot reach the init at" in err and "is odyn running" in err


# --- the client API ------------------------------------------------------------------------------


def test_the_client_raises_the_error_class_the_server_named(
    server: BackgroundServer,
) -> None:
    client = InitClient(InitctlConfig(unix_socket_path=str(server.server.unix_socket)))
    with pytest.raises(UnknownServiceError) as caught:
        client.service_status("nope")
    assert caught.value.name == "nope"
    client.start("web")
    with pytest.raises(ServiceStateError, match="already running"):
        client.start("web")
    assert client.service_status("web").state is ServiceState.RUNNING
    assert [info.name for info in client.list_services()] == ["db", "web"]
    assert client.logs("web", 1) == ["2025-01-01T00:00:04Z line 4"]
    changes = client.reload()
    assert changes is not None and changes.added == ("cache",)
    assert client.system_status().total_services == 3
    client.ping()


def test_error_kinds_map_back_to_classes() -> None:
    request = Request(RequestKind.SERVICE_START, name="web")
    assert isinstance(
        error_from_response(ErrorResponse("x", "Dependency"), request), DependencyError
    )
    plain = error_from_response(ErrorResponse("Service 'web' is disabled"), request)
    assert type(plain) is InitError and str(plain) == "Service 'web' is disabled"


def test_over_vsock_the_parent_is_served_and_another_cid_is_refused(
    enclave_fabric_root: Path,
) -> None:
    options = {"unix_socket": None, "vsock_port": 9001}
    with BackgroundServer(FakeController(), **options):
        config = InitctlConfig(protocol="vsock", vsock_cid=ENCLAVE_CID)
        InitClient(config, fabric=EmulatedFabric(enclave_fabric_root, 3)).ping()
        stranger = InitClient(config, fabric=EmulatedFabric(enclave_fabric_root, 17))
        with pytest.raises(
            InitConnectionError, match=r"not in the enclave's control\.allowed_cids"
        ):
            stranger.ping()


def test_the_initctl_command_on_the_parent_controls_the_enclave_over_vsock(
    enclave_fabric_root: Path, tmp_path: Path
) -> None:
    config = tmp_path / "initctl.host.yaml"
    config.write_text(ENCLAVE_INIT_HOST_YAML)
    parent_env = {
        key: value for key, value in os.environ.items() if key not in (ENV_CID, "INIT_SOCKET")
    }
    parent_env.update({ENV_ROOT: str(enclave_fabric_root), "INITCTL_CONFIG": str(config)})
    with BackgroundServer(FakeController(), unix_socket=None, vsock_port=9001) as running:
        result = subprocess.run(
            [sys.executable, "-m", "enclave_runtime.init.initctl", "--json", "start", "web"],
            env=parent_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["message"] == "Service 'web' started"
    assert running.controller.calls == [("start", "web")]


# --- against enclave-init's own init -------------------------------------------------------------


class EnclaveInitLike:
    """A server that behaves as enclave-init's: one recv, a JSON answer without newline, close."""

    def __init__(self, path: Path, answers: dict[str, bytes]) -> None:
        self.answers = answers
        self.requests: list[object] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.fsencode(path))
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                request = json.loads(conn.recv(8192))
                self.requests.append(request)
                variant = request if isinstance(request, str) else next(iter(request))
                conn.sendall(self.answers[variant])

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


def test_enable_now_against_enclave_init_sends_a_start_as_its_initctl_does(
    tmp_path: Path, no_config: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "init.sock"
    legacy = EnclaveInitLike(
        path,
        {
            "ServiceEnable": b'{"Success":{"message":"Service \'web\' enabled"}}',
            "ServiceStart": b'{"Success":{"message":"Service \'web\' started"}}',
            "ListServices": b'{"ServiceList":{"services":[{"name":"web","enabled":true,'
            b'"active":true,"restart_policy":"always","restart_count":1}]}}',
        },
    )
    try:
        status, out, _ = run_cli(capsys, "-s", str(path), "enable", "--now", "web")
        assert (status, out) == (0, "Service 'web' started\n")
        status, out, _ = run_cli(capsys, "-s", str(path), "list")
        assert out.splitlines()[2].split() == ["web", "enabled", "active", "always", "1", "running"]
    finally:
        legacy.close()
    assert legacy.requests == [
        {"ServiceEnable": {"name": "web", "now": True}},
        {"ServiceStart": {"name": "web"}},
        "ListServices",
    ]

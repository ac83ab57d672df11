"""The launcher: process group, working directory, user, environment, reaping and stopping."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import signal
import subprocess
from collections.abc import Awaitable
from pathlib import Path
from typing import Callable, TypeVar

import pytest

from enclave_runtime.formats.protocol import AppStatus, StatusExited, StatusSignaled
from enclave_runtime.process.launcher import (
    App,
    ChildReaper,
    Credentials,
    LaunchError,
    LaunchSpec,
    app_environment,
    resolve_user,
    start_app,
)
from tests.unit.odyn_support import PYTHON, eventually

T = TypeVar("T")
# For the user-switch tests: programs every user may run (the venv's Python lives under /root).
IDENTITY = ("sh", "-c", "id -u; id -g; id -G")

REPORT = """
import json, os, sys
json.dump({
    "pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0), "cwd": os.getcwd(),
    "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
    "env": dict(os.environ), "stdin": sys.stdin.read(),
}, sys.stdout)
"""


def _run(scenario: Callable[[ChildReaper], Awaitable[T]]) -> T:
    """Run ``scenario`` with a reaper installed, as the supervisor does."""

    async def main() -> T:
        reaper = ChildReaper()
        reaper.install()
        try:
            return await scenario(reaper)
        finally:
            reaper.remove()

    return asyncio.run(main())


def _launch_and_collect(spec: LaunchSpec) -> tuple[AppStatus, bytes]:
    """Start ``spec`` with its output in a pipe; the final status and everything it wrote."""
    read_fd, write_fd = os.pipe()

    async def scenario(reaper: ChildReaper) -> tuple[AppStatus, bytes]:
        app = start_app(_with_output(spec, write_fd), reaper)
        os.close(write_fd)
        status = await asyncio.wait_for(app.wait(), 20)
        return status, await asyncio.get_running_loop().run_in_executor(None, _read_all, read_fd)

    try:
        return _run(scenario)
    finally:
        os.close(read_fd)
        if not _closed(write_fd):
            os.close(write_fd)


def _with_output(spec: LaunchSpec, fd: int) -> LaunchSpec:
    return LaunchSpec(spec.argv, spec.env, spec.cwd, spec.credentials, fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _report(spec: LaunchSpec) -> dict[str, object]:
    status, output = _launch_and_collect(spec)
    assert status == StatusExited(0), output
    return json.loads(output)


# --- exit statuses -----------------------------------------------------------------------------


def test_exit_code_and_both_output_streams_are_reported() -> None:
    spec = LaunchSpec(("sh", "-c", "echo out; echo err >&2; exit 7"), os.environ)
    status, output = _launch_and_collect(spec)
    assert status == StatusExited(7)
    assert sorted(output.splitlines()) == [b"err", b"out"]


def test_death_by_signal_is_reported_with_its_number_and_name() -> None:
    status, _ = _launch_and_collect(LaunchSpec(("sh", "-c", "kill -KILL $$"), os.environ))
    assert status == StatusSignaled(9, "SIGKILL")


# --- what the application runs with ------------------------------------------------------------


def test_the_application_leads_its_own_session_and_process_group() -> None:
    report = _report(LaunchSpec((PYTHON, "-c", REPORT), os.environ))
    assert report["pgid"] == report["pid"] == report["sid"]
    assert report["pgid"] != os.getpgid(0)
    assert report["stdin"] == ""  # /dev/null, never odyn's console


def test_working_directory_and_environment_are_the_images_plus_proxy_variables(
    tmp_path: Path,
) -> None:
    image_env = {"PATH": os.environ["PATH"], "APP_MODE": "production", "http_proxy": "old"}
    proxy_env = {"http_proxy": "http://127.0.0.1:10000", "no_proxy": "localhost,127.0.0.1"}
    env = app_environment(image_env, proxy_env, None)
    report = _report(LaunchSpec((PYTHON, "-c", REPORT), env, cwd=str(tmp_path)))
    assert report["cwd"] == str(tmp_path)
    app_env = report["env"]
    assert isinstance(app_env, dict)
    assert app_env["APP_MODE"] == "production"
    assert app_env["http_proxy"] == "http://127.0.0.1:10000"
    assert app_env["no_proxy"] == "localhost,127.0.0.1"
    assert app_env["HOME"] == pwd.getpwuid(os.getuid()).pw_dir


def test_home_follows_the_user_unless_the_image_sets_it() -> None:
    nobody = Credentials(uid=65534, gid=65534, home="/nonexistent")
    assert app_environment({}, {}, nobody)["HOME"] == "/nonexistent"
    assert app_environment({"HOME": "/srv"}, {}, nobody)["HOME"] == "/srv"


def test_users_resolve_as_docker_resolves_them() -> None:
    root = resolve_user("root")
    assert (root.uid, root.gid, root.home) == (0, 0, "/root")
    root_in_group_12 = resolve_user("0:12")
    assert (root_in_group_12.uid, root_in_group_12.gid, root_in_group_12.home) == (0, 12, "/root")
    assert 12 in root_in_group_12.groups
    unknown = resolve_user("12345")
    assert (unknown.uid, unknown.gid, unknown.home, unknown.groups) == (12345, 0, "/", (0,))
    assert resolve_user("12345:54321").gid == 54321


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-user", "no user 'no-such-user' in the image's /etc/passwd"),
        ("root:no-such-group", "no group 'no-such-group' in the image's /etc/group"),
        (":0", "give a user name or uid"),
        ("4294967296", "not a valid id"),
    ],
)
def test_unknown_users_and_groups_are_named(spec: str, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        resolve_user(spec)


def _identity(credentials: Credentials) -> tuple[int, int, list[int]]:
    status, output = _launch_and_collect(LaunchSpec(IDENTITY, os.environ, "/", credentials))
    assert status == StatusExited(0), output
    uid, gid, groups = output.decode().splitlines()
    return int(uid), int(gid), sorted(int(group) for group in groups.split())


@pytest.mark.root
def test_the_application_runs_as_the_images_user_without_roots_groups() -> None:
    nobody = resolve_user("nobody")
    uid, gid, groups = _identity(nobody)
    assert (uid, gid) == (nobody.uid, nobody.gid)
    assert groups == sorted(set(nobody.groups))
    assert 0 not in groups


@pytest.mark.root
def test_a_uid_without_passwd_entry_runs_with_the_given_gid() -> None:
    assert _identity(resolve_user("4242:4343")) == (4242, 4343, [4343])


# --- failures to start -------------------------------------------------------------------------


def _start_error(spec: LaunchSpec) -> str:
    async def scenario(reaper: ChildReaper) -> str:
        with pytest.raises(LaunchError) as err:
            start_app(spec, reaper)
        return str(err.value)

    return _run(scenario)


def test_a_missing_program_is_named_with_the_path_searched() -> None:
    message = _start_error(LaunchSpec(("no-such-app",), {"PATH": "/usr/bin:/bin"}))
    assert "'no-such-app': not found (PATH=/usr/bin:/bin)" in message
    assert "ENTRYPOINT/CMD" in message


def test_a_missing_working_directory_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "srv")
    message = _start_error(LaunchSpec(("true",), os.environ, cwd=missing))
    assert f"working directory {missing!r}" in message


def test_a_program_that_is_not_executable_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "app.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    message = _start_error(LaunchSpec((str(script),), os.environ))
    assert "permission denied" in message


def test_an_empty_command_is_refused() -> None:
    assert "after --" in _start_error(LaunchSpec((), os.environ))


# --- stopping ----------------------------------------------------------------------------------

READY_THEN_WAIT = """
import signal, sys, time
{setup}
print("ready", flush=True)
time.sleep(60)
"""


def _stop_scenario(setup: str, grace: float) -> AppStatus:
    """Start an app that prints ready after ``setup``; ask it to stop; its final status."""
    read_fd, write_fd = os.pipe()
    program = READY_THEN_WAIT.format(setup=setup)

    async def scenario(reaper: ChildReaper) -> AppStatus:
        app = start_app(LaunchSpec((PYTHON, "-c", program), os.environ, output=write_fd), reaper)
        os.close(write_fd)
        with os.fdopen(os.dup(read_fd), "rb") as output:
            line = await asyncio.get_running_loop().run_in_executor(None, output.readline)
        assert line == b"ready\n"
        app.stop(signal.SIGTERM, grace)
        return await asyncio.wait_for(app.wait(), 20)

    try:
        return _run(scenario)
    finally:
        os.close(read_fd)


def test_sigterm_reaches_the_application_which_may_exit_cleanly() -> None:
    setup = "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))"
    assert _stop_scenario(setup, grace=20) == StatusExited(3)


def test_an_application_that_ignores_sigterm_is_killed_after_the_grace_period() -> None:
    setup = "signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    assert _stop_scenario(setup, grace=0.2) == StatusSignaled(9)


def test_the_default_sigterm_disposition_is_reported_as_signaled() -> None:
    assert _stop_scenario("", grace=20) == StatusSignaled(15, "SIGTERM")


# --- reaping and leftovers ---------------------------------------------------------------------


def test_every_child_is_reaped_not_only_the_application() -> None:
    """As PID 1, odyn inherits orphans; any child of odyn that ends must not stay a zombie."""

    async def scenario(reaper: ChildReaper) -> None:
        stray = subprocess.Popen(["true"])
        os.waitid(os.P_PID, stray.pid, os.WEXITED | os.WNOWAIT)  # a zombie now, not reaped
        reaper.reap()
        with pytest.raises(ChildProcessError):
            os.waitpid(stray.pid, os.WNOHANG)
        stray.returncode = 0

    _run(scenario)


def test_what_the_application_leaves_in_its_group_is_killed_when_it_ends() -> None:
    read_fd, write_fd = os.pipe()

    async def scenario(reaper: ChildReaper) -> int:
        spec = LaunchSpec(("sh", "-c", "sleep 60 & echo $!"), os.environ, output=write_fd)
        app: App = start_app(spec, reaper)
        os.close(write_fd)
        assert await asyncio.wait_for(app.wait(), 20) == StatusExited(0)
        with os.fdopen(os.dup(read_fd), "rb") as output:
            leftover = int(output.readline())
        await eventually(lambda: _gone_or_zombie(leftover))
        return leftover

    try:
        _run(scenario)
    finally:
        os.close(read_fd)


def _gone_or_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"

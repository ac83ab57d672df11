"""Runs the application: its own process group, the image's directory, user and environment.

odyn is either PID 1 (raw-init mode) or the child of AWS's init. Either way it reaps every child
it has on SIGCHLD, not only the application: as PID 1 that includes every orphan in the
enclave; otherwise orphans go to init, which reaps them. The application runs in a new session,
so its process ID is also its process group ID and signals reach everything it started there.

Stopping: SIGTERM (or SIGINT) is forwarded to the whole group; if the application is still
running after the grace period, the group gets SIGKILL. When the application's main process
ends, whatever it left behind in its group is killed: the application is over.

The working directory, user and environment default to odyn's own: the amended image starts
odyn as ``ENTRYPOINT odyn ... -- <app>`` with the image's WorkingDir, User and Env. AWS's init
starts the entrypoint as root in ``/``, so the build passes the image's User and WorkingDir to
odyn explicitly (``--user``, ``--workdir``) and odyn applies them when it starts the application.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import logging
import os
import pwd
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.formats.protocol import AppStatus, StatusExited, StatusSignaled

LOG = logging.getLogger("odyn")

DEFAULT_GRACE_PERIOD = 10.0
_MAX_ID = 2**32 - 2


class LaunchError(EnclaveOpsError):
    """The application could not be started (command, working directory or user)."""


@dataclass(frozen=True)
class Credentials:
    """Who the application runs as, resolved the way Docker resolves an image's ``User``."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    home: str = "/"


@dataclass(frozen=True)
class LaunchSpec:
    """What to run and how. ``output`` is the fd for stdout and stderr (None: inherit odyn's)."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    credentials: Credentials | None = None
    output: int | None = None


def resolve_user(spec: str, label: str | None = None) -> Credentials:
    """``user``, ``uid``, ``user:group``, ``uid:gid`` (mixed too), as Docker's ``USER`` reads.

    Names are looked up in the image's ``/etc/passwd`` and ``/etc/group`` (odyn runs inside the
    image's root file system). A numeric uid without a passwd entry runs with gid 0 and home
    ``/``, as under Docker. ``label`` says where ``spec`` came from in error messages.
    """
    label = label or f"--user {spec!r}"
    user, _, group = spec.partition(":")
    if not user:
        raise LaunchError(f"{label}: give a user name or uid, optionally :group or :gid")
    entry = _passwd_entry(user, label)
    if entry is None:
        uid, gid, groups, home = _numeric_id(user, label), 0, (), "/"
    else:
        uid, gid, home = entry.pw_uid, entry.pw_gid, entry.pw_dir or "/"
    if group:
        gid = _group_id(group, label)
    if entry is not None:
        groups = tuple(os.getgrouplist(entry.pw_name, gid))
    return Credentials(uid=uid, gid=gid, groups=groups or (gid,), home=home)


def _passwd_entry(user: str, label: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        if user.isdigit():
            return None
        raise LaunchError(
            f"{label}: there is no user {user!r} in the image's /etc/passwd; "
            "use a numeric uid or add the user to the image"
        ) from None


def _numeric_id(value: str, label: str) -> int:
    number = int(value)
    if number > _MAX_ID:
        raise LaunchError(f"{label}: {number} is not a valid id (0..{_MAX_ID})")
    return number


def _group_id(group: str, label: str) -> int:
    if group.isdigit():
        return _numeric_id(group, label)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise LaunchError(
            f"{label}: there is no group {group!r} in the image's /etc/group; "
            "use a numeric gid or add the group to the image"
        ) from None


def app_environment(
    base: Mapping[str, str], extra: Mapping[str, str], credentials: Credentials | None
) -> dict[str, str]:
    """The image's environment plus ``extra`` (proxy variables win), with HOME as Docker sets it."""
    env = {**base, **extra}
    if "HOME" not in env:
        env["HOME"] = credentials.home if credentials is not None else _own_home()
    return env


def _own_home() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir or "/"
    except KeyError:
        return "/"


def status_from_wait(wait_status: int) -> AppStatus:
    """The status line for a raw ``waitpid`` status."""
    if os.WIFSIGNALED(wait_status):
        return StatusSignaled(os.WTERMSIG(wait_status))
    return StatusExited(os.WEXITSTATUS(wait_status))


class ChildReaper:
    """Reaps every child of this process on SIGCHLD; hands watched ones' statuses to waiters.

    Must be installed from the main thread (asyncio's signal handling requires it). While it is
    installed it also reaps children started by other code in the process, so such code must
    not wait for its own children (odyn starts none besides the application).
    """

    def __init__(self) -> None:
        self._watched: dict[int, asyncio.Future[int]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def remove(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def watch(self, pid: int) -> asyncio.Future[int]:
        """A future for ``pid``'s wait status; call it right after starting the child."""
        future = asyncio.get_running_loop().create_future()
        self._watched[pid] = future
        return future

    def reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            future = self._watched.pop(pid, None)
            if future is None:
                LOG.debug("reaped process %d (status %#x)", pid, wait_status)
            elif not future.done():
                future.set_result(wait_status)


class App:
    """The running application (process group leader ``pid``)."""

    def __init__(self, process: subprocess.Popen[bytes], exited: asyncio.Future[int]) -> None:
        # The Popen object is kept so that subprocess never polls (and reaps) this pid itself.
        self._process = process
        self._exited = exited
        self._kill_timer: asyncio.TimerHandle | None = None
        self.pid = process.pid
        self.stopping = False

    @property
    def running(self) -> bool:
        return not self._exited.done()

    async def wait(self) -> AppStatus:
        """Wait for the main process to end; kill what it left in its group; its status."""
        wait_status = await asyncio.shield(self._exited)
        self._process.returncode = os.waitstatus_to_exitcode(wait_status)
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        if self._signal_group(signal.SIGKILL, quiet=True):
            LOG.info("killed what the application left running in its process group")
        return status_from_wait(wait_status)

    def forward(self, signum: int) -> None:
        """Pass a signal odyn received on to the application's whole process group."""
        if self.running:
            LOG.info("forwarding %s to the application", signal.Signals(signum).name)
            self._signal_group(signum)

    def stop(self, signum: int, grace_period: float) -> None:
        """Forward ``signum``; SIGKILL the group if the application outlives ``grace_period``."""
        self.stopping = True
        self.forward(signum)
        if self.running and self._kill_timer is None:
            loop = asyncio.get_running_loop()
            self._kill_timer = loop.call_later(grace_period, self._kill_after_grace, grace_period)

    def _kill_after_grace(self, grace_period: float) -> None:
        if self.running:
            LOG.warning(
                "the application is still running %.1f s after being asked to stop; "
                "sending SIGKILL",
                grace_period,
            )
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: int, quiet: bool = False) -> bool:
        """Send ``signum`` to the group; False when nobody is left in it."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            return False
        except PermissionError as err:
            if not quiet:
                LOG.warning("cannot signal the application's process group: %s", err)
            return False
        return True


def start_app(spec: LaunchSpec, reaper: ChildReaper) -> App:
    """Start the application in a new session; raises :class:`LaunchError` if it cannot start."""
    if not spec.argv:
        raise LaunchError("no command to run: give the application's command after --")
    switch = switch_arguments(spec.credentials)
    try:
        process = subprocess.Popen(
            list(spec.argv),
            stdin=subprocess.DEVNULL,
            stdout=spec.output,
            stderr=spec.output,
            cwd=spec.cwd,
            env=dict(spec.env),
            start_new_session=True,
            **switch,
        )
    except OSError as err:
        raise LaunchError(_launch_failure(spec, err)) from err
    return App(process, reaper.watch(process.pid))


def switch_arguments(credentials: Credentials | None) -> dict[str, object]:
    """Popen's user switch, or nothing when the process runs as odyn does (application, service)."""
    if credentials is None or (credentials.uid, credentials.gid) == (os.getuid(), os.getgid()):
        return {}
    # extra_groups always: without it the process would keep odyn's (root's) groups.
    return {
        "user": credentials.uid,
        "group": credentials.gid,
        "extra_groups": list(credentials.groups),
    }


def _launch_failure(spec: LaunchSpec, err: OSError) -> str:
    program = spec.argv[0]
    reason = err.strerror or str(err)
    if err.errno == errno.EPERM and switch_arguments(spec.credentials):
        assert spec.credentials is not None
        return (
            f"cannot start the application as uid {spec.credentials.uid} gid "
            f"{spec.credentials.gid}: {reason}; odyn must run as root to switch users"
        )
    if spec.cwd is not None and err.filename == spec.cwd:
        return (
            f"cannot start the application in working directory {spec.cwd!r}: {reason}; "
            "create it in the image or fix --workdir (the image's WorkingDir)"
        )
    if err.errno == errno.ENOENT:
        return (
            f"cannot start the application {program!r}: not found (PATH="
            f"{spec.env.get('PATH', os.defpath)}); check the image's ENTRYPOINT/CMD"
        )
    if err.errno == errno.EACCES:
        return (
            f"cannot start the application {program!r}: permission denied; make it executable "
            "for the user it runs as"
        )
    return f"cannot start the application {program!r}: {reason}"

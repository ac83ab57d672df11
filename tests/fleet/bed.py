"""The fleet test bed: parent hosts and a builder made of network and mount namespaces.

Each host is an ``ip netns`` with a veth on the bed's bridge, a mount namespace of its own (its
/root, /etc/ssh, /run, /tmp, /var/lib/docker, /var/lib/nitro-emu and /etc/nitro_enclaves are
directories of the bed, and the controller's checkout is hidden), its own sshd and its own Docker
engine. A registry (Debian's docker-registry) listens on the bridge's address. tests/fleet/README.md
describes the layout; ``Bed.stop`` and ``cleanup_stale`` take all of it down again.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "eofl"
BRIDGE = f"{PREFIX}0"
SUBNET = "10.231.0"
CONTROLLER_ADDRESS = f"{SUBNET}.1"
REGISTRY_PORT = 5000
REGISTRY = f"{CONTROLLER_ADDRESS}:{REGISTRY_PORT}"
STATE_DIR = Path("/var/lib/enclaveops-fleet-bed")
IPTABLES_COMMENT = "enclaveops-fleet-bed"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Directories every host gets of its own, bind-mounted from the bed's directory on disk (the
# emulator root must be on a real filesystem). /etc and /var/lib start as copies of the
# controller's (less its Docker data), so a host has its packages' state but its own files:
# /etc/ssh, /etc/docker, /etc/nitro_enclaves, /var/lib/docker, /var/lib/nitro-emu. /run holds the
# engine's socket and the emulator's default root (/run/nitro-emu), so a host's Docker SDK and
# nitro-emu find their own. /var/lib comes last: the bed's own directory is under it.
OWN_DIRS = ("/root", "/run", "/tmp", "/var/tmp", "/etc", "/var/lib")
COPIED_DIRS = ("/etc", "/var/lib")
# Left out of the copy of /var/lib: the controller's engine and databases, and the bed itself.
NOT_COPIED = ("docker", "containerd", "postgresql", STATE_DIR.name)
# Controller paths hidden on every host (an empty directory over each), as on a real fleet; the
# top-level directory of the checkout is added wherever the clone lives (CI clones elsewhere).
HIDDEN_DIRS = ("/work", "/home")
# Top-level directories a host needs from the controller: the bed cannot hide a checkout in them.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt", "/var")
REQUIRED_COMMANDS = (
    "/usr/sbin/sshd",
    "/usr/bin/ssh-keygen",
    "/usr/bin/docker-registry",
    "/usr/sbin/ip",
    "/usr/sbin/iptables",
    "/usr/bin/nsenter",
    "/usr/bin/unshare",
    "/usr/sbin/dockerd",
)


class BedError(RuntimeError):
    """A step of building the bed failed; the message names the step and its output."""


def hidden_dirs(checkout: Path = REPO_ROOT) -> tuple[str, ...]:
    """HIDDEN_DIRS plus the top-level directory holding ``checkout``, unless a host has its own."""
    if any(checkout.is_relative_to(d) for d in (*HIDDEN_DIRS, *OWN_DIRS)):
        if any(checkout.is_relative_to(d) for d in COPIED_DIRS):
            raise BedError(
                f"the checkout {checkout} would be copied onto every host; clone it elsewhere"
            )
        return HIDDEN_DIRS
    top = "/" + checkout.parts[1]
    if top in SYSTEM_DIRS:
        raise BedError(
            f"the checkout {checkout} is under {top}, which hosts need and the bed cannot hide;"
            " clone it elsewhere (for example under /work or /srv)"
        )
    return (*HIDDEN_DIRS, top)


@dataclass
class Host:
    """One host of the bed: its namespace, address, directories and daemons."""

    name: str
    address: str
    index: int
    enclave_enabled: bool
    root: Path
    holder: subprocess.Popen[bytes] | None = None
    sshd: subprocess.Popen[bytes] | None = None
    dockerd: subprocess.Popen[bytes] | None = None

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.name}"

    @property
    def docker_host(self) -> str:
        """The engine's socket as the controller reaches it (the host's own /run/docker.sock)."""
        return f"unix://{self.root / 'run' / 'docker.sock'}"

    def own(self, path: str) -> Path:
        """The bed directory mounted at ``path`` (one of OWN_DIRS) on this host."""
        return self.root / path.strip("/").replace("/", "_")

    def path(self, path: str) -> Path:
        """Where the controller finds the file that is ``path`` on this host."""
        mount = max((d for d in OWN_DIRS if path == d or path.startswith(d + "/")), key=len)
        return self.own(mount) / path[len(mount) :].lstrip("/")

    def enter(self, *command: str) -> list[str]:
        """``command`` run inside this host's network and mount namespaces."""
        assert self.holder is not None, f"{self.name} has no namespace yet"
        return [
            "nsenter",
            f"--net=/run/netns/{self.netns}",
            f"--mount=/proc/{self.holder.pid}/ns/mnt",
            "--",
            *command,
        ]


@dataclass
class Bed:
    """Three enclave-enabled parents and one builder, reached over SSH from the controller."""

    parents: int = 3
    hosts: list[Host] = field(default_factory=list)
    registry: subprocess.Popen[bytes] | None = None

    @property
    def key(self) -> Path:
        return STATE_DIR / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return STATE_DIR / "known_hosts"

    def host(self, name: str) -> Host:
        return next(host for host in self.hosts if host.name == name)

    def start(self) -> Bed:
        """Builds the whole bed; on any failure takes down what was built and raises."""
        cleanup_stale()
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        STATE_DIR.mkdir(parents=True, mode=0o700)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-bed", "-f", str(self.key))
        names = [f"p{i}" for i in range(1, self.parents + 1)] + ["builder"]
        for index, name in enumerate(names, start=1):
            self.hosts.append(
                Host(
                    name=name,
                    address=f"{SUBNET}.{10 + index}",
                    index=index,
                    enclave_enabled=name != "builder",
                    root=STATE_DIR / name,
                )
            )
        self._network()
        self._start_registry()
        for host in self.hosts:
            self._prepare(host)
            self._start_holder(host)
            self._start_sshd(host)
            self.start_engine(host)
        for host in self.hosts:
            _wait_for(lambda h=host: _port_open(h.address, 22), f"sshd of {host.name}", host)
            _wait_for(lambda h=host: _engine_answers(h), f"dockerd of {host.name}", host)
        self.known_hosts.write_text(
            "".join(
                f"{host.address} {_host_key(host).with_suffix('.pub').read_text()}"
                for host in self.hosts
            )
        )

    def _network(self) -> None:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{CONTROLLER_ADDRESS}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        # This machine's FORWARD policy (set by its own Docker) drops traffic between two ports of
        # a bridge when br_netfilter is loaded; the bed's hosts talk to each other across it.
        rule = ["-i", BRIDGE, "-o", BRIDGE, "-m", "comment", "--comment", IPTABLES_COMMENT]
        _run("iptables", "-I", "FORWARD", "1", *rule, "-j", "ACCEPT")
        for host in self.hosts:
            veth = f"{PREFIX}-{host.name}"[:15]
            _run("ip", "netns", "add", host.netns)
            peer = ["peer", "name", "eth0", "netns", host.netns]
            _run("ip", "link", "add", veth, "type", "veth", *peer)
            _run("ip", "link", "set", veth, "master", BRIDGE, "up")
            inside = ["ip", "-n", host.netns]
            _run(*inside, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _run(*inside, "link", "set", "eth0", "up")
            _run(*inside, "link", "set", "lo", "up")
            _run(*inside, "route", "add", "default", "via", CONTROLLER_ADDRESS)

    def _start_registry(self) -> None:
        root = STATE_DIR / "registry"
        (root / "data").mkdir(parents=True)
        config = {
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {
                "filesystem": {"rootdirectory": str(root / "data")},
                "delete": {"enabled": True},
            },
            "http": {"addr": REGISTRY},
        }
        (root / "config.yml").write_text(json.dumps(config))
        self.registry = _spawn(
            ["docker-registry", "serve", str(root / "config.yml")], root / "registry.log"
        )
        _wait_for(lambda: _port_open(CONTROLLER_ADDRESS, REGISTRY_PORT), "the registry", None)

    def _prepare(self, host: Host) -> None:
        for path in (*OWN_DIRS, *(f"/hidden{d}" for d in hidden_dirs())):
            host.own(path).mkdir(parents=True, mode=0o755)
        for path in COPIED_DIRS:
            for entry in Path(path).iterdir():
                if entry.name not in NOT_COPIED:
                    _run("cp", "-a", str(entry), str(host.own(path)))
        for directory in (
            "/etc/nitro_enclaves",
            "/etc/docker",
            "/var/lib/docker",
            "/var/lib/nitro-emu",
        ):
            host.path(directory).mkdir(parents=True, exist_ok=True)
        host.own("/etc").joinpath("hostname").write_text(f"{host.name}\n")
        ssh_dir = host.own("/root") / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        shutil.copy(self.key.with_suffix(".pub"), ssh_dir / "authorized_keys")
        etc_ssh = host.own("/etc") / "ssh"
        for old_key in etc_ssh.glob("ssh_host_*"):
            old_key.unlink()
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(_host_key(host)))
        (etc_ssh / "sshd_config").write_text(_sshd_config(host))
        daemon = {
            "insecure-registries": [REGISTRY],
            # A bridge inside the host's namespace, on an address range of its own.
            "bip": f"172.31.{host.index}.1/24",
            "cgroup-parent": f"/{host.netns}",
            "shutdown-timeout": 2,
        }
        host.own("/etc").joinpath("docker", "daemon.json").write_text(json.dumps(daemon))

    def _start_holder(self, host: Host) -> None:
        """A process that owns the host's mount namespace, with its directories mounted."""
        hidden = [d for d in hidden_dirs() if Path(d).is_dir()]
        mounts = [f"mount --bind {host.own('/hidden' + d)} {d}" for d in hidden]
        mounts += [f"mount --bind {host.own(d)} {d}" for d in OWN_DIRS]
        mounts += ["mkdir -p /run/sshd /run/nitro-emu", "echo ready", "exec sleep infinity"]
        host.holder = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{host.netns}",
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-ec",
                "; ".join(mounts),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert host.holder.stdout is not None
        line = host.holder.stdout.readline().decode()
        if line.strip() != "ready":
            rest = host.holder.stdout.read().decode()
            raise BedError(f"mount namespace of {host.name}: {line}{rest}")

    def _start_sshd(self, host: Host) -> None:
        host.sshd = _spawn(host.enter("/usr/sbin/sshd", "-D", "-e"), host.root / "sshd.log")

    def start_engine(self, host: Host) -> None:
        """Starts the host's dockerd (as its boot would); it uses the host's own directories."""
        # nsenter --net, not `ip netns exec`: that one remounts /sys and hides the cgroup mounts.
        command = host.enter(
            "dockerd",
            "--config-file=/etc/docker/daemon.json",
            "--data-root=/var/lib/docker",
            "--exec-root=/run/docker",
            "--host=unix:///run/docker.sock",
            "--pidfile=/run/docker.pid",
        )
        host.dockerd = _spawn(command, host.root / "dockerd.log")

    def stop_engine(self, host: Host) -> None:
        """Stops the host's dockerd, which stops its containers (a reboot, as far as they know)."""
        _terminate(host.dockerd, timeout=20)
        host.dockerd = None

    def ssh(self, host: Host, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs ``command`` on ``host`` through its sshd, as Ansible's ssh connection does."""
        return subprocess.run(
            ["ssh", *self.ssh_options(), f"root@{host.address}", command],
            check=check,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def ssh_options(self) -> list[str]:
        return [
            "-i",
            str(self.key),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ]

    def inventory(self, connection: str = "ssh") -> dict[str, object]:
        """A static inventory of the bed (YAML-shaped), for Ansible over ``connection``."""

        def hostvars(host: Host) -> dict[str, object]:
            return {
                "ansible_host": host.address,
                "ansible_user": "root",
                "ansible_connection": connection,
                "ansible_ssh_private_key_file": str(self.key),
                "ansible_python_interpreter": "/usr/bin/python3",
            }

        parents = {h.name: hostvars(h) for h in self.hosts if h.enclave_enabled}
        builders = {h.name: hostvars(h) for h in self.hosts if not h.enclave_enabled}
        return {
            "all": {
                "children": {
                    "nitro_parents": {"hosts": parents},
                    "nitro_builders": {"hosts": builders},
                }
            }
        }

    def ansible_env(self) -> dict[str, str]:
        """Environment for ansible-playbook on the bed: the bed's known_hosts, pipelining on."""
        env = dict(os.environ)
        env.update(
            {
                "ANSIBLE_SSH_ARGS": " ".join(
                    [f"-o UserKnownHostsFile={self.known_hosts}", "-o StrictHostKeyChecking=yes"]
                ),
                "ANSIBLE_PIPELINING": "true",
                # paramiko reads only ~/.ssh/known_hosts (the controller's); the bed's keys are
                # checked by the ssh connection above.
                "ANSIBLE_PARAMIKO_HOST_KEY_CHECKING": "false",
                "ANSIBLE_HOST_KEY_CHECKING": "true",
                "ANSIBLE_LOCALHOST_WARNING": "false",
                "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
            }
        )
        return env

    def ansible(
        self,
        tool: str,
        *args: str,
        inventory: Path,
        extra_env: dict[str, str] | None = None,
        timeout: int = 600,
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``tool`` (ansible, ansible-playbook, ansible-inventory) of the venv on the bed,
        from the repository root (its ansible.cfg) with ``inventory``."""
        venv_bin = Path(sys.executable).parent
        env = self.ansible_env()
        env.update(
            {
                "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
                "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"),
                "ANSIBLE_NOCOLOR": "1",
                **(extra_env or {}),
            }
        )
        return subprocess.run(
            [str(venv_bin / tool), "-i", str(inventory), *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> None:
        """Takes the bed down: daemons, namespaces, links, iptables rules, directories."""
        atexit.unregister(self.stop)
        for host in self.hosts:
            _terminate(host.dockerd, timeout=20)
            _terminate(host.sshd, timeout=5)
        _terminate(self.registry, timeout=5)
        for host in self.hosts:
            _terminate(host.holder, timeout=5)
        self.hosts.clear()
        cleanup_stale()


def cleanup_stale() -> None:
    """Removes whatever a bed left behind (this one or an earlier run that was killed)."""
    listed = _out("ip", "netns", "list").splitlines()
    namespaces = [n.split()[0] for n in listed if n.startswith(f"{PREFIX}-")]
    for _ in range(3):
        victims = set(_cgroup_tasks())
        for netns in namespaces:
            victims.update(int(p) for p in _out("ip", "netns", "pids", netns).split())
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not victims:
            break
        time.sleep(0.5)
    _kill_registry()
    for netns in namespaces:
        subprocess.run(["ip", "netns", "delete", netns], check=False, capture_output=True)
    for link in _out("ip", "-o", "link", "show").splitlines():
        name = link.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX):
            subprocess.run(["ip", "link", "delete", name], check=False, capture_output=True)
    for rule in _out("iptables", "-S", "FORWARD").splitlines():
        if IPTABLES_COMMENT in rule:
            delete = rule.replace("-A FORWARD", "-D FORWARD", 1)
            subprocess.run(["sh", "-c", f"iptables {delete}"], check=False, capture_output=True)
    for cgroup in _bed_cgroups():
        for child in sorted(cgroup.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            cgroup.rmdir()
    if STATE_DIR.exists():
        shutil.rmtree(STATE_DIR)


def _bed_cgroups() -> Iterator[Path]:
    base = Path("/sys/fs/cgroup")
    yield from base.glob(f"{PREFIX}-*")
    yield from base.glob(f"*/{PREFIX}-*")


def _cgroup_tasks() -> Iterator[int]:
    for cgroup in _bed_cgroups():
        for tasks in (*cgroup.rglob("tasks"), *cgroup.rglob("cgroup.procs")):
            with contextlib.suppress(OSError):
                yield from (int(pid) for pid in tasks.read_text().split())


def _kill_registry() -> None:
    """Kills a registry an earlier bed left (it runs in the controller's namespaces)."""
    marker = str(STATE_DIR / "registry" / "config.yml")
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if marker in proc.joinpath("cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)


def _host_key(host: Host) -> Path:
    return host.own("/etc") / "ssh" / "ssh_host_ed25519_key"


def _sshd_config(host: Host) -> str:
    return "\n".join(
        [
            f"ListenAddress {host.address}:22",
            "HostKey /etc/ssh/ssh_host_ed25519_key",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "PidFile /run/sshd.pid",
            # Ansible opens a connection per fork and multiplexes sessions over a master.
            "MaxStartups 50",
            "MaxSessions 50",
            "Subsystem sftp /usr/lib/openssh/sftp-server",
            "",
        ]
    )


def _spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _terminate(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _run(*command: str) -> None:
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise BedError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}")


def _out(*command: str) -> str:
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=30).stdout


def _port_open(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((address, port)) == 0


def _engine_answers(host: Host) -> bool:
    result = subprocess.run(
        ["docker", "-H", host.docker_host, "info", "--format", "{{.ID}}"],
        check=False,
        capture_output=True,
        timeout=20,
    )
    return result.returncode == 0


def _wait_for(ready: Callable[[], bool], what: str, host: Host | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.3)
    logs = "" if host is None else _tail(host.root / "sshd.log") + _tail(host.root / "dockerd.log")
    raise BedError(f"{what} did not answer within {timeout:.0f} s{logs}")


def _tail(log: Path) -> str:
    if not log.exists():
        return ""
    return f"\n--- {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])

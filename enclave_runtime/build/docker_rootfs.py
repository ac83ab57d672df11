"""A Docker image as an enclave sees it: its flattened root filesystem, command and environment.

What nitro-cli does, and so what this module reproduces (aws/aws-nitro-enclaves-cli
``enclave_build/src/docker.rs``, ``yaml_generator.rs``; the linuxkit it ships,
``src/cmd/linuxkit/moby/image.go`` and ``initrd/initrd.go``):

- The enclave's command is the image's ``Cmd`` when it has one, else its ``Entrypoint``; an
  image with ``Entrypoint`` *and* ``Cmd`` runs the ``Cmd`` alone (nitro-cli does not combine
  them as ``docker run`` does). ``env`` is the image's ``Env``. Both are written one entry per
  line, each followed by a newline, which is how AWS's init reads them back.
- The file system is what ``docker create`` + ``docker export`` give: every layer applied,
  whiteouts resolved. linuxkit then drops ``.dockerenv``, ``Dockerfile``, ``dev/console`` and
  ``etc/hostname``, replaces the contents of ``etc/hosts`` and ``etc/resolv.conf`` (Docker
  fills them when a container starts), and fixes the times of the entries Docker's init layer
  creates at ``docker create`` (``dev``, ``dev/pts``, ``dev/shm``, ``etc``, ``etc/mtab``,
  ``proc``, ``sys``), creating those that are missing.

What we do differently, for reproducibility: entries are written in bytewise path order (not
export order); every directory gets one fixed mtime (Docker creates mount points and working
directories at ``docker create``, which changes directory times), while files, symlinks and
device nodes keep the mtime the image gives them, as nitro-cli keeps it. Those times are part of
the image's layers (so of its ID), and Python's ``.pyc`` files check them: zeroing them would
make every cached bytecode file stale at every enclave boot. Hard links stay hard links (linuxkit
turns them into symlinks). The image is streamed once into an unlinked spool file, indexed, then
written sorted; device nodes are taken from their tar headers, never read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import math
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from enclave_runtime.errors import EnclaveOpsError, FormatError
from enclave_runtime.formats.cpio import CpioWriter
from enclave_runtime.host.docker_engine import DockerError, docker_module

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container
    from docker.models.images import Image

# The entrypoint of the container created only to be exported; it never starts.
EXPORT_ONLY_ENTRYPOINT = "/enclaveops-export-only"
EXPORT_LABEL = "org.enclaveops.purpose"
EXPORT_CHUNK = 1 << 20
# The mtime of every directory and of every entry Docker or linuxkit makes.
NORMALISED_MTIME = 0
# How much of the end of a tar stream is kept to check its end-of-archive blocks.
_TAIL_KEPT = 1 << 20
MAX_FIELD = 0xFFFFFFFF


ARCHITECTURES = {"amd64": "x86_64", "arm64": "aarch64"}

# linuxkit's ``exclude`` list as it takes effect: Go's tar reader names directories with a
# trailing slash, so its "dev/pts" and "dev/shm" entries never match and those stay.
EXCLUDED_PATHS = frozenset({b".dockerenv", b"Dockerfile", b"dev/console", b"etc/hostname"})
REPLACED_FILES = {
    b"etc/hosts": (
        b"127.0.0.1       localhost\n"
        b"::1     localhost ip6-localhost ip6-loopback\n"
        b"fe00::0 ip6-localnet\n"
        b"ff00::0 ip6-mcastprefix\n"
        b"ff02::1 ip6-allnodes\n"
        b"ff02::2 ip6-allrouters\n"
    ),
    b"etc/resolv.conf": b"\n# no resolv.conf configured\n",
}
# Directories every enclave root has: linuxkit's ``touch`` list plus nitro-cli's customer ramfs
# (yaml_generator.rs adds dev, run, sys, var, proc and tmp). Created (0755, root) when missing.
REQUIRED_DIRECTORIES = (
    b"dev",
    b"dev/pts",
    b"dev/shm",
    b"etc",
    b"proc",
    b"run",
    b"sys",
    b"tmp",
    b"var",
)
MTAB = b"etc/mtab"
MTAB_TARGET = b"/proc/mounts"


class ImageConfigError(DockerError):
    """The image's configuration cannot become an enclave's ``cmd``, ``env`` or architecture."""


class RootfsError(FormatError):
    """The exported file system cannot become a ramdisk (malformed tar, unsafe names...)."""


class SpoolError(EnclaveOpsError):
    """The image's files could not be staged in the temporary spool (e.g. the disk is full)."""


# --------------------------------------------------------------------------------------------
# Image configuration


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """The parts of ``docker inspect`` that decide how the enclave starts."""

    image_id: str
    architecture: str
    cmd: tuple[str, ...] | None
    entrypoint: tuple[str, ...] | None
    env: tuple[str, ...]
    working_dir: str
    user: str

    @classmethod
    def from_inspect(cls, attrs: Mapping[str, Any]) -> ImageConfig:
        config = attrs.get("Config") or {}
        return cls(
            image_id=str(attrs.get("Id", "")),
            architecture=str(attrs.get("Architecture", "")),
            cmd=_optional_strings(config.get("Cmd"), "Cmd"),
            entrypoint=_optional_strings(config.get("Entrypoint"), "Entrypoint"),
            env=_optional_strings(config.get("Env"), "Env") or (),
            working_dir=str(config.get("WorkingDir") or ""),
            user=str(config.get("User") or ""),
        )

    @property
    def eif_arch(self) -> str:
        """The EIF architecture (``x86_64``/``aarch64``) of the image, as nitro-cli maps it."""
        try:
            return ARCHITECTURES[self.architecture]
        except KeyError:
            raise ImageConfigError(
                f"the image's architecture is {self.architecture!r}; Nitro Enclaves run amd64 "
                "or arm64 images only: build the image for one of those (--platform)"
            ) from None

    def enclave_command(self) -> tuple[str, ...]:
        """nitro-cli's rule: ``Cmd`` if the image has one, else ``Entrypoint``.

        Unlike nitro-cli, an empty ``Cmd`` (``CMD []``) counts as none, since an empty command
        cannot boot.
        """
        command = self.cmd or self.entrypoint
        if not command:
            raise ImageConfigError(
                "the image has neither CMD nor ENTRYPOINT, so the enclave would have nothing to "
                "run; add a CMD (or ENTRYPOINT) to its Dockerfile"
            )
        return command

    def docker_command(self) -> tuple[str, ...]:
        """What ``docker run`` starts: ``Entrypoint`` followed by ``Cmd``."""
        return (self.entrypoint or ()) + (self.cmd or ())


def image_config(image: Image | Mapping[str, Any]) -> ImageConfig:
    """The start-up configuration of a docker SDK image (or of its ``docker inspect`` dict)."""
    attrs = image if isinstance(image, Mapping) else image.attrs
    return ImageConfig.from_inspect(attrs)


def _optional_strings(value: Any, key: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):  # the engine keeps a shell-form value as a one-element list
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(item, str) for item in value):
        raise ImageConfigError(f"the image's Config.{key} is {value!r}, not a list of strings")
    return tuple(value)


def config_lines(values: Sequence[str], what: str) -> bytes:
    """The ``cmd``/``env`` file AWS's init reads: one entry per line, each newline-terminated."""
    for index, value in enumerate(values):
        if "\n" in value or "\0" in value:
            raise ImageConfigError(
                f"{what} entry {index} ({value!r}) contains a newline or NUL; AWS's init reads "
                "one entry per line, so it would be split: move the value into a script or file"
            )
    return "".join(f"{value}\n" for value in values).encode("utf-8", "surrogateescape")


def cmd_file(config: ImageConfig) -> bytes:
    """The customer ramdisk's ``cmd`` file."""
    return config_lines(config.enclave_command(), "the image's command (CMD or ENTRYPOINT)")


def env_file(config: ImageConfig) -> bytes:
    """The customer ramdisk's ``env`` file."""
    return config_lines(config.env, "the image's ENV")


# ``docker inspect`` keys that come from the image configuration (hashed into the image ID).
# The others (RepoTags, RepoDigests, GraphDriver paths, Metadata.LastTagTime, sizes, Parent)
# describe this host's copy, so they would make the EIF differ between hosts and over time.
DOCKER_INFO_KEYS = (
    "Id",
    "Created",
    "Author",
    "Comment",
    "DockerVersion",
    "Architecture",
    "Variant",
    "Os",
    "OsVersion",
    "Config",
    "RootFS",
)


def docker_info(image: Image | Mapping[str, Any]) -> dict[str, Any]:
    """The metadata section's ``DockerInfo``: the host-independent part of ``docker inspect``."""
    attrs = image if isinstance(image, Mapping) else image.attrs
    return {key: attrs[key] for key in DOCKER_INFO_KEYS if key in attrs}


# --------------------------------------------------------------------------------------------
# Export


class _ChunkStream(io.RawIOBase):
    """A readable stream over the byte chunks the Docker SDK yields."""

    def __init__(self, chunks: Iterator[bytes], errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self._chunks = chunks
        self._errors = errors
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return 0
            except self._errors as err:
                raise DockerError(f"the Docker engine stopped sending the export: {err}") from None
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


@contextlib.contextmanager
def export_rootfs(client: DockerClient, image: Image) -> Iterator[BinaryIO]:
    """The image's flattened file system as a tar stream (``docker create`` + ``docker export``).

    The container is created only to be exported (it never starts) and removed on exit.
    """
    docker = docker_module()
    # urllib3 (under the SDK) reports a connection cut mid-stream as its own ProtocolError.
    urllib3 = importlib.import_module("urllib3")
    errors = (docker.errors.DockerException, OSError, urllib3.exceptions.HTTPError)
    try:
        container = client.containers.create(
            image.id,
            entrypoint=[EXPORT_ONLY_ENTRYPOINT],
            network_disabled=True,
            labels={EXPORT_LABEL: "export"},
        )
    except errors as err:
        raise DockerError(f"cannot create a container to export {image.id}: {err}") from None
    try:
        chunks = container.export(chunk_size=EXPORT_CHUNK)
    except errors as err:
        _remove_quietly(container, errors)
        raise DockerError(f"cannot export container {container.id}: {err}") from None
    try:
        with io.BufferedReader(_ChunkStream(chunks, errors), EXPORT_CHUNK) as stream:
            yield stream
    except BaseException:
        _remove_quietly(container, errors)
        raise
    try:
        container.remove(v=True, force=True)
    except errors as err:
        raise DockerError(
            f"the export container {container.id} could not be removed: {err}; "
            f"remove it with docker rm -f {container.id}"
        ) from None


def _remove_quietly(container: Container, errors: tuple[type[BaseException], ...]) -> None:
    # Another error is on its way out; a leftover stopped container must not mask it.
    with contextlib.suppress(*errors):
        container.remove(v=True, force=True)


# --------------------------------------------------------------------------------------------
# Flattened root file system


@dataclasses.dataclass(eq=False)
class _Node:
    """One file-system object; hard-linked names share one ``_Node`` (so compare by identity)."""

    kind: str  # file, directory, symlink, char, block, fifo
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int = 0
    offset: int = 0
    target: bytes = b""
    major: int = 0
    minor: int = 0


@dataclasses.dataclass(frozen=True)
class RootfsSummary:
    """What flattening did besides copying: paths linuxkit's rules left out, attributes lost."""

    entries: int
    excluded: tuple[str, ...]
    xattrs_dropped: tuple[str, ...]


_TAR_KINDS = {
    tarfile.DIRTYPE: "directory",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
_DEVICE_KINDS = {"char": "c", "block": "b"}


class _SpoolSlice(io.RawIOBase):
    """Reads from ``offset`` of the spool on, without moving any shared file position."""

    def __init__(self, fd: int, offset: int) -> None:
        super().__init__()
        self._fd = fd
        self._position = offset

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = os.pread(self._fd, size, self._position)
        self._position += len(data)
        return data


class _TailKeeper:
    """Passes a tar stream to tarfile, counting its bytes and keeping the last ones.

    tarfile ends its iteration silently at a truncated or corrupt header, which would turn an
    interrupted export into a root file system with files missing; the kept tail lets
    :func:`_check_archive_end` insist on the end-of-archive zero blocks instead.
    """

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.total = 0
        self._tail = bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.total += len(data)
        self._tail += data
        del self._tail[: max(0, len(self._tail) - _TAIL_KEPT)]
        return data

    def rest_from(self, offset: int) -> bytes | None:
        """Everything from ``offset`` to the end of the stream, or None if no longer kept."""
        while self.read(EXPORT_CHUNK):
            pass
        length = self.total - offset
        if not 0 <= length <= len(self._tail):
            return None
        return bytes(self._tail[len(self._tail) - length :])


def _check_archive_end(source: _TailKeeper, end: int) -> None:
    rest = source.rest_from(end)
    if rest is None or len(rest) < tarfile.BLOCKSIZE or rest.strip(b"\0"):
        raise RootfsError(
            f"the tar stream does not end with the end-of-archive blocks after its last member "
            f"(byte {end} of {source.total}): it is truncated or corrupt, so files would be "
            "missing; export the image again"
        )


class FlatRootfs:
    """An exported file system, indexed by path, with file contents in an unlinked spool file.

    Build it with :meth:`read`; :meth:`write_to` adds it to a cpio archive under a prefix in
    bytewise path order. Close it (or use ``with``) to free the spool.
    """

    def __init__(self, spool: BinaryIO) -> None:
        self._spool = spool
        self._nodes: dict[bytes, _Node] = {}
        self._excluded: list[str] = []
        self._xattrs: list[str] = []

    @classmethod
    def read(
        cls, tar_stream: BinaryIO, *, spool_dir: str | os.PathLike[str] | None = None
    ) -> FlatRootfs:
        """Index a tar stream (``docker export`` output, or any tar of a root file system)."""
        directory = os.fspath(spool_dir) if spool_dir is not None else tempfile.gettempdir()
        try:
            spool = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - owned by the result
        except OSError as err:
            raise SpoolError(
                f"cannot create a spool file in {directory}: {err.strerror}; set TMPDIR (or "
                "spool_dir) to a writable directory"
            ) from None
        rootfs = cls(spool)
        try:
            rootfs._load(tar_stream, directory)
        except BaseException:
            rootfs.close()
            raise
        return rootfs

    def __enter__(self) -> FlatRootfs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._spool.close()

    @property
    def summary(self) -> RootfsSummary:
        return RootfsSummary(len(self._nodes), tuple(self._excluded), tuple(self._xattrs))

    def names(self) -> list[bytes]:
        """Every path, in the order :meth:`write_to` writes them."""
        return sorted(self._nodes)

    # -- reading ---------------------------------------------------------------------------

    def _load(self, tar_stream: BinaryIO, spool_dir: str) -> None:
        source = _TailKeeper(tar_stream)
        try:
            with tarfile.open(
                fileobj=source,
                mode="r|",
                bufsize=EXPORT_CHUNK,
                encoding="utf-8",
                errors="surrogateescape",
            ) as tar:
                for member in tar:
                    self._add_member(tar, member, spool_dir)
                end = tar.offset
        except (tarfile.TarError, EOFError) as err:
            raise RootfsError(
                f"the exported file system is not a readable tar stream: {err}"
            ) from None
        _check_archive_end(source, end)
        self._apply_linuxkit_rules(spool_dir)
        self._add_missing_parents()
        try:
            self._spool.flush()  # the writer reads the spool through its descriptor
        except OSError as err:
            raise _spool_failure(spool_dir, err) from None

    def _add_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, spool_dir: str) -> None:
        name = _member_name(member)
        if name is None:
            return
        if name in EXCLUDED_PATHS:
            self._excluded.append(_shown(name))
            return
        if any(key.startswith("SCHILY.xattr.") for key in member.pax_headers):
            self._xattrs.append(_shown(name))
        if member.islnk():
            self._nodes[name] = self._hard_link(name, member)
            return
        node = _Node(
            kind=self._kind(name, member),
            mode=stat.S_IMODE(member.mode),
            uid=_field(name, "uid", member.uid),
            gid=_field(name, "gid", member.gid),
            mtime=_clamped_mtime(member.mtime),
        )
        if node.kind == "file":
            node.size = member.size
            node.offset = self._spool_member(tar, member, name, spool_dir)
        elif node.kind == "symlink":
            node.target = member.linkname.encode("utf-8", "surrogateescape")
        elif node.kind in _DEVICE_KINDS:
            node.major = _field(name, "device major number", member.devmajor)
            node.minor = _field(name, "device minor number", member.devminor)
        self._nodes[name] = node

    @staticmethod
    def _kind(name: bytes, member: tarfile.TarInfo) -> str:
        if member.isreg():
            return "file"
        kind = _TAR_KINDS.get(member.type)
        if kind is None:
            raise RootfsError(
                f"{_shown(name)!r} has tar type {member.type!r}, which is not a file, directory, "
                "link, device or FIFO; the export is not a root file system"
            )
        return kind

    def _hard_link(self, name: bytes, member: tarfile.TarInfo) -> _Node:
        target_name = _normalised(member.linkname.encode("utf-8", "surrogateescape"))
        target = self._nodes.get(target_name) if target_name else None
        if target is None or target.kind == "directory":
            raise RootfsError(
                f"hard link {_shown(name)!r} points to {member.linkname!r}, which is not an "
                "earlier file of the export (or was left out, as .dockerenv and etc/hostname are)"
            )
        # In newc only regular files share data; other types get their own identical entry.
        return target if target.kind == "file" else dataclasses.replace(target)

    def _spool_member(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: bytes, spool_dir: str
    ) -> int:
        source = tar.extractfile(member)
        if source is None:
            raise RootfsError(f"the tar stream gives no data for the file {_shown(name)!r}")
        return self._spool_data(source, member.size, spool_dir)

    def _spool_data(self, source: BinaryIO, size: int, spool_dir: str) -> int:
        offset = self._spool.tell()
        try:
            shutil.copyfileobj(source, self._spool, EXPORT_CHUNK)
            written = self._spool.tell() - offset
        except OSError as err:
            raise _spool_failure(spool_dir, err) from None
        if written != size:
            raise RootfsError(f"the tar stream ended inside a file ({written} of {size} bytes)")
        return offset

    def _apply_linuxkit_rules(self, spool_dir: str) -> None:
        for name, content in REPLACED_FILES.items():
            existing = self._nodes.get(name)
            if existing is not None and existing.kind != "file":
                continue  # a symlink stays a symlink, as linuxkit only replaces regular files
            offset = self._spool_data(io.BytesIO(content), len(content), spool_dir)
            metadata = (existing.mode, existing.uid, existing.gid) if existing else (0o644, 0, 0)
            mode, uid, gid = metadata
            self._nodes[name] = _Node(
                "file", mode, uid, gid, NORMALISED_MTIME, size=len(content), offset=offset
            )
        for name in REQUIRED_DIRECTORIES:
            self._nodes.setdefault(name, _directory())
        mtab = self._nodes.setdefault(MTAB, _Node("symlink", 0o777, 0, 0, 0, target=MTAB_TARGET))
        mtab.mtime = NORMALISED_MTIME
        for node in self._nodes.values():
            if node.kind == "directory":
                node.mtime = NORMALISED_MTIME

    def _add_missing_parents(self) -> None:
        for name in list(self._nodes):
            parent = name.rpartition(b"/")[0]
            while parent:
                node = self._nodes.get(parent)
                if node is not None and node.kind != "directory":
                    raise RootfsError(
                        f"{_shown(name)!r} lies below {_shown(parent)!r}, which is a "
                        f"{node.kind}, not a directory; the export is inconsistent"
                    )
                if node is not None:
                    break
                self._nodes[parent] = _directory()
                parent = parent.rpartition(b"/")[0]

    # -- writing ---------------------------------------------------------------------------

    def write_to(
        self, writer: CpioWriter, *, prefix: str = "rootfs", mtime: int | None = None
    ) -> int:
        """Add the tree under ``prefix`` in bytewise order; ``mtime`` replaces every time.

        Returns the number of entries written, the prefix directory included.
        """
        names = sorted(self._nodes)
        base = prefix.strip("/").encode("utf-8")
        subdirectories = _subdirectory_counts(self._nodes, names)
        links = _link_groups(self._nodes, names)
        writer.add_directory(
            base,
            mode=0o755,
            nlink=2 + subdirectories.get(b"", 0),
            mtime=NORMALISED_MTIME if mtime is None else mtime,
        )
        fd = self._spool.fileno()
        for name in names:
            node = self._nodes[name]
            path = base + b"/" + name
            metadata = {
                "mode": node.mode,
                "uid": node.uid,
                "gid": node.gid,
                "mtime": node.mtime if mtime is None else mtime,
            }
            group = links.get(id(node))
            if node.kind == "file" and group and group[0] != name:
                writer.add_hardlink(path, base + b"/" + group[0])
            elif node.kind == "file":
                data = _SpoolSlice(fd, node.offset)
                nlink = len(group) if group else 1
                writer.add_file(path, data, size=node.size, nlink=nlink, **metadata)
            elif node.kind == "directory":
                nlink = 2 + subdirectories.get(name, 0)
                writer.add_directory(path, nlink=nlink, **metadata)
            elif node.kind == "symlink":
                writer.add_symlink(path, node.target, **metadata)
            elif node.kind in _DEVICE_KINDS:
                kind = _DEVICE_KINDS[node.kind]
                writer.add_device(path, kind, node.major, node.minor, **metadata)
            else:
                writer.add_fifo(path, **metadata)
        return len(names) + 1


def _field(name: bytes, what: str, value: int) -> int:
    if not 0 <= value <= MAX_FIELD:
        raise RootfsError(
            f"{_shown(name)!r} has {what} {value}, beyond the 32 bits a ramdisk entry holds"
        )
    return value


def _clamped_mtime(mtime: float) -> int:
    """The member's time in whole seconds, limited to what a newc header holds."""
    if not math.isfinite(mtime):
        return NORMALISED_MTIME
    return int(min(max(mtime, 0), MAX_FIELD))


def _spool_failure(spool_dir: str, err: OSError) -> SpoolError:
    return SpoolError(
        f"cannot stage the image's files in {spool_dir}: {err.strerror or err}; free space "
        "there (it needs about the image's size) or set TMPDIR to a larger file system"
    )


def _directory() -> _Node:
    return _Node("directory", 0o755, 0, 0, NORMALISED_MTIME)


def _member_name(member: tarfile.TarInfo) -> bytes | None:
    raw = member.name.encode("utf-8", "surrogateescape")
    name = _normalised(raw)
    if name is None:
        raise RootfsError(
            f"tar member {member.name!r} is absolute or has a '..' component; an image's files "
            "must stay inside its root"
        )
    return name or None


def _normalised(raw: bytes) -> bytes | None:
    """``raw`` relative to the root without ``.`` parts; ``b''`` is the root, None is unsafe."""
    if raw.startswith(b"/"):
        return None
    parts = [part for part in raw.split(b"/") if part not in (b"", b".")]
    if b".." in parts:
        return None
    return b"/".join(parts)


def _shown(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def _subdirectory_counts(nodes: Mapping[bytes, _Node], names: Sequence[bytes]) -> dict[bytes, int]:
    counts: dict[bytes, int] = {}
    for name in names:
        if nodes[name].kind == "directory":
            parent = name.rpartition(b"/")[0]
            counts[parent] = counts.get(parent, 0) + 1
    return counts


def _link_groups(nodes: Mapping[bytes, _Node], names: Sequence[bytes]) -> dict[int, list[bytes]]:
    """For each file with several names, its names in archive order (the first carries nlink)."""
    groups: dict[int, list[bytes]] = {}
    for name in names:
        node = nodes[name]
        if node.kind == "file":
            groups.setdefault(id(node), []).append(name)
    return {key: group for key, group in groups.items() if len(group) > 1}

"""Append one deterministic layer to a local Docker image, without ``docker build``.

``docker build`` stamps every image with the time it ran (``created``), so the same inputs give a
new image ID on every build. An image ID is the SHA-256 of the image's config JSON, and the config
names its layers by the SHA-256 of their uncompressed tar (``rootfs.diff_ids``). So a layer tar
written the same way every time, plus a canonical config (sorted keys, a fixed ``created``), give
the same image ID on every run and every host.

The image is handed to the engine with ``docker load``. The tarball holds only the new layer,
the config and ``manifest.json``; ``manifest.json`` lists the parent layers too, but the engine
does not read a layer it already has (moby ``image/tarexport/load.go`` looks each chain ID up
before it opens the file), so they are left out.

Both halves hold only in the classic image store. The containerd image store (the default of
fresh Docker Engine 29 installs) imports the tarball with containerd's archive importer, which
needs every layer ``manifest.json`` names in the tarball (``layer "…" not found`` otherwise), and
names the image by a manifest it writes around the config, whose digest depends on how the
parent layers happen to be compressed in that engine's content store: the same inputs would no
longer give the same image ID on every host. :func:`require_classic_image_store` refuses such an
engine before anything is written, with the switch that fixes it.

The layer tar: GNU format (no PAX headers; ``././@LongLink`` for names over 100 bytes), entries
in bytewise order with their parent directories, owner 0:0 and empty user and group names.
Directories and added files get one fixed mtime; files copied from another image's file system
keep theirs: those times are part of that image's layers (so of its ID), and Python checks its
``.pyc`` files against them.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

from enclave_runtime.errors import EnclaveOpsError
from enclave_runtime.host.docker_engine import DockerError, docker_module

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.images import Image

CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE
_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}
# The keys of an image's ``config`` that the image spec (and Docker's extensions) define. Docker
# also shows container-only keys (Hostname, AttachStdin...) in ``docker inspect``; they are not
# carried over, so the config does not depend on the engine version that shows it.
# ``docker info``'s DriverStatus entry of the containerd image store
# (docs.docker.com/engine/storage/containerd); its default snapshotter shows as Driver "overlayfs"
# (the classic store's drivers are "overlay2", "fuse-overlayfs", "btrfs", "zfs", "vfs"...).
CONTAINERD_DRIVER_TYPE = ("driver-type", "io.containerd.snapshotter.v1")
CONTAINERD_SNAPSHOTTER_DRIVER = "overlayfs"
CONFIG_KEYS = (
    "User",
    "ExposedPorts",
    "Env",
    "Entrypoint",
    "Cmd",
    "Healthcheck",
    "ArgsEscaped",
    "Volumes",
    "WorkingDir",
    "Labels",
    "StopSignal",
    "StopTimeout",
    "Shell",
    "OnBuild",
)


class LayerError(EnclaveOpsError):
    """A layer that cannot be assembled (bad source tree, unsafe names)."""


class NoSpaceError(EnclaveOpsError):
    """A disk filled up while writing a layer, an EIF or an image."""


class ImageLoadError(DockerError):
    """The engine refused the appended image."""


class ImageStoreError(DockerError):
    """The engine keeps its images in the containerd image store, where appending fails."""


@dataclasses.dataclass
class _Entry:
    kind: str  # "directory", "file", "symlink"
    mode: int
    mtime: int
    size: int = 0
    open_data: Callable[[], BinaryIO] | None = None
    target: str = ""


@dataclasses.dataclass(frozen=True)
class LayerDigest:
    """What the config records of a layer: its ``diff_id`` and its tar's size."""

    diff_id: str
    size: int


@dataclasses.dataclass(frozen=True)
class AppendedImage:
    """The loaded image: its ID (``sha256:…``), tag, and the new layer (None when reused)."""

    image_id: str
    reference: str
    layer: LayerDigest | None = None


class LayerBuilder:
    """The files of one layer, written as a deterministic tar by :meth:`write`.

    Files copied from a tar stream (:meth:`add_tree`) are staged in an unlinked spool file
    under ``spool_dir`` (default ``$TMPDIR``). Close it (or use ``with``) to free the spool.
    """

    def __init__(self, mtime: int = 0, spool_dir: str | os.PathLike[str] | None = None) -> None:
        self.mtime = mtime
        self.spool_dir = Path(spool_dir if spool_dir is not None else tempfile.gettempdir())
        self._entries: dict[str, _Entry] = {}
        self._spool: BinaryIO | None = None

    def __enter__(self) -> LayerBuilder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()

    # -- adding ------------------------------------------------------------------------------

    def add_directory(self, name: str, mode: int = 0o755) -> None:
        key = self._prepare(name)
        self._entries[key] = _Entry("directory", mode, self.mtime)

    def add_bytes(self, name: str, data: bytes, mode: int = 0o644) -> None:
        key = self._prepare(name)
        self._entries[key] = _Entry("file", mode, self.mtime, len(data), lambda: io.BytesIO(data))

    def add_path(self, name: str, path: str | os.PathLike[str], mode: int = 0o644) -> None:
        """A host file (an EIF), read when the layer is written."""
        key = self._prepare(name)
        source = Path(path)
        self._entries[key] = _Entry(
            "file", mode, self.mtime, source.stat().st_size, lambda: source.open("rb")
        )

    def add_tree(self, tar_stream: BinaryIO, prefix: str) -> int:
        """Copy the members at or below ``prefix`` of a tar stream (``docker export`` of an
        image); returns how many were copied. Owners become 0:0, directory times the fixed one.
        """
        base = _normalised(prefix)
        copied = 0
        with tarfile.open(fileobj=tar_stream, mode="r|", bufsize=CHUNK, **_ENCODING) as tar:
            for member in tar:
                name = _normalised(member.name)
                if name == base or name.startswith(base + "/"):
                    self._copy_member(tar, member, name)
                    copied += 1
        if not copied:
            raise LayerError(f"the source has nothing at /{base}")
        return copied

    def names(self) -> list[str]:
        """Every path of the layer, in the order :meth:`write` writes them."""
        return sorted(self._entries, key=_sort_key)

    def open(self, name: str) -> BinaryIO:
        """The content of the file ``name`` (symlinks inside the layer are followed)."""
        entry = self._resolve(_normalised(name))
        if entry is None or entry.kind != "file" or entry.open_data is None:
            raise LayerError(f"the layer has no file /{name}")
        return entry.open_data()

    # -- writing -----------------------------------------------------------------------------

    def write(self, out: BinaryIO) -> LayerDigest:
        """Write the layer tar to ``out``; its digest is the layer's ``diff_id``."""
        hashing = _HashingWriter(out)
        first_names: dict[int, str] = {}
        with tarfile.open(
            fileobj=hashing, mode="w|", format=tarfile.GNU_FORMAT, **_ENCODING
        ) as tar:
            for name in self.names():
                entry = self._entries[name]
                info = self._tar_info(name, entry)
                if entry.kind == "file" and id(entry) in first_names:
                    info.type, info.size, info.linkname = tarfile.LNKTYPE, 0, first_names[id(entry)]
                    tar.addfile(info)
                elif entry.kind == "file":
                    first_names[id(entry)] = name
                    assert entry.open_data is not None
                    with entry.open_data() as data:
                        tar.addfile(info, data)
                else:
                    tar.addfile(info)
        return LayerDigest("sha256:" + hashing.sha256.hexdigest(), hashing.size)

    # -- internals ---------------------------------------------------------------------------

    def _prepare(self, name: str) -> str:
        key = _normalised(name)
        parent = key.rpartition("/")[0]
        missing = []
        while parent and parent not in self._entries:
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        for directory in missing:
            self._entries[directory] = _Entry("directory", 0o755, self.mtime)
        existing = self._entries.get(parent) if parent else None
        if existing is not None and existing.kind != "directory":
            raise LayerError(f"/{key} would lie below /{parent}, which is a {existing.kind}")
        return key

    def _copy_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> None:
        key = self._prepare(name)
        mode = stat.S_IMODE(member.mode)
        mtime = int(min(max(member.mtime, 0), 0xFFFFFFFF))
        if member.isdir():
            self._entries[key] = _Entry("directory", mode, self.mtime)
        elif member.issym():
            self._entries[key] = _Entry("symlink", mode, mtime, target=member.linkname)
        elif member.islnk():
            target = self._entries.get(_normalised(member.linkname))
            if target is None or target.kind != "file":
                raise LayerError(f"hard link /{key} points to {member.linkname!r}, not a file")
            self._entries[key] = target  # one entry object: the names share the data
        elif member.isreg():
            offset = self._spool_file(tar, member)
            self._entries[key] = _Entry(
                "file", mode, mtime, member.size, self._spool_reader(offset, member.size)
            )
        else:
            raise LayerError(
                f"/{key} is a device node or FIFO; a layer of added files holds files, "
                "directories and links only"
            )

    def _spool_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> int:
        if self._spool is None:
            self._spool = _create_temporary(self.spool_dir)
        source = tar.extractfile(member)
        assert source is not None
        offset = self._spool.seek(0, io.SEEK_END)
        try:
            shutil.copyfileobj(source, self._spool, CHUNK)
            self._spool.flush()
        except OSError as err:
            raise disk_error(err, self.spool_dir, offset + member.size) from None
        return offset

    def _spool_reader(self, offset: int, size: int) -> Callable[[], BinaryIO]:
        def open_data() -> BinaryIO:
            assert self._spool is not None
            return _SpoolSlice(self._spool.fileno(), offset, size)

        return open_data

    def _resolve(self, key: str, hops: int = 0) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None or entry.kind != "symlink" or hops > 16:
            return entry
        target = entry.target
        if not target.startswith("/"):
            target = key.rpartition("/")[0] + "/" + target
        return self._resolve(_normalised(target), hops + 1)

    def _tar_info(self, name: str, entry: _Entry) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name + "/" if entry.kind == "directory" else name)
        info.mode = entry.mode
        info.mtime = entry.mtime
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        if entry.kind == "directory":
            info.type = tarfile.DIRTYPE
        elif entry.kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, entry.target
        else:
            info.size = entry.size
        return info


class _HashingWriter:
    """Passes writes on, hashing and counting them."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._out.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)


class _SpoolSlice(io.RawIOBase):
    """``size`` bytes of the spool from ``offset``, without moving a shared file position."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__()
        self._fd = fd
        self._position = offset
        self._end = offset + size

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        left = self._end - self._position
        wanted = left if size < 0 else min(size, left)
        data = os.pread(self._fd, wanted, self._position) if wanted > 0 else b""
        self._position += len(data)
        return data


def _normalised(name: str) -> str:
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"{name!r} has a '..' component; layer entries stay inside the root")
    return "/".join(parts)


def _sort_key(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _create_temporary(directory: Path) -> BinaryIO:
    try:
        return tempfile.TemporaryFile(dir=directory)
    except OSError as err:
        raise LayerError(
            f"cannot create a temporary file in {directory}: {err.strerror}; set TMPDIR to a "
            "writable directory"
        ) from None


def disk_error(err: OSError, directory: Path, needed: int) -> EnclaveOpsError:
    """ENOSPC as a :class:`NoSpaceError` naming the directory and the space needed."""
    if err.errno != errno.ENOSPC:
        return LayerError(f"cannot write in {directory}: {err.strerror or err}")
    return no_space(str(directory), needed, _free_bytes(directory))


def no_space(where: str, needed: int, free: int | None) -> NoSpaceError:
    free_text = f"{free / 1e6:.0f} MB free" if free is not None else "free space unknown"
    return NoSpaceError(
        f"no space left on the device of {where}: about {needed / 1e6:.0f} MB are needed "
        f"({free_text}); free space there, or point TMPDIR (for the build's temporary files) "
        "or the Docker data root (for images) at a larger file system"
    )


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# The image config


def container_config(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The image-spec part of ``docker inspect``'s ``Config``, empty values left out."""
    config = attrs.get("Config") or {}
    return {key: config[key] for key in CONFIG_KEYS if config.get(key)}


def canonical_json(value: Any) -> bytes:
    """One spelling for one value: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def image_id(config_json: bytes) -> str:
    """The ID the engine gives an image with this config JSON."""
    return "sha256:" + hashlib.sha256(config_json).hexdigest()


def creation_time(parent_attrs: Mapping[str, Any]) -> str:
    """``SOURCE_DATE_EPOCH`` as RFC 3339 when set, else the parent image's own ``Created``."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        if not epoch.isdigit():
            raise LayerError(
                f"SOURCE_DATE_EPOCH is {epoch!r}; set it to whole seconds since 1970, or unset it"
            )
        return _rfc3339(epoch)
    return str(parent_attrs.get("Created") or "1970-01-01T00:00:00Z")


def parent_history(history: Sequence[Mapping[str, Any]], layer_count: int) -> list[dict[str, Any]]:
    """The parent's history entries (oldest first) from ``docker history``'s answer.

    The answer shows a size of 0 for entries that made no layer; when that does not account for
    exactly ``layer_count`` layers the entries cannot be matched to layers, and none is kept
    (the history is informative only; the engine accepts an image without it).
    """
    entries = []
    for item in reversed(history):
        entry: dict[str, Any] = {"created": _rfc3339(item.get("Created"))}
        if item.get("CreatedBy"):
            entry["created_by"] = item["CreatedBy"]
        if item.get("Comment"):
            entry["comment"] = item["Comment"]
        if not item.get("Size"):
            entry["empty_layer"] = True
        entries.append(entry)
    layers = sum(1 for entry in entries if not entry.get("empty_layer"))
    return entries if layers == layer_count else []


def _rfc3339(seconds: Any) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(int(seconds or 0), datetime.timezone.utc)
    except (ValueError, OverflowError, OSError):
        moment = datetime.datetime.fromtimestamp(0, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def appended_config(
    parent_attrs: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
    layer: LayerDigest,
    created_by: str,
) -> dict[str, Any]:
    """The image config of ``parent`` plus one layer, with ``config`` as its ``config``."""
    parent_layers = list((parent_attrs.get("RootFS") or {}).get("Layers") or [])
    created = creation_time(parent_attrs)
    document: dict[str, Any] = {
        "architecture": parent_attrs.get("Architecture", ""),
        "os": parent_attrs.get("Os", ""),
        "config": dict(config),
        "created": created,
        "history": [
            *parent_history(history, len(parent_layers)),
            {"created": created, "created_by": created_by},
        ],
        "rootfs": {"type": "layers", "diff_ids": [*parent_layers, layer.diff_id]},
    }
    for key, inspect_key in (("variant", "Variant"), ("os.version", "OsVersion")):
        if parent_attrs.get(inspect_key):
            document[key] = parent_attrs[inspect_key]
    return document


# --------------------------------------------------------------------------------------------
# The engine's image store


def uses_containerd_store(info: Mapping[str, Any]) -> bool:
    """Whether ``docker info`` (``client.info()``) shows the containerd image store."""
    status = info.get("DriverStatus") or []
    if any(tuple(entry[:2]) == CONTAINERD_DRIVER_TYPE for entry in status if entry):
        return True
    return info.get("Driver") == CONTAINERD_SNAPSHOTTER_DRIVER


def require_classic_image_store(client: DockerClient) -> None:
    """Refuse an engine with the containerd image store, naming the switch back (see above)."""
    docker = docker_module()
    try:
        info = client.info()
    except (docker.errors.DockerException, OSError) as err:
        raise DockerError(
            f"cannot read the Docker engine's information (docker info): {err}"
        ) from None
    if uses_containerd_store(info):
        raise ImageStoreError(
            f"the Docker engine (version {info.get('ServerVersion') or 'unknown'}) keeps its "
            "images in the containerd image store (docker info: driver-type "
            f"{CONTAINERD_DRIVER_TYPE[1]}), the default of fresh Docker Engine 29 installs; "
            "enclaveops writes its images as one docker-loaded layer each, which only the "
            'classic image store accepts. Set "features": {"containerd-snapshotter": false} in '
            "/etc/docker/daemon.json and restart Docker (systemctl restart docker); images "
            "already in the containerd store stay on disk, hidden until you switch back. Docker "
            "Engine 20.10 to 28.x use the classic store unless the containerd store was turned on"
        )


# --------------------------------------------------------------------------------------------
# Loading


def append_layer(
    client: DockerClient,
    parent: Image,
    layer: LayerBuilder,
    config: Mapping[str, Any],
    *,
    reference: str,
    created_by: str,
) -> AppendedImage:
    """Load ``parent`` + ``layer`` with ``config`` into the engine, tagged ``reference``."""
    require_classic_image_store(client)
    with _create_temporary(layer.spool_dir) as layer_tar:
        try:
            digest = layer.write(layer_tar)
            layer_tar.flush()
        except OSError as err:
            raise disk_error(err, layer.spool_dir, layer_tar.tell() + CHUNK) from None
        history = _history(client, parent)
        document = appended_config(parent.attrs, history, config, digest, created_by)
        config_json = canonical_json(document)
        expected = image_id(config_json)
        parents = document["rootfs"]["diff_ids"][:-1]
        members = _load_members(layer_tar, digest, config_json, parents, reference)
        _load(client, _tar_stream(members), digest)
    _check_loaded(client, reference, expected)
    return AppendedImage(expected, reference, digest)


def _history(client: DockerClient, parent: Image) -> list[dict[str, Any]]:
    docker = docker_module()
    try:
        return list(client.api.history(parent.id))
    except (docker.errors.DockerException, OSError) as err:
        raise DockerError(f"cannot read the history of {parent.id}: {err}") from None


_Member = tuple[str, int, Callable[[], Iterator[bytes]]]


def _load_members(
    layer_tar: BinaryIO,
    layer: LayerDigest,
    config_json: bytes,
    parents: Sequence[str],
    reference: str,
) -> list[_Member]:
    def layer_path(diff_id: str) -> str:
        return diff_id.removeprefix("sha256:") + "/layer.tar"

    config_name = image_id(config_json).removeprefix("sha256:") + ".json"
    manifest = canonical_json(
        [
            {
                "Config": config_name,
                "RepoTags": [reference],
                "Layers": [
                    *(layer_path(diff_id) for diff_id in parents),
                    layer_path(layer.diff_id),
                ],
            }
        ]
    )
    return [
        (layer_path(layer.diff_id), layer.size, lambda: _file_chunks(layer_tar)),
        (config_name, len(config_json), lambda: iter((config_json,))),
        ("manifest.json", len(manifest), lambda: iter((manifest,))),
    ]


def _file_chunks(stream: BinaryIO) -> Iterator[bytes]:
    stream.seek(0)
    yield from iter(lambda: stream.read(CHUNK), b"")


def _tar_stream(members: Sequence[_Member]) -> Iterator[bytes]:
    """The ``docker load`` tarball, produced while the engine reads it."""
    for name, size, chunks in members:
        info = tarfile.TarInfo(name)
        info.size, info.mode = size, 0o644
        yield info.tobuf(tarfile.GNU_FORMAT, **_ENCODING)
        yield from chunks()
        if size % BLOCK:
            yield bytes(BLOCK - size % BLOCK)
    yield bytes(2 * BLOCK)


def _load(client: DockerClient, tarball: Iterator[bytes], layer: LayerDigest) -> None:
    docker = docker_module()
    try:
        for event in client.api.load_image(tarball):
            if isinstance(event, dict) and event.get("error"):
                raise _load_failure(client, str(event["error"]), layer)
    except docker.errors.APIError as err:
        raise _load_failure(client, str(err.explanation or err), layer) from None
    except (docker.errors.DockerException, OSError) as err:
        raise ImageLoadError(f"docker load of the new image failed: {err}") from None


def _load_failure(client: DockerClient, message: str, layer: LayerDigest) -> EnclaveOpsError:
    if "no space left on device" not in message:
        return ImageLoadError(f"the Docker engine refused the new image: {message}")
    try:
        root = str(client.info().get("DockerRootDir") or "the Docker data root")
    except Exception:
        root = "the Docker data root"
    free = _free_bytes(Path(root)) if root.startswith("/") else None
    return no_space(f"the Docker data root {root}", 2 * layer.size, free)


def _check_loaded(client: DockerClient, reference: str, expected: str) -> None:
    docker = docker_module()
    try:
        loaded = client.images.get(reference).id
    except (docker.errors.DockerException, OSError) as err:
        raise ImageLoadError(f"the loaded image {reference} cannot be found: {err}") from None
    if loaded != expected:
        raise ImageLoadError(
            f"{reference} is {loaded} after docker load, not {expected}: the engine rewrote the "
            "image config; report this with `docker version`"
        )


__all__ = [
    "AppendedImage",
    "ImageLoadError",
    "ImageStoreError",
    "LayerBuilder",
    "LayerDigest",
    "LayerError",
    "NoSpaceError",
    "append_layer",
    "appended_config",
    "canonical_json",
    "container_config",
    "creation_time",
    "disk_error",
    "image_id",
    "no_space",
    "parent_history",
    "require_classic_image_store",
    "uses_containerd_store",
]

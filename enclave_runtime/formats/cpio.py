"""cpio "newc" archives: the format of Nitro EIF ramdisks and of every Linux initramfs.

nitro-cli's patched linuxkit writes the ramdisks as uncompressed newc archives (the bootstrap one
with ``init``, ``nsm.ko`` and ``dev``; the customer one with ``rootfs/…``, ``cmd`` and ``env``),
and the enclave kernel unpacks them with ``init/initramfs.c``. The writer here produces what
that unpacker expects, the way the kernel's own ``usr/gen_init_cpio`` and GNU cpio do: a 110-byte
ASCII header of 13 upper-case hex fields, the NUL-terminated name padded so the data starts on a
4-byte boundary, the data padded to 4 bytes, hard links sharing one inode number with the data on
the last name, and a ``TRAILER!!!`` entry, the whole padded to 512 bytes. Output depends only on
what is added, never on the host, so a ramdisk (and the PCRs over it) can be rebuilt
byte-for-byte.

The reader takes bytes from the other side of a trust boundary (an EIF someone hands us): every
malformation is a :class:`CpioError` naming the entry and offset, and :func:`extract` refuses
anything that would land outside the destination directory.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, BinaryIO, Union

from enclave_runtime.errors import FormatError

MAGIC_NEWC = b"070701"
MAGIC_NEWC_CRC = b"070702"
MAGIC_ODC = b"070707"
GZIP_MAGIC = b"\x1f\x8b"
TRAILER = b"TRAILER!!!"
HEADER_SIZE = 110
BLOCK_SIZE = 512
# The kernel skips (does not unpack) names and symlink targets longer than PATH_MAX.
PATH_MAX = 4096
MAX_FIELD = 0xFFFFFFFF
_CHUNK = 1 << 20
_FIELD_NAMES = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
)
_HEX_FIELDS = re.compile(rb"[0-9A-Fa-f]{104}")
_SETID_BITS = stat.S_ISUID | stat.S_ISGID
ID_RANGE = 65536  # the uids and gids an owner_offset extraction maps (one user-namespace range)

KIND_BY_TYPE = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}
_DEVICE_TYPES = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}
# Types the kernel (and extract) hard-link by inode number when nlink >= 2.
_LINKABLE_KINDS = ("file", "char", "block", "fifo", "socket")

FileData = Union[bytes, bytearray, memoryview, BinaryIO, "os.PathLike[str]", "os.PathLike[bytes]"]


class CpioError(FormatError):
    """A cpio archive that is malformed, unsafe to unpack, or cannot be written as asked."""


def _decode_name(raw: bytes) -> str:
    # surrogateescape keeps non-UTF-8 names (legal on Linux) lossless through str.
    return raw.decode("utf-8", "surrogateescape")


def _encode_name(name: str | bytes) -> bytes:
    return name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class CpioHeader:
    """One archive member as its header describes it; ``offset`` counts from where reading began."""

    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    size: int
    devmajor: int
    devminor: int
    rdevmajor: int
    rdevminor: int
    check: int
    has_crc: bool
    index: int
    offset: int

    @property
    def kind(self) -> str:
        """``file``, ``directory``, ``symlink``, ``char``, ``block``, ``fifo`` or ``socket``."""
        return KIND_BY_TYPE[stat.S_IFMT(self.mode)]

    @property
    def permissions(self) -> int:
        return stat.S_IMODE(self.mode)

    @property
    def rdev(self) -> int:
        return os.makedev(self.rdevmajor, self.rdevminor)

    @property
    def name_bytes(self) -> bytes:
        return _encode_name(self.name)

    def describe(self) -> str:
        return f"cpio entry #{self.index} {self.name!r} at offset {self.offset}"


@dataclass(frozen=True)
class CpioEntry(CpioHeader):
    """A member with its data: file contents, or a symlink's target."""

    data: bytes = field(repr=False)


@dataclass(frozen=True)
class TreeSummary:
    """What :func:`write_tree` archived; sockets have no archive form and are left out."""

    entries: int
    skipped_sockets: tuple[str, ...]


@dataclass(frozen=True)
class ExtractResult:
    """What :func:`extract` unpacked; ``skipped_devices`` lists nodes ``skip_devices`` left out."""

    entries: int
    skipped_devices: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Reading


class _Source:
    """The input stream, with the offset every error message reports."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._file = fileobj
        self.offset = 0

    def read_up_to(self, size: int) -> bytes:
        """At most ``size`` bytes, fewer only at the end of the input; read in bounded chunks so
        a forged size never makes us allocate more than the input really holds."""
        parts = []
        wanted = size
        while wanted > 0:
            try:
                chunk = self._file.read(min(wanted, _CHUNK))
            except OSError as err:
                raise CpioError(
                    f"cannot read the cpio archive at offset {self.offset}: {err}"
                ) from err
            if not chunk:
                break
            parts.append(chunk)
            wanted -= len(chunk)
            self.offset += len(chunk)
        return b"".join(parts)

    def read_exact(self, size: int, what: str) -> bytes:
        start = self.offset
        data = self.read_up_to(size)
        if len(data) != size:
            raise CpioError(
                f"{what}: the archive ends at offset {self.offset}, but {size} bytes were expected "
                f"from offset {start}; the archive is truncated or a size field is wrong"
            )
        return data

    def skip_padding(self, what: str) -> None:
        padding = self.read_exact(-self.offset % 4, what)
        if padding.strip(b"\0"):
            raise CpioError(
                f"{what}: alignment padding at offset {self.offset - len(padding)} is not zero; "
                "the archive is corrupt"
            )


class EntryReader:
    """The data of one entry, readable until the iteration moves to the next entry.

    For 070702 archives the checksum is verified when the last byte has been read (or skipped).
    """

    def __init__(self, source: _Source, header: CpioHeader) -> None:
        self._source = source
        self._header = header
        self._remaining = header.size
        self._sum = 0
        self._verify_sum = header.has_crc and header.kind == "file"

    @property
    def remaining(self) -> int:
        return self._remaining

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._remaining:
            size = self._remaining
        if size == 0:
            return b""
        data = self._source.read_exact(size, self._header.describe())
        self._remaining -= size
        if self._verify_sum:
            self._sum = (self._sum + sum(data)) & MAX_FIELD
            if self._remaining == 0:
                self._check_sum()
        return data

    def finish(self) -> None:
        """Skip what the consumer did not read, so the stream reaches the next header."""
        while self._remaining:
            self.read(_CHUNK)
        if self._verify_sum and self._header.size == 0:
            self._check_sum()

    def _check_sum(self) -> None:
        if self._sum != self._header.check:
            raise CpioError(
                f"{self._header.describe()}: data checksum {self._sum:08X} does not match the "
                f"header's {self._header.check:08X} (070702 format); the archive is corrupt"
            )


def _bad_magic(magic: bytes, index: int, offset: int) -> CpioError:
    where = f"cpio entry #{index} at offset {offset}"
    if index == 0 and magic.startswith(GZIP_MAGIC):
        return CpioError(
            f"{where}: this is a gzip-compressed ramdisk; decompress it first "
            "(e.g. gzip.open) — EIF ramdisks written by current nitro-cli are uncompressed"
        )
    if magic == MAGIC_ODC:
        return CpioError(
            f"{where}: old portable cpio format (070707); only newc (070701) and newc with "
            "checksums (070702) are supported — rebuild the archive with `cpio -H newc`"
        )
    hint = (
        "this is not a cpio newc archive"
        if index == 0
        else "the previous entry's size is wrong or the archive is corrupt"
    )
    return CpioError(f"{where}: expected magic 070701 or 070702, found {magic!r}; {hint}")


def _parse_fields(raw: bytes, index: int, offset: int) -> dict[str, int]:
    if not _HEX_FIELDS.fullmatch(raw, 6):
        for position, name in enumerate(_FIELD_NAMES):
            text = raw[6 + 8 * position : 14 + 8 * position]
            if not re.fullmatch(rb"[0-9A-Fa-f]{8}", text):
                raise CpioError(
                    f"cpio entry #{index} at offset {offset}: header field {name!r} is {text!r}, "
                    "not 8 hex digits; the archive is corrupt"
                )
    return {
        name: int(raw[6 + 8 * position : 14 + 8 * position], 16)
        for position, name in enumerate(_FIELD_NAMES)
    }


def _read_name(source: _Source, namesize: int, index: int, offset: int) -> bytes:
    where = f"cpio entry #{index} at offset {offset}"
    if not 2 <= namesize <= PATH_MAX:
        raise CpioError(
            f"{where}: name size {namesize} is outside 2..{PATH_MAX} (a name and its NUL); "
            "the archive is corrupt"
        )
    raw = source.read_exact(namesize, where)
    if raw[-1] != 0 or b"\0" in raw[:-1]:
        raise CpioError(
            f"{where}: the name {raw!r} must be NUL-terminated and contain no other NUL byte"
        )
    source.skip_padding(where)
    return raw[:-1]


def _validate_header(header: CpioHeader) -> None:
    if header.mode > 0o177777 or stat.S_IFMT(header.mode) not in KIND_BY_TYPE:
        raise CpioError(
            f"{header.describe()}: mode {header.mode:o} is not a known file type "
            "(file, directory, symlink, char, block, fifo, socket)"
        )
    kind = header.kind
    if kind == "symlink" and not 1 <= header.size <= PATH_MAX:
        raise CpioError(
            f"{header.describe()}: a symlink target must be 1..{PATH_MAX} bytes, "
            f"the header says {header.size}"
        )
    if kind not in ("file", "symlink") and header.size:
        raise CpioError(
            f"{header.describe()}: a {kind} entry carries {header.size} bytes of data; "
            "only files and symlinks have data"
        )


def _read_header(source: _Source, index: int) -> CpioHeader | None:
    """The next member's header, or None at ``TRAILER!!!``."""
    offset = source.offset
    raw = source.read_up_to(HEADER_SIZE)
    if not raw:
        if index == 0:
            raise CpioError("empty input: a cpio archive has at least its TRAILER!!! entry")
        raise CpioError(
            f"the cpio archive ends at offset {offset} after {index} entries without the "
            "TRAILER!!! entry; it is truncated"
        )
    magic = raw[:6]
    if len(raw) < HEADER_SIZE and magic in (MAGIC_NEWC[: len(magic)], MAGIC_NEWC_CRC[: len(magic)]):
        raise CpioError(
            f"cpio entry #{index} at offset {offset}: the archive ends inside the "
            f"{HEADER_SIZE}-byte header; it is truncated"
        )
    if magic not in (MAGIC_NEWC, MAGIC_NEWC_CRC):
        if index and not raw.strip(b"\0"):
            raise CpioError(
                f"the cpio archive has only zero padding from offset {offset}, after {index} "
                "entries, but no TRAILER!!! entry; it is truncated"
            )
        raise _bad_magic(magic, index, offset)
    values = _parse_fields(raw, index, offset)
    name = _read_name(source, values["namesize"], index, offset)
    if name == TRAILER:
        return None
    header = CpioHeader(
        name=_decode_name(name),
        ino=values["ino"],
        mode=values["mode"],
        uid=values["uid"],
        gid=values["gid"],
        nlink=values["nlink"],
        mtime=values["mtime"],
        size=values["filesize"],
        devmajor=values["devmajor"],
        devminor=values["devminor"],
        rdevmajor=values["rdevmajor"],
        rdevminor=values["rdevminor"],
        check=values["check"],
        has_crc=raw.startswith(MAGIC_NEWC_CRC),
        index=index,
        offset=offset,
    )
    _validate_header(header)
    return header


def iter_entries(fileobj: BinaryIO) -> Iterator[tuple[CpioHeader, EntryReader]]:
    """Yield ``(header, data reader)`` per member, up to ``TRAILER!!!``.

    Nothing after the trailer is read, so the stream can hold further data. Names are reported
    as stored, unchecked for ``..`` or a leading ``/``: use :func:`extract` to unpack safely.
    """
    source = _Source(fileobj)
    index = 0
    while True:
        header = _read_header(source, index)
        if header is None:
            return
        body = EntryReader(source, header)
        yield header, body
        body.finish()
        source.skip_padding(header.describe())
        index += 1


def read_archive(data: bytes | bytearray | memoryview) -> list[CpioEntry]:
    """Every member with its data; after the trailer only NUL padding may follow."""
    stream = io.BytesIO(data)
    header_fields = [f.name for f in fields(CpioHeader)]
    entries = [
        CpioEntry(**{name: getattr(header, name) for name in header_fields}, data=body.read())
        for header, body in iter_entries(stream)
    ]
    after_trailer = stream.tell()
    rest = stream.read()
    if rest.strip(b"\0"):
        junk_at = after_trailer + len(rest) - len(rest.lstrip(b"\0"))
        raise CpioError(
            f"unexpected data at offset {junk_at} after the TRAILER!!! entry; a second archive "
            "or garbage follows — split concatenated archives and read each one"
        )
    return entries


# --------------------------------------------------------------------------------------------
# Extracting


def _member_parts(header: CpioHeader) -> tuple[bytes, ...]:
    """The path components of a member, or a CpioError if it could leave the destination."""
    name = header.name_bytes
    if name.startswith(b"/"):
        raise CpioError(
            f"{header.describe()}: absolute path; archive members must be relative "
            "(rebuild the archive without a leading '/')"
        )
    parts = tuple(part for part in name.split(b"/") if part not in (b"", b"."))
    if b".." in parts:
        raise CpioError(
            f"{header.describe()}: the path contains '..' and could escape the destination; "
            "refusing to extract it"
        )
    return parts


@dataclass
class _LinkedInode:
    parts: tuple[bytes, ...]
    st_ino: int


@dataclass
class _Fixup:
    """Metadata applied once every entry is in place (see :class:`_Extractor`)."""

    parts: tuple[bytes, ...]
    permissions: int
    mtime: int | None
    st_ino: int = 0


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# For names a later entry may have turned into a FIFO: opening one must fail, not block.
_EXISTING_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class _Extractor:
    """Unpacks members below one directory without ever following a symlink.

    Every parent is opened component by component with ``O_NOFOLLOW`` relative to its parent, so
    neither a symlink in the archive nor one already in the destination can redirect a write.
    Directories are created ``0700`` and hard-linked files ``0600`` so later entries can still
    be written into them without root; their final modes and mtimes are set at the end.
    """

    def __init__(
        self, root_fd: int, preserve_owner: bool, skip_devices: bool, owner_offset: int | None
    ) -> None:
        self._root_fd = root_fd
        self._preserve_owner = preserve_owner or owner_offset is not None
        self._keep_setid = preserve_owner and owner_offset is None
        self._owner_offset = owner_offset or 0
        self._skip_devices = skip_devices
        self._dirs: dict[tuple[bytes, ...], _Fixup] = {}
        self._linked_files: dict[tuple[int, int, int, int], _Fixup] = {}
        self._links: dict[tuple[int, int, int, int], _LinkedInode] = {}
        self.skipped_devices: list[str] = []

    # -- directories -------------------------------------------------------------------------

    def _open_dir(self, parts: tuple[bytes, ...], header: CpioHeader, create: bool) -> int:
        fd = os.dup(self._root_fd)
        try:
            for depth, part in enumerate(parts):
                next_fd = self._open_child_dir(fd, part, parts[: depth + 1], header, create)
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_child_dir(
        self, fd: int, part: bytes, parts: tuple[bytes, ...], header: CpioHeader, create: bool
    ) -> int:
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
        except NotADirectoryError:
            is_link = stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
            raise CpioError(
                f"{header.describe()}: its parent {_decode_name(b'/'.join(parts))!r} is "
                f"{'a symlink' if is_link else 'not a directory'}; refusing to extract through "
                "it (a symlink could lead outside the destination)"
            ) from None
        os.mkdir(part, 0o700, dir_fd=fd)
        self._dirs.setdefault(parts, _Fixup(parts, 0o755, None))
        return os.open(part, _DIR_FLAGS, dir_fd=fd)

    def _open_dir_if_present(self, parts: tuple[bytes, ...]) -> int | None:
        fd = os.dup(self._root_fd)
        for part in parts:
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                os.close(fd)
                return None
            os.close(fd)
            fd = next_fd
        return fd

    # -- entries -----------------------------------------------------------------------------

    def extract(self, header: CpioHeader, body: EntryReader) -> None:
        parts = _member_parts(header)
        if not parts:
            return  # "." is the destination itself, which stays as the caller made it
        kind = header.kind
        if kind in ("char", "block") and self._skip_devices:
            self.skipped_devices.append(header.name)
            return
        parent_fd = self._open_dir(parts[:-1], header, create=True)
        try:
            if kind == "directory":
                self._make_directory(parent_fd, parts, header)
            elif kind == "symlink":
                self._make_symlink(parent_fd, parts[-1], header, body)
            else:
                self._make_linkable(parent_fd, parts, header, body)
        finally:
            os.close(parent_fd)

    def _make_directory(self, parent_fd: int, parts: tuple[bytes, ...], header: CpioHeader) -> None:
        leaf = parts[-1]
        existing = _lstat_or_none(leaf, parent_fd)
        if existing is not None and not stat.S_ISDIR(existing.st_mode):
            os.unlink(leaf, dir_fd=parent_fd)
            existing = None
        if existing is None:
            os.mkdir(leaf, 0o700, dir_fd=parent_fd)
        self._chown(leaf, parent_fd, header)
        self._dirs[parts] = _Fixup(parts, header.permissions, header.mtime)

    def _make_symlink(
        self, parent_fd: int, leaf: bytes, header: CpioHeader, body: EntryReader
    ) -> None:
        target = body.read()
        # gen_init_cpio stores the target with its NUL; GNU cpio and linuxkit without.
        if target.endswith(b"\0"):
            target = target[:-1]
        if not target or b"\0" in target:
            raise CpioError(
                f"{header.describe()}: the symlink target {target!r} is empty or contains NUL"
            )
        self._make_room(leaf, parent_fd, header)
        os.symlink(target, leaf, dir_fd=parent_fd)
        self._chown(leaf, parent_fd, header)
        os.utime(leaf, (header.mtime, header.mtime), dir_fd=parent_fd, follow_symlinks=False)

    def _make_linkable(
        self, parent_fd: int, parts: tuple[bytes, ...], header: CpioHeader, body: EntryReader
    ) -> None:
        key = _link_key(header)
        linked = self._links.get(key) if key else None
        if linked is not None:
            self._link(linked, parent_fd, parts, header)
            st_ino = linked.st_ino
            if header.kind == "file" and header.size:
                self._rewrite_linked_file(parent_fd, parts[-1], st_ino, header, body)
        elif header.kind == "file":
            st_ino = self._create_file(parent_fd, parts[-1], header, body, final=key is None)
        else:
            st_ino = self._create_node(parent_fd, parts[-1], header)
        if key is None:
            return
        self._links.setdefault(key, _LinkedInode(parts, st_ino))
        if header.kind == "file":
            permissions = self._final_permissions(header)
            self._linked_files[key] = _Fixup(parts, permissions, header.mtime, st_ino)

    def _link(
        self, linked: _LinkedInode, parent_fd: int, parts: tuple[bytes, ...], header: CpioHeader
    ) -> None:
        if linked.parts != parts:
            self._make_room(parts[-1], parent_fd, header)
            source_fd = self._open_dir(linked.parts[:-1], header, create=False)
            try:
                os.link(
                    linked.parts[-1],
                    parts[-1],
                    src_dir_fd=source_fd,
                    dst_dir_fd=parent_fd,
                    follow_symlinks=False,
                )
            finally:
                os.close(source_fd)
        st = os.stat(parts[-1], dir_fd=parent_fd, follow_symlinks=False)
        # The type matters too: a freed inode number is often reused at once by a symlink.
        if st.st_ino != linked.st_ino or stat.S_IFMT(st.st_mode) != stat.S_IFMT(header.mode):
            if linked.parts != parts:
                os.unlink(parts[-1], dir_fd=parent_fd)
            source = _decode_name(b"/".join(linked.parts))
            raise CpioError(
                f"{header.describe()}: its hard-link source {source!r} was replaced by a later "
                "entry; the archive is inconsistent"
            )

    def _create_file(
        self, parent_fd: int, leaf: bytes, header: CpioHeader, body: EntryReader, final: bool
    ) -> int:
        self._make_room(leaf, parent_fd, header)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(leaf, flags, 0o600, dir_fd=parent_fd)
        try:
            if self._preserve_owner:
                try:
                    os.fchown(fd, *self._owner(header))
                except PermissionError:
                    raise _owner_error(header) from None
            _copy_body(body, fd)
            if final:
                os.fchmod(fd, self._final_permissions(header))
                os.utime(fd, (header.mtime, header.mtime))
            return os.fstat(fd).st_ino
        finally:
            os.close(fd)

    def _rewrite_linked_file(
        self, parent_fd: int, leaf: bytes, st_ino: int, header: CpioHeader, body: EntryReader
    ) -> None:
        # As the kernel does: the data of a later name goes into the shared inode.
        fd = os.open(leaf, os.O_WRONLY | _EXISTING_FILE_FLAGS, dir_fd=parent_fd)
        try:
            if os.fstat(fd).st_ino != st_ino:
                raise CpioError(f"{header.describe()}: the file changed while being extracted")
            _copy_body(body, fd)
            os.ftruncate(fd, header.size)
        finally:
            os.close(fd)

    def _create_node(self, parent_fd: int, leaf: bytes, header: CpioHeader) -> int:
        self._make_room(leaf, parent_fd, header)
        try:
            os.mknod(leaf, stat.S_IFMT(header.mode) | 0o600, header.rdev, dir_fd=parent_fd)
        except PermissionError:
            raise CpioError(
                f"{header.describe()}: creating a {header.kind} device node needs root "
                "(CAP_MKNOD); run as root, or pass skip_devices=True to leave devices out"
            ) from None
        self._chown(leaf, parent_fd, header)
        os.chmod(leaf, self._final_permissions(header), dir_fd=parent_fd)
        os.utime(leaf, (header.mtime, header.mtime), dir_fd=parent_fd, follow_symlinks=False)
        return os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False).st_ino

    def _final_permissions(self, header: CpioHeader) -> int:
        if self._keep_setid:
            return header.permissions
        # A set-id bit on a file now owned by whoever extracts would grant *their* identity.
        return header.permissions & ~_SETID_BITS

    def _owner(self, header: CpioHeader) -> tuple[int, int]:
        """The host owner of a member: the archive's, shifted by ``owner_offset`` if given."""
        if not self._owner_offset:
            return header.uid, header.gid
        if max(header.uid, header.gid) >= ID_RANGE:
            raise CpioError(
                f"{header.describe()}: owner {header.uid}:{header.gid} is outside the "
                f"{ID_RANGE} ids an extraction with owner_offset maps"
            )
        return header.uid + self._owner_offset, header.gid + self._owner_offset

    def _chown(self, leaf: bytes, parent_fd: int, header: CpioHeader) -> None:
        if not self._preserve_owner:
            return
        try:
            os.chown(leaf, *self._owner(header), dir_fd=parent_fd, follow_symlinks=False)
        except PermissionError:
            raise _owner_error(header) from None

    @staticmethod
    def _make_room(leaf: bytes, parent_fd: int, header: CpioHeader) -> None:
        """Remove a non-directory the new member replaces, as the kernel's clean_path does."""
        existing = _lstat_or_none(leaf, parent_fd)
        if existing is None:
            return
        if stat.S_ISDIR(existing.st_mode):
            raise CpioError(
                f"{header.describe()}: a directory of that name already exists; "
                f"refusing to replace it with a {header.kind}"
            )
        os.unlink(leaf, dir_fd=parent_fd)

    # -- final metadata ----------------------------------------------------------------------

    def finish(self) -> None:
        for fixup in self._linked_files.values():
            self._apply_file_fixup(fixup)
        # Deepest first, so no directory is locked down before its contents are done.
        for parts in sorted(self._dirs, key=len, reverse=True):
            self._apply_dir_fixup(self._dirs[parts])

    def _apply_file_fixup(self, fixup: _Fixup) -> None:
        parent_fd = self._open_dir_if_present(fixup.parts[:-1])
        if parent_fd is None:
            return
        try:
            fd = os.open(fixup.parts[-1], os.O_RDONLY | _EXISTING_FILE_FLAGS, dir_fd=parent_fd)
        except OSError:
            return  # that name was replaced by a later entry; nothing of ours to fix
        finally:
            os.close(parent_fd)
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_ino == fixup.st_ino:
                os.fchmod(fd, fixup.permissions)
                os.utime(fd, (fixup.mtime, fixup.mtime))
        finally:
            os.close(fd)

    def _apply_dir_fixup(self, fixup: _Fixup) -> None:
        fd = self._open_dir_if_present(fixup.parts)
        if fd is None:
            return
        try:
            os.fchmod(fd, fixup.permissions)
            if fixup.mtime is not None:
                os.utime(fd, (fixup.mtime, fixup.mtime))
        finally:
            os.close(fd)


def _owner_error(header: CpioHeader) -> CpioError:
    return CpioError(
        f"{header.describe()}: cannot set owner {header.uid}:{header.gid}; "
        "preserve_owner=True needs root"
    )


def _link_key(header: CpioHeader) -> tuple[int, int, int, int] | None:
    # The kernel's rule (init/initramfs.c, maybe_link): nlink >= 2, same device, inode and type.
    if header.nlink < 2 or header.kind not in _LINKABLE_KINDS:
        return None
    return (header.devmajor, header.devminor, header.ino, stat.S_IFMT(header.mode))


def _lstat_or_none(leaf: bytes, parent_fd: int) -> os.stat_result | None:
    try:
        return os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _copy_body(body: EntryReader, fd: int) -> None:
    while body.remaining:
        view = memoryview(body.read(_CHUNK))
        while view:
            view = view[os.write(fd, view) :]


def extract(
    archive_fileobj: BinaryIO,
    dest_dir: str | os.PathLike[str],
    *,
    preserve_owner: bool = False,
    skip_devices: bool = False,
    owner_offset: int | None = None,
) -> ExtractResult:
    """Unpack an archive below ``dest_dir`` (created if missing), refusing anything unsafe.

    Absolute names, ``..`` components and paths through symlinks are rejected; a member
    replaces an existing non-directory of the same name (as the kernel does). Owners are set
    only with ``preserve_owner`` (needs root); otherwise set-uid/set-gid bits are dropped.
    ``owner_offset`` (needs root) sets each owner to the archive's plus the offset, for ids below
    ``ID_RANGE`` (the range a user namespace maps), and drops set-uid/set-gid bits.
    Device nodes need root unless ``skip_devices``. On error the destination may hold part of
    the archive: discard it.
    """
    dest = os.fspath(dest_dir)
    try:
        os.makedirs(dest, exist_ok=True)
        root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise CpioError(f"cannot extract into {dest!r}: {err.strerror or err}") from err
    extractor = _Extractor(root_fd, preserve_owner, skip_devices, owner_offset)
    count = 0
    try:
        for header, body in iter_entries(archive_fileobj):
            try:
                extractor.extract(header, body)
            except OSError as err:
                raise CpioError(
                    f"{header.describe()}: cannot extract into {dest!r}: {err.strerror or err}"
                ) from err
            count += 1
        try:
            extractor.finish()
        except OSError as err:
            raise CpioError(f"cannot set final modes below {dest!r}: {err}") from err
    finally:
        os.close(root_fd)
    return ExtractResult(entries=count, skipped_devices=tuple(extractor.skipped_devices))


# --------------------------------------------------------------------------------------------
# Writing


class SourceFile:
    """A file to archive by path, optionally pinned to the (st_dev, st_ino) it had when listed.

    Opened only when its data is written; a pinned file replaced in the meantime is an error,
    so a changing tree never yields an archive that mixes two states silently.
    """

    def __init__(self, path: str | bytes, identity: tuple[int, int] | None = None) -> None:
        self.path = path
        self.identity = identity

    def __fspath__(self) -> str | bytes:
        return self.path


class _Body:
    """Where an entry's data comes from; files and streams are copied in bounded chunks."""

    def __init__(self, data: FileData, size: int | None, label: str) -> None:
        self.data = data
        self.label = label
        self.size = self._measure(size)

    def _measure(self, size: int | None) -> int:
        data = self.data
        if isinstance(data, (bytes, bytearray, memoryview)):
            if size is not None and size != len(data):
                raise CpioError(f"{self.label}: size={size} but the data is {len(data)} bytes")
            return len(data)
        if size is not None:
            return size
        if isinstance(data, os.PathLike):
            try:
                return os.stat(data).st_size
            except OSError as err:
                raise CpioError(f"{self.label}: cannot read {data!r}: {err.strerror}") from err
        if not hasattr(data, "read"):
            raise CpioError(
                f"{self.label}: data must be bytes, a binary stream or a path (pathlib.Path), "
                f"not {type(data).__name__}"
            )
        if getattr(data, "seekable", lambda: False)():
            here = data.tell()
            end = data.seek(0, io.SEEK_END)
            data.seek(here)
            return end - here
        raise CpioError(f"{self.label}: size= is required when the data is a non-seekable stream")

    def copy_to(self, write: Callable[[bytes], object]) -> None:
        data = self.data
        if isinstance(data, (bytes, bytearray, memoryview)):
            write(data)
        elif isinstance(data, os.PathLike):
            self._copy_path(data, write)
        else:
            self._copy_stream(data, write)

    def _copy_path(self, path: os.PathLike[Any], write: Callable[[bytes], object]) -> None:
        try:
            # Non-blocking, so a FIFO put where a file was listed is refused, not waited on.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb") as stream:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise CpioError(f"{self.label}: {path!r} is not a regular file")
                identity = getattr(path, "identity", None)
                if identity is not None and (st.st_dev, st.st_ino) != identity:
                    raise CpioError(f"{self.label}: the file was replaced while being archived")
                self._copy_stream(stream, write)
                if os.fstat(stream.fileno()).st_size != self.size:
                    raise CpioError(f"{self.label}: the file changed size while being archived")
        except OSError as err:
            raise CpioError(f"{self.label}: cannot read {path!r}: {err.strerror}") from err

    def _copy_stream(self, stream: BinaryIO, write: Callable[[bytes], object]) -> None:
        remaining = self.size
        while remaining > 0:
            chunk = stream.read(min(remaining, _CHUNK))
            if not chunk:
                raise CpioError(
                    f"{self.label}: the data ended after {self.size - remaining} of "
                    f"{self.size} bytes"
                )
            chunk = chunk[:remaining]
            write(chunk)
            remaining -= len(chunk)


@dataclass
class _LinkGroup:
    """A file with several names: all share ``ino``; the name completing the group gets data."""

    ino: int
    nlink: int
    written: int
    metadata: dict[str, int]
    body: _Body


def _check_field(label: str, value: int) -> int:
    if not isinstance(value, int) or not 0 <= value <= MAX_FIELD:
        raise CpioError(f"{label} is {value!r}, which does not fit a newc field (0..{MAX_FIELD})")
    return value


def _archive_name(path: str | bytes) -> bytes:
    name = _encode_name(path)
    if (
        not name
        or b"\0" in name
        or name.startswith(b"/")
        or any(part in (b"", b".", b"..") for part in name.split(b"/"))
    ):
        raise CpioError(
            f"archive path {path!r} must be relative and normalised, without NUL, empty, "
            "'.' or '..' components (e.g. 'rootfs/bin/sh')"
        )
    if len(name) >= PATH_MAX:
        raise CpioError(
            f"archive path {path!r} is {len(name)} bytes; the kernel skips names of "
            f"{PATH_MAX} bytes or more"
        )
    return name


def _permission_bits(mode: int, file_type: int, path: str | bytes) -> int:
    if (
        not isinstance(mode, int)
        or mode < 0
        or stat.S_IFMT(mode) not in (0, file_type)
        or mode & ~(stat.S_IFMT(mode) | 0o7777)
    ):
        raise CpioError(f"mode {mode!r} for {path!r} must be permission bits such as 0o644")
    return stat.S_IMODE(mode)


class CpioWriter:
    """Write a newc archive to ``fileobj`` entry by entry; :meth:`close` writes the trailer.

    Inode numbers are 0, 1, 2… in the order entries are added (hard links share one) and device
    numbers are 0, as ``cpio --reproducible`` writes them. Every parent directory must be added
    before its children (the kernel creates none), and each name only once. ``fileobj`` is
    left open.
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        self._out = fileobj
        self._offset = 0
        self._next_ino = 0
        self._names: set[bytes] = set()
        self._directories: set[bytes] = set()
        self._groups: dict[bytes, _LinkGroup] = {}
        self._closed = False
        self._failure: str | None = None

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # An archive that failed half-way must not gain a trailer and look complete.
        if exc_type is None:
            self.close()

    def add_file(
        self,
        path: str | bytes,
        data: FileData = b"",
        *,
        size: int | None = None,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 0,
        nlink: int = 1,
    ) -> None:
        """Add a regular file from bytes, a binary stream (give ``size`` unless seekable) or a
        path (``pathlib.Path`` or :class:`SourceFile`); streams and files are copied in chunks.

        With ``nlink`` > 1 this is the first of ``nlink`` names of one file: add the others
        with :meth:`add_hardlink`. The data goes with the last name (newc's convention, which
        the kernel and GNU cpio follow), so it must stay readable until then.
        """
        self._require_usable()
        if not isinstance(nlink, int) or nlink < 1:
            raise CpioError(f"file {path!r}: nlink must be a positive integer, not {nlink!r}")
        name = self._new_name(path)
        body = _Body(data, size, f"file {path!r}")
        _check_field(f"the size of {path!r}", body.size)
        metadata = {
            "mode": stat.S_IFREG | _permission_bits(mode, stat.S_IFREG, path),
            "uid": uid,
            "gid": gid,
            "mtime": mtime,
        }
        if nlink == 1:
            self._emit(name, nlink=1, body=body, **metadata)
            return
        ino = self._emit(name, nlink=nlink, **metadata)
        self._groups[name] = _LinkGroup(ino, nlink, 1, metadata, body)

    def add_hardlink(self, path: str | bytes, target_path: str | bytes) -> None:
        """Add another name for a file added with ``add_file(..., nlink=N)``."""
        self._require_usable()
        group = self._groups.get(_encode_name(target_path))
        if group is None:
            raise CpioError(
                f"hard link {path!r}: {target_path!r} was not added with add_file(..., nlink=N); "
                "in newc every name of a linked file carries the link count"
            )
        if group.written >= group.nlink:
            raise CpioError(
                f"hard link {path!r}: all {group.nlink} names of {target_path!r} are already "
                "written; raise nlink in add_file"
            )
        name = self._new_name(path)
        group.written += 1
        body = group.body if group.written == group.nlink else None
        self._emit(name, ino=group.ino, nlink=group.nlink, body=body, **group.metadata)
        self._groups[name] = group

    def add_directory(
        self,
        path: str | bytes,
        *,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 0,
        nlink: int = 2,
    ) -> None:
        self._require_usable()
        name = self._new_name(path)
        bits = stat.S_IFDIR | _permission_bits(mode, stat.S_IFDIR, path)
        self._emit(name, mode=bits, uid=uid, gid=gid, mtime=mtime, nlink=nlink)
        self._directories.add(name)

    def add_symlink(
        self,
        path: str | bytes,
        target: str | bytes,
        *,
        mode: int = 0o777,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 0,
    ) -> None:
        """Add a symlink; the target is stored as the entry's data, without a NUL."""
        self._require_usable()
        link_target = _encode_name(target)
        if not link_target or b"\0" in link_target or len(link_target) >= PATH_MAX:
            raise CpioError(
                f"symlink {path!r}: target {target!r} must be 1..{PATH_MAX - 1} bytes without NUL"
            )
        name = self._new_name(path)
        bits = stat.S_IFLNK | _permission_bits(mode, stat.S_IFLNK, path)
        body = _Body(link_target, None, f"symlink {path!r}")
        self._emit(name, mode=bits, uid=uid, gid=gid, mtime=mtime, body=body)

    def add_device(
        self,
        path: str | bytes,
        kind: str,
        major: int,
        minor: int,
        *,
        mode: int = 0o600,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 0,
    ) -> None:
        """Add a device node; ``kind`` is ``'c'`` (character) or ``'b'`` (block)."""
        self._require_usable()
        if kind not in _DEVICE_TYPES:
            raise CpioError(f"device {path!r}: kind must be 'c' or 'b', not {kind!r}")
        _check_field(f"the major number of {path!r}", major)
        _check_field(f"the minor number of {path!r}", minor)
        name = self._new_name(path)
        file_type = _DEVICE_TYPES[kind]
        bits = file_type | _permission_bits(mode, file_type, path)
        self._emit(name, mode=bits, uid=uid, gid=gid, mtime=mtime, rdevmajor=major, rdevminor=minor)

    def add_fifo(
        self, path: str | bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = 0
    ) -> None:
        self._require_usable()
        name = self._new_name(path)
        bits = stat.S_IFIFO | _permission_bits(mode, stat.S_IFIFO, path)
        self._emit(name, mode=bits, uid=uid, gid=gid, mtime=mtime)

    def close(self) -> None:
        """Write ``TRAILER!!!`` and pad to 512 bytes, as gen_init_cpio and GNU cpio do."""
        if self._closed:
            return
        self._require_usable()
        incomplete = {id(g): g for g in self._groups.values() if g.written < g.nlink}
        if incomplete:
            missing = ", ".join(
                f"inode {g.ino} has {g.written} of {g.nlink} names"
                for g in sorted(incomplete.values(), key=lambda g: g.ino)
            )
            raise CpioError(f"hard-linked files lack names ({missing}); add them with add_hardlink")
        self._emit(TRAILER, ino=0, mode=0, uid=0, gid=0, mtime=0, nlink=1)
        self._write(b"\0" * (-self._offset % BLOCK_SIZE))
        self._closed = True
        flush = getattr(self._out, "flush", None)
        if flush is not None:
            flush()

    def _require_usable(self) -> None:
        if self._failure is not None:
            raise CpioError(
                f"the cpio archive is incomplete after an earlier error: {self._failure}"
            )
        if self._closed:
            raise CpioError("the cpio archive is already closed (its trailer is written)")

    def _new_name(self, path: str | bytes) -> bytes:
        """The archive form of ``path``; it is recorded only once its entry is written."""
        name = _archive_name(path)
        if name in self._names:
            raise CpioError(f"{path!r} is already in the archive; each name may appear once")
        parent = name.rpartition(b"/")[0]
        if parent and parent not in self._directories:
            raise CpioError(
                f"add the directory {_decode_name(parent)!r} before {path!r}: the kernel does "
                "not create missing parent directories"
            )
        return name

    def _emit(
        self,
        name: bytes,
        *,
        mode: int,
        uid: int,
        gid: int,
        mtime: int,
        nlink: int = 1,
        ino: int | None = None,
        body: _Body | None = None,
        rdevmajor: int = 0,
        rdevminor: int = 0,
    ) -> int:
        shown = _decode_name(name)
        values = (
            self._next_ino if ino is None else ino,
            mode,
            _check_field(f"the uid of {shown!r}", uid),
            _check_field(f"the gid of {shown!r}", gid),
            _check_field(f"the nlink of {shown!r}", nlink),
            _check_field(f"the mtime of {shown!r}", mtime),
            body.size if body is not None else 0,
            0,
            0,
            rdevmajor,
            rdevminor,
            len(name) + 1,
            0,
        )
        if ino is None:
            self._next_ino += 1
        self._names.add(name)
        try:
            self._write(MAGIC_NEWC + b"".join(b"%08X" % value for value in values))
            self._write(name + b"\0" + b"\0" * (-(self._offset + len(name) + 1) % 4))
            if body is not None:
                body.copy_to(self._write)
                self._write(b"\0" * (-self._offset % 4))
        except BaseException as err:
            self._failure = f"{shown!r}: {err}"
            raise
        return values[0]

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._offset += len(data)


# --------------------------------------------------------------------------------------------
# Trees


@dataclass(frozen=True)
class _TreeItem:
    relative: bytes
    st: os.stat_result


def _scan(root: bytes) -> list[_TreeItem]:
    items = []
    pending = [b""]
    while pending:
        relative_dir = pending.pop()
        with os.scandir(os.path.join(root, relative_dir) if relative_dir else root) as listing:
            for entry in listing:
                relative = relative_dir + b"/" + entry.name if relative_dir else entry.name
                st = entry.stat(follow_symlinks=False)
                items.append(_TreeItem(relative, st))
                if stat.S_ISDIR(st.st_mode):
                    pending.append(relative)
    # Bytewise order of the whole path: independent of listing order and locale, and a
    # directory always sorts before what it contains.
    items.sort(key=lambda item: item.relative)
    return items


def _subdirectory_counts(items: list[_TreeItem]) -> dict[bytes, int]:
    counts: dict[bytes, int] = {}
    for item in items:
        if stat.S_ISDIR(item.st.st_mode):
            parent = item.relative.rpartition(b"/")[0]
            counts[parent] = counts.get(parent, 0) + 1
    return counts


def _hardlink_names(items: list[_TreeItem]) -> dict[bytes, list[bytes]]:
    """Each regular file with other names inside the tree -> all its names, in archive order."""
    groups: dict[tuple[int, int], list[bytes]] = {}
    for item in items:
        if stat.S_ISREG(item.st.st_mode) and item.st.st_nlink > 1:
            groups.setdefault((item.st.st_dev, item.st.st_ino), []).append(item.relative)
    return {name: names for names in groups.values() if len(names) > 1 for name in names}


class _TreeWriter:
    """Turns scanned tree items into writer calls with the normalised metadata."""

    def __init__(
        self,
        writer: CpioWriter,
        *,
        root: bytes,
        base: bytes,
        mtime: int,
        uid: int | None,
        gid: int | None,
    ) -> None:
        self._writer = writer
        self._root = root
        self._base = base
        self._mtime = mtime
        self._uid = uid
        self._gid = gid
        self.entries = 0

    def archive_name(self, relative: bytes) -> bytes:
        return self._base + b"/" + relative if self._base else relative

    def metadata(self, st: os.stat_result) -> dict[str, int]:
        return {
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid if self._uid is None else self._uid,
            "gid": st.st_gid if self._gid is None else self._gid,
            "mtime": self._mtime,
        }

    def add_prefix(self, root_st: os.stat_result, root_subdirs: int) -> None:
        parts = self._base.split(b"/")
        for depth in range(1, len(parts) + 1):
            nlink = 3 if depth < len(parts) else 2 + root_subdirs
            self._writer.add_directory(
                b"/".join(parts[:depth]), nlink=nlink, **self.metadata(root_st)
            )
            self.entries += 1

    def add(self, item: _TreeItem, subdirs: int, link_names: list[bytes] | None) -> None:
        st = item.st
        name = self.archive_name(item.relative)
        source = os.path.join(self._root, item.relative)
        metadata = self.metadata(st)
        if stat.S_ISDIR(st.st_mode):
            self._writer.add_directory(name, nlink=2 + subdirs, **metadata)
        elif stat.S_ISREG(st.st_mode) and link_names and link_names[0] != item.relative:
            self._writer.add_hardlink(name, self.archive_name(link_names[0]))
        elif stat.S_ISREG(st.st_mode):
            data = SourceFile(source, (st.st_dev, st.st_ino))
            nlink = len(link_names) if link_names else 1
            self._writer.add_file(name, data, size=st.st_size, nlink=nlink, **metadata)
        elif stat.S_ISLNK(st.st_mode):
            self._writer.add_symlink(name, os.readlink(source), **metadata)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self._writer.add_device(name, kind, major, minor, **metadata)
        elif stat.S_ISFIFO(st.st_mode):
            self._writer.add_fifo(name, **metadata)
        self.entries += 1


def write_tree(
    writer: CpioWriter,
    root: str | os.PathLike[str],
    *,
    prefix: str = "rootfs",
    mtime: int = 0,
    uid: int | None = 0,
    gid: int | None = 0,
) -> TreeSummary:
    """Add the directory ``root`` under ``prefix`` ('' puts its contents at the top), reproducibly.

    Entries go in bytewise path order, each with ``mtime``, owner ``uid``/``gid`` (``None``
    keeps the source's), the source's type and permission bits; hard links are found by
    (st_dev, st_ino) within the tree; device numbers and FIFOs are kept; sockets are skipped.
    Nothing else about the host (wall clock, umask, listing order, inode numbers) reaches the
    archive. The prefix directories take ``root``'s own mode and owner.
    """
    root_bytes = os.fsencode(root)
    try:
        root_st = os.stat(root_bytes)
        if not stat.S_ISDIR(root_st.st_mode):
            raise CpioError(f"{os.fspath(root)!r} is not a directory")
        items = _scan(root_bytes)
    except OSError as err:
        raise CpioError(f"cannot read the tree {os.fspath(root)!r}: {err}") from err
    subdirs = _subdirectory_counts(items)
    link_names = _hardlink_names(items)
    base = _encode_name(prefix).strip(b"/")
    tree = _TreeWriter(writer, root=root_bytes, base=base, mtime=mtime, uid=uid, gid=gid)
    if prefix.strip("/"):
        tree.add_prefix(root_st, subdirs.get(b"", 0))
    skipped = []
    for item in items:
        if stat.S_ISSOCK(item.st.st_mode):
            skipped.append(_decode_name(tree.archive_name(item.relative)))
            continue
        try:
            tree.add(item, subdirs.get(item.relative, 0), link_names.get(item.relative))
        except OSError as err:
            raise CpioError(f"cannot archive {_decode_name(item.relative)!r}: {err}") from err
    return TreeSummary(entries=tree.entries, skipped_sockets=tuple(skipped))


def archive_directory(
    root: str | os.PathLike[str],
    fileobj: BinaryIO,
    *,
    prefix: str = "rootfs",
    mtime: int = 0,
    uid: int | None = 0,
    gid: int | None = 0,
) -> TreeSummary:
    """Write a complete archive of ``root`` (see :func:`write_tree`) to ``fileobj``."""
    writer = CpioWriter(fileobj)
    summary = write_tree(writer, root, prefix=prefix, mtime=mtime, uid=uid, gid=gid)
    writer.close()
    return summary

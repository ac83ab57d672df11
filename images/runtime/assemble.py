"""Assemble the self-contained enclave runtime under one prefix (run in the runtime image's build).

Runs with the build stage's own Python (Debian's python3.11) and lays out, under ``--prefix``:

- ``bin/python3``: that interpreter, its ELF interpreter set to the loader shipped in ``lib/`` and
  its run path ``$ORIGIN``-relative, so it runs in any Linux image of the same architecture;
- ``bin/python3._pth``: the fixed ``sys.path`` (isolated mode: no ``PYTHON*`` variable, no
  ``site``, no site-packages of the image around it);
- ``lib/``: the loader, glibc and every shared library the interpreter, its extension modules and
  the bundled wheels need (the closure ``ldd`` reports), each with an ``$ORIGIN`` run path;
- ``lib/python3.11/``: the standard library (without tests, IDLE, Tk and 2to3), ``lib-dynload``
  and ``site-packages`` (the bundle: enclave_runtime and its dependencies);
- ``bin/<command>``: one script per console entry point, starting with
  ``#!<prefix>/bin/python3`` so the kernel runs it without a shell.

Every ELF is stripped; every ``.py`` is compiled to an unchecked-hash ``.pyc`` beside it (valid
whatever the mtimes) and removed, so the runtime holds byte code only, once. Every entry gets one
mtime and a normalised mode, so two builds from the same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PYTHON_VERSION = "python3.11"
SYSTEM_PYTHON = Path("/usr/bin") / PYTHON_VERSION
SYSTEM_STDLIB = Path("/usr/lib") / PYTHON_VERSION
# Not needed by a headless enclave runtime (nothing in enclave_runtime imports them; the unit test
# tests/unit/test_runtime_assembly.py keeps it so): packaging and development tools, GUIs, test
# suites, databases. Tests and data also hold Python 2 sources.
STDLIB_LEFT_OUT = {
    "__pycache__",
    "config-3.11-x86_64-linux-gnu",
    "curses",
    "dbm",
    "dist-packages",
    "distutils",
    "ensurepip",
    "idlelib",
    "lib2to3",
    "lib-dynload",
    "pydoc.py",
    "pydoc_data",
    "site-packages",
    "sqlite3",
    "test",
    "tkinter",
    "turtle.py",
    "turtledemo",
    "unittest",
    "venv",
    "wsgiref",
    "xmlrpc",
}
# Extension modules that would pull Kerberos, Berkeley DB, SQLite, curses or readline into the
# closure, and test modules.
DYNLOAD_LEFT_OUT = re.compile(
    r"^(nis|_dbm|_gdbm|_sqlite3|_curses|_curses_panel|readline|_tkinter|_test\w*|xxlimited\w*|"
    r"_xxtest\w*|_ctypes_test)\."
)
# Of pycryptodome, enclave_runtime uses Keccak-256 alone (odyn/keys.py): its package, Crypto.Util
# (which loads the raw library) and the keccak module with its library. The rest is 16 MB.
# Of botocore, odyn's KMS proxy uses the SigV4 signer alone (odyn/kms_proxy.py): the service
# models under botocore/data/<service>/ (29 MB) are left out, its own files and data/*.json kept.
SITE_PACKAGES_KEPT = {
    "botocore": re.compile(r"^botocore/(?!data/[^/]+/).*$"),
    "Crypto": re.compile(
        r"^Crypto/(__init__\.py|py\.typed|Util/.*|Hash/(__init__\.py|keccak\.py|_keccak[\w.]*\.so))$"
    ),
}
LDD_RESOLVED = re.compile(r"^\s*(\S+) => (\S+) \(0x[0-9a-f]+\)$")
LDD_MISSING = re.compile(r"^\s*(\S+) => not found$")
ELF_MAGIC = b"\x7fELF"


class AssemblyError(Exception):
    """The runtime cannot be assembled from this base image."""


def _copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(0o755 if os.access(source, os.X_OK) else 0o644)


def _copy_stdlib(lib: Path) -> None:
    """The standard library, symlinks resolved when they stay inside it (others are Debian's)."""
    stdlib = lib / PYTHON_VERSION
    for source in sorted(SYSTEM_STDLIB.rglob("*")):
        relative = source.relative_to(SYSTEM_STDLIB)
        if relative.parts[0] in STDLIB_LEFT_OUT or "__pycache__" in relative.parts:
            continue
        real = source.resolve()
        if not real.is_relative_to(SYSTEM_STDLIB) or not real.is_file():
            continue  # directories are made as files land; /etc links are Debian's site config
        _copy_file(real, stdlib / relative)
    for module in sorted((SYSTEM_STDLIB / "lib-dynload").iterdir()):
        if not DYNLOAD_LEFT_OUT.match(module.name):
            _copy_file(module, stdlib / "lib-dynload" / module.name)


def _kept(relative: Path) -> bool:
    """False for a file of a distribution of which the runtime uses a part only."""
    kept = SITE_PACKAGES_KEPT.get(relative.parts[0])
    return kept is None or kept.match(relative.as_posix()) is not None


def _copy_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        copied = path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts
        if copied and _kept(relative):
            _copy_file(path, target / relative)


def _is_elf(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) == ELF_MAGIC


def _elf_files(prefix: Path) -> list[Path]:
    return [p for p in sorted(prefix.rglob("*")) if p.is_file() and _is_elf(p)]


def _ldd(path: Path) -> tuple[dict[str, Path], Path | None]:
    """The libraries ``path`` loads (soname -> file) and the loader, as ldd resolves them."""
    result = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
    libraries: dict[str, Path] = {}
    loader = None
    for line in result.stdout.splitlines():
        missing = LDD_MISSING.match(line)
        if missing:
            raise AssemblyError(f"{path} needs {missing.group(1)}, which the base image lacks")
        resolved = LDD_RESOLVED.match(line)
        if resolved:
            libraries[resolved.group(1)] = Path(resolved.group(2))
        elif line.strip().startswith("/") and "ld-linux" in line:
            loader = Path(line.split()[0])
    return libraries, loader


def _copy_shared_libraries(prefix: Path) -> str:
    """Copy the closure of shared libraries into ``lib/``; return the loader's file name."""
    lib = prefix / "lib"
    loader_name = ""
    for elf in _elf_files(prefix):
        libraries, loader = _ldd(elf)
        for soname, path in libraries.items():
            if not path.resolve().is_relative_to(prefix) and not (lib / soname).exists():
                _copy_file(path.resolve(), lib / soname)
        if loader is not None:
            loader_name = loader.name
            if not (lib / loader_name).exists():
                _copy_file(loader.resolve(), lib / loader_name)
    if not loader_name:
        raise AssemblyError(f"{SYSTEM_PYTHON} has no ELF interpreter: not a glibc base image")
    return loader_name


def _patchelf(*args: str) -> str:
    result = subprocess.run(["patchelf", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise AssemblyError(f"patchelf {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def _relocate(prefix: Path, loader_name: str) -> None:
    """Point every ELF at the shipped loader and libraries, never at the image's own."""
    lib = prefix / "lib"
    python = prefix / "bin" / "python3"
    _patchelf("--set-interpreter", str(lib / loader_name), str(python))
    for elf in _elf_files(prefix):
        needed = _patchelf("--print-needed", str(elf)).split()
        if elf.name == loader_name or set(needed) <= {loader_name}:
            continue  # the loader and libc: they need nothing the loader has not mapped
        own = [
            entry
            for entry in _patchelf("--print-rpath", str(elf)).split(":")
            if entry.startswith("$ORIGIN")  # a wheel's own .libs directory
        ]
        shipped = "$ORIGIN/" + os.path.relpath(lib, elf.parent)
        _patchelf("--set-rpath", ":".join([*own, shipped]), str(elf))


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _write_path_file(prefix: Path) -> None:
    stdlib = Path("..") / "lib" / PYTHON_VERSION
    entries = [stdlib, stdlib / "lib-dynload", stdlib / "site-packages"]
    _write(prefix / "bin" / "python3._pth", "".join(f"{e}\n" for e in entries), 0o644)


def _write_commands(prefix: Path, entry_points: Path) -> list[str]:
    """One script per ``name = module:function`` line of the entry points file."""
    names = []
    for line in entry_points.read_text().splitlines():
        if not line.strip():
            continue
        name, _, target = (part.strip() for part in line.partition("="))
        module, _, function = target.partition(":")
        script = (
            f"#!{prefix}/bin/python3\n"
            "import sys\n\n"
            f"from {module} import {function}\n\n"
            f"sys.exit({function}())\n"
        )
        _write(prefix / "bin" / name, script, 0o755)
        names.append(name)
    return names


def _strip(prefix: Path) -> None:
    """Drop symbols and debug sections of every ELF (before patchelf edits them)."""
    for elf in _elf_files(prefix):
        result = subprocess.run(
            ["strip", "--strip-unneeded", str(elf)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise AssemblyError(f"strip {elf}: {result.stderr.strip()}")


def _compile(prefix: Path) -> None:
    """Compile with the shipped interpreter itself (this also proves that it starts), each
    ``.pyc`` beside its source (``-b``: sourceless imports), then remove the sources."""
    library = prefix / "lib" / PYTHON_VERSION
    command = [
        str(prefix / "bin" / "python3"),
        "-B",  # compileall's own imports write no __pycache__ (mtime-based: not reproducible)
        "-m",
        "compileall",
        "-q",
        "-f",
        "-b",
        "--invalidation-mode",
        "unchecked-hash",
        str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env={})
    if result.returncode != 0:
        raise AssemblyError(f"compileall failed:\n{result.stdout}{result.stderr}")
    for source in sorted(library.rglob("*.py")):
        if not source.with_suffix(".pyc").is_file():
            raise AssemblyError(f"{source} was not compiled")
        source.unlink()


def _check_commands(prefix: Path, entry_points: Path) -> None:
    """Import every command's module with the shipped interpreter, in an empty environment.

    A wheel of another architecture or Python version, or a command importing a module the
    runtime lacks, fails the build here rather than in an enclave.
    """
    modules = [
        line.partition("=")[2].partition(":")[0].strip()
        for line in entry_points.read_text().splitlines()
        if line.strip()
    ]
    # Keccak-256 and a SigV4 signature too: what is kept of pycryptodome and botocore works
    # (pycryptodome loads its raw library by path, not by import).
    probe = (
        "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
        "from enclave_runtime.odyn.keys import keccak256\n"
        "assert keccak256(b'').hex().startswith('c5d2460186f7233c'), 'Keccak-256 is wrong'\n"
        "from enclave_runtime.odyn.kms_proxy import RoleCredentials, signed_headers\n"
        "keys = RoleCredentials('AKIDEXAMPLE', 'secret', 'token', 0.0)\n"
        "headers = signed_headers('kms.us-east-1.amazonaws.com', 'us-east-1', 'T', b'{}', keys)\n"
        "assert headers['Authorization'].startswith('AWS4-HMAC-SHA256 '), headers\n"
    )
    command = [str(prefix / "bin" / "python3"), "-c", probe, *modules]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env={})
    if result.returncode != 0:
        raise AssemblyError(f"a command's module does not import:\n{result.stderr}")


def _normalise(prefix: Path, mtime: int) -> None:
    """One mtime everywhere and modes that depend only on what an entry is."""
    for path in sorted(prefix.rglob("*"), reverse=True):
        if path.is_dir():
            path.chmod(0o755)
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    prefix.chmod(0o755)
    os.utime(prefix, (mtime, mtime))


def assemble(prefix: Path, site_packages: Path, entry_points: Path, mtime: int) -> list[str]:
    """Build the runtime under ``prefix``; return the commands written to ``bin/``."""
    if prefix.exists():
        shutil.rmtree(prefix)
    lib = prefix / "lib"
    _copy_file(SYSTEM_PYTHON, prefix / "bin" / "python3")
    _copy_stdlib(lib)
    _copy_tree(site_packages, lib / PYTHON_VERSION / "site-packages")
    loader_name = _copy_shared_libraries(prefix)
    _strip(prefix)
    _relocate(prefix, loader_name)
    _write_path_file(prefix)
    commands = _write_commands(prefix, entry_points)
    _compile(prefix)
    _check_commands(prefix, entry_points)
    _normalise(prefix, mtime)
    return commands


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=Path, required=True)
    parser.add_argument("--site-packages", type=Path, required=True)
    parser.add_argument("--entry-points", type=Path, required=True)
    parser.add_argument("--source-date-epoch", type=int, default=0)
    args = parser.parse_args()
    try:
        commands = assemble(
            args.prefix, args.site_packages, args.entry_points, args.source_date_epoch
        )
    except AssemblyError as err:
        print(f"assemble: {err}", file=sys.stderr)
        return 1
    print(f"assemble: {args.prefix} with python3, {', '.join(commands)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Output paths checked before any work.

Every command that writes checks its output paths first (``output_dir``, ``output_file``): a
file where a directory is wanted or the reverse, a path under a file or a missing directory,
one too long, or one where a file cannot be created (tried: a directory under /proc or /sys,
a read-only mount, root included) is one line of BadInput, before a model is built. (One
process per run directory: bench/run/lock.py.) torch-free.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from bench import BadInput

_NAME_MAX = 255  # bytes in one path component (ext4, xfs, btrfs, tmpfs)
_PATH_MAX = 4096  # bytes in a whole path (Linux)
_INSIDE = 64  # room for the files a run directory holds (RUN_DIR/parity_curves.csv ...)


def _limits(path: Path) -> tuple[int, int]:
    """(longest name, longest path) where ``path`` would be created."""
    for parent in (path, *path.parents):
        if os.path.isdir(parent):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                return (os.pathconf(parent, "PC_NAME_MAX"), os.pathconf(parent, "PC_PATH_MAX"))
            break
    return _NAME_MAX, _PATH_MAX


def _check_text(text: str | os.PathLike[str], flag: str, inside: int = 0) -> Path:
    raw = os.fspath(text)
    if not raw:
        raise BadInput(f"{flag}: empty path")
    if "\0" in raw:
        raise BadInput(f"{flag} {raw!r}: a path cannot hold a NUL character")
    path = Path(raw)
    try:
        absolute = os.fsencode(os.path.abspath(raw))
    except (UnicodeError, ValueError):
        raise BadInput(f"{flag} {raw!r}: not a valid path") from None
    name_max, path_max = _limits(path)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise BadInput(f"{flag} {raw[:40]}...: a name of {size} bytes is too long "
                           f"(at most {name_max})")
    if len(absolute) + inside >= path_max:
        raise BadInput(f"{flag} {raw[:40]}...: path too long ({len(absolute)} bytes, "
                       f"at most {path_max - inside - 1})")
    return path


def _existing_ancestor(path: Path, flag: str) -> Path:
    """The nearest existing ancestor of ``path``; BadInput when it is not a directory."""
    for parent in Path(os.path.abspath(path)).parents:
        if os.path.lexists(parent):
            if not os.path.isdir(parent):
                raise BadInput(f"{flag} {path}: {parent} is a file, not a directory")
            return parent
    return Path("/")


def _stat_problem(path: Path, flag: str) -> None:
    """BadInput for a path that cannot even be looked at (a dangling link, a link loop)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # missing, or under a file: said later
        if os.path.islink(path):
            raise BadInput(f"{flag} {path}: a dangling symbolic link") from None
    except OSError as exc:
        raise BadInput(f"{flag} {path}: {exc.strerror or exc}") from None


def _try_writing(path: Path, flag: str, what: str) -> None:
    """BadInput unless a file can be created in directory ``path``: tried, not asked
    (``os.access`` answers yes to root under a read-only mount or /proc). Directories missing
    on the way are created for the try and removed again: a check leaves nothing behind."""
    created: list[Path] = []
    try:
        for parent in [*reversed(Path(os.path.abspath(path)).parents), Path(os.path.abspath(path))]:
            if not os.path.isdir(parent):
                os.mkdir(parent)
                created.append(parent)
        fd, probe = tempfile.mkstemp(prefix=".ampbench-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BadInput(f"{flag} {what} ({exc.strerror or exc})") from None
    finally:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def output_dir(text: str | os.PathLike[str], flag: str = "--out", inside: int = _INSIDE) -> Path:
    """A directory the command will write into (created with its parents if missing)."""
    path = _check_text(text, flag, inside)
    _stat_problem(path, flag)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise BadInput(f"{flag} {path}: a file, not a directory")
        _try_writing(path, flag, f"{path}: directory not writable")
        return path
    parent = _existing_ancestor(path, flag)
    _try_writing(path, flag, f"{path}: cannot create it under {parent}")
    return path


def output_file(text: str | os.PathLike[str], flag: str = "--out",
                make_parents: bool = False) -> Path:
    """A file the command will (re)write; its directory must exist unless ``make_parents``."""
    path = _check_text(text, flag)
    raw = os.fspath(text)
    if raw.endswith(os.sep) or path.name in ("", ".", ".."):
        raise BadInput(f"{flag} {raw}: names a directory, not a file")
    _stat_problem(path, flag)
    if os.path.isdir(path):
        raise BadInput(f"{flag} {path}: a directory, not a file")
    # The file is written next to itself and renamed: its directory must be writable.
    parent = Path(os.path.abspath(path)).parent
    if not os.path.lexists(parent):
        if not make_parents:
            raise BadInput(f"{flag} {path}: directory {parent} does not exist")
        _existing_ancestor(path, flag)
    elif not os.path.isdir(parent):
        raise BadInput(f"{flag} {path}: {parent} is a file, not a directory")
    _try_writing(parent, flag, f"{path}: directory {parent} not writable")
    return path

"""One process per run directory: ``lock`` holds it for the runner (and for parity, peers and
validate, which write into one too).

``flock`` on ``RUN_DIR/.lock``: the kernel drops it when the holder dies, however it dies, so a
lock left by a killed runner is simply taken over; the holder's pid is written inside for the
message of the one refused. torch-free.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from bench import BadInput, store

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

LOCK = store.LOCK
_held: dict[str, tuple[int, int]] = {}  # run directory -> (fd, depth) held by this process


def _holder(lock_path: Path) -> str:
    with contextlib.suppress(OSError, UnicodeError):
        text = lock_path.read_text(encoding="utf-8").strip()
        if text:
            return text
    return "pid unknown"


@contextlib.contextmanager
def lock(run_dir: Path | str, what: str = "ampbench") -> Iterator[Path]:
    """Hold ``run_dir`` for this process; BadInput naming the holder when another has it.

    Re-entrant within one process (the runner holds its directory while parity runs in it).
    ``run_dir`` must exist.
    """
    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield run_dir
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    lock_path = run_dir / LOCK
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise BadInput(f"{run_dir}: cannot create its lock file ({exc.strerror})") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BadInput(f"{run_dir} is in use by another ampbench process "
                               f"({_holder(lock_path)}); wait for it to end or stop it"
                               ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, {what}\n".encode())
        _held[key] = (fd, 1)
        try:
            yield run_dir
        finally:
            del _held[key]
            # Emptied, not removed: removing would let a third process lock a new file
            # while a second still waits on this one.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock

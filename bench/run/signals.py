"""Stopping a command on a signal: SIGINT, SIGTERM and SIGHUP raise ``Stopped`` where the
command is, so that it stops like on Ctrl-C (children killed, temporary directories removed,
the resume command printed, exit 128+N). Shared by `ampbench run` and `ampbench validate`.
torch-free.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised where the command is; ``str()`` is the signal's name."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(busy: str | None = None) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise Stopped in the main thread, once.

    Later ones wait for the cleanup that the first one started: with ``busy`` (the command,
    "ampbench run") each is one line saying it is still cleaning up, without it they are
    ignored. Elsewhere than in the main thread, where no handler can be set, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def later(signum: int, frame: Any) -> None:
        print(f"{busy}: {signal.Signals(signum).name}: still cleaning up", file=sys.stderr)

    def first(signum: int, frame: Any) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, later if busy else signal.SIG_IGN)
        raise Stopped(signum)

    before = {sig: signal.signal(sig, first) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)

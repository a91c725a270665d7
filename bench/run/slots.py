"""Device slots: which of a sweep's processes run where and when (`ampbench run --devices`).

``resolve`` turns --devices (``all`` or GPU indices ``0,1,3``) into the run's slots, one per
GPU, each with the CUDA_VISIBLE_DEVICES its children get; without --devices the run has one
anonymous slot and nothing in a child's environment changes (one cell at a time, as ever).
``Pool`` runs processes concurrently, one per free slot; a process of k ranks takes k slots
and waits until that many are free. Each runs in a thread that only waits on its child; the
finished ones come back to the caller's thread (``wait``), which writes the records: one
writer. A finished process knows its slots, when it ran (unix time) and which others ran
beside it at any moment (its neighbours, from those times). Stopped (Ctrl-C, a signal, an
error in the caller), the pool tells every running child to die with its tree and waits.

Test-only CPU slots (``--device-slots cpu0,cpu1``) are slots without CUDA_VISIBLE_DEVICES:
the scheduler's concurrency and ordering run on a CPU machine. torch-free.
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import BadInput

ALL = "all"
_WAIT_S = 0.5  # the caller's thread wakes this often, so a signal is handled promptly


@dataclass(frozen=True)
class Slot:
    """One place a process runs: its name in the records ("0": GPU 0, "cpu0": a test slot;
    None: the run's only, unnamed slot) and the CUDA_VISIBLE_DEVICES entry its children get
    (None: left as it is)."""

    name: str | None
    visible: str | None = None


ONE = (Slot(None),)  # no --devices: today's runner, one process at a time


def _names(text: str, flag: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    if not text.strip() or not all(names):
        raise BadInput(f"{flag} '{text}': an empty name; give a comma-separated list")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BadInput(f"{flag} '{text}': {', '.join(twice)} named twice")
    return names


def check_devices(text: str, where: str = "--devices") -> str:
    """``text`` as a --devices value (all, or GPU indices 0,1,3, normalised); BadInput when it
    is none, before the probe: what only the GPUs can tell, ``resolve`` judges later."""
    if not isinstance(text, str):
        raise BadInput(f"{where}: must be a string, all or GPU indices (\"0,1,2,3\")")
    if text.strip() == ALL:
        return ALL
    names = _names(text, where)
    bad = [n for n in names if not re.fullmatch(r"\d+", n)]
    if bad:
        raise BadInput(f"{where} '{text}': '{bad[0]}' is not a GPU index; give all or "
                       "comma-separated indices (0,1,2,3)")
    return ",".join(str(int(n)) for n in names)


def resolve(devices: str, test_slots: str | None, device: str, cuda: bool, device_count: int,
            visible: str | None) -> tuple[Slot, ...]:
    """The run's slots: ``devices`` (--devices; "" for none) on a run whose child device is
    ``device``, where the probe saw ``device_count`` CUDA devices (``cuda``) under the
    runner's CUDA_VISIBLE_DEVICES ``visible``; or the test-only ``test_slots``. BadInput when
    they do not fit."""
    if test_slots:
        if devices:
            raise BadInput("--device-slots (test-only CPU slots) and --devices exclude each other")
        return tuple(Slot(name) for name in _names(test_slots, "--device-slots"))
    if not devices:
        return ONE
    if not cuda or device != "cuda":
        why = "this machine has no CUDA GPU" if not cuda else f"the run's device is {device}"
        raise BadInput(f"--devices {devices}: runs one cell per GPU, and {why}; use --device "
                       "cuda (each child sees only its own GPUs, as cuda:0 upwards)")
    indices = list(range(device_count)) if devices == ALL else [int(n) for n in
                                                                devices.split(",")]
    missing = [i for i in indices if i >= device_count]
    if missing or not indices:
        raise BadInput(f"--devices {devices}: GPU {missing[0] if missing else 0} is not there; "
                       f"this machine shows {device_count} (0 to {device_count - 1})")
    # Indices count the GPUs the runner itself sees: under CUDA_VISIBLE_DEVICES, its entries.
    entries = [e.strip() for e in visible.split(",")] if visible else None
    return tuple(Slot(str(i), entries[i] if entries and i < len(entries) else str(i))
                 for i in indices)


def check_cells(slots: tuple[Slot, ...], cells: list[Any]) -> None:
    """BadInput when a cell cannot run on ``slots``: one of more ranks than GPUs named, or
    one on several nodes (such a cell takes its nodes whole)."""
    if slots == ONE or not cells:
        return
    if any(c.nnodes > 1 for c in cells):
        raise BadInput(f"--devices runs cells side by side on this node; cells on "
                       f"{max(c.nnodes for c in cells)} nodes (--nnodes) take their nodes whole")
    widest = max(cells, key=lambda c: c.num_processes)
    if widest.num_processes > len(slots):
        raise BadInput(f"{widest.label()} has {widest.num_processes} ranks, one GPU each, and "
                       f"--devices gives {len(slots)} ({label(slots)})")


def child_env(slots: tuple[Slot, ...]) -> dict[str, str]:
    """What a child on ``slots`` adds to its environment: its GPUs, numbered as NVML and
    nvidia-smi number them (PCI bus order), so that its NVML readings are of its own GPU."""
    visible = [s.visible for s in slots if s.visible is not None]
    if not visible:
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(visible), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def gpus(slots: tuple[Slot, ...]) -> set[int] | None:
    """The NVML indices of the slots' GPUs, whose state the run warns about; None: every GPU
    (no --devices, or CUDA_VISIBLE_DEVICES entries that are not indices)."""
    visible = [s.visible for s in slots]
    if not visible or not all(v is not None and v.isdigit() for v in visible):
        return None
    return {int(v) for v in visible if v is not None}


def label(slots: tuple[Slot, ...]) -> str | None:
    """The record's ``device_slot``: the slots' names, comma-separated; None for ONE."""
    names = [s.name for s in slots if s.name is not None]
    return ",".join(names) if names else None


@dataclass
class Finished:
    """A process that ended: the task, what its function returned, where and when it ran, and
    the tasks that ran beside it at some moment (in the order they started)."""

    task: Any
    result: Any
    slots: tuple[Slot, ...]
    started_unix_s: float
    ended_unix_s: float
    neighbours: list[Any] = field(default_factory=list)


@dataclass
class _Running:
    task: Any
    slots: tuple[Slot, ...]
    started: float | None = None  # set by its thread when the child starts
    ended: float | None = None


class Pool:
    """Processes on slots: ``start`` one where ``fits``, ``wait`` for those that end.

    ``fn(task, slots, cancel)`` runs in a thread of its own; it must return when ``cancel``
    is set (bench/run/launch.py kills its child's tree then). A child's parent-death signal
    is its thread's: each thread lives until its child is gone.
    """

    def __init__(self, slots: tuple[Slot, ...]) -> None:
        self.slots = slots
        self.free = list(slots)
        self.cancel = threading.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=len(slots), thread_name_prefix="ampbench-slot")
        self._running: dict[concurrent.futures.Future[Any], _Running] = {}
        self._ran: list[_Running] = []  # every process started, for the neighbours
        self._lock = threading.Lock()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is not None:  # stopped: every child dies with its tree before this returns
            self.cancel.set()
        self._executor.shutdown(wait=True)

    @property
    def running(self) -> list[Any]:
        """The tasks running now, in the order they started."""
        return [r.task for r in self._running.values()]

    def fits(self, num_slots: int) -> bool:
        return num_slots <= len(self.free)

    def start(self, task: Any, num_slots: int,
              fn: Callable[[Any, tuple[Slot, ...], threading.Event], Any]) -> tuple[Slot, ...]:
        """Run ``fn`` for ``task`` on the first ``num_slots`` free slots; returns them."""
        if not self.fits(num_slots):
            raise ValueError(f"{num_slots} slot(s) asked, {len(self.free)} free")
        taken, self.free = tuple(self.free[:num_slots]), self.free[num_slots:]
        running = _Running(task, taken)
        with self._lock:
            self._ran.append(running)
        future = self._executor.submit(self._call, running, fn)
        self._running[future] = running
        return taken

    def _call(self, running: _Running, fn: Callable[..., Any]) -> Any:
        with self._lock:
            running.started = time.time()
        try:
            return fn(running.task, running.slots, self.cancel)
        finally:
            with self._lock:
                running.ended = time.time()

    def wait(self) -> list[Finished]:
        """Block until at least one process ends; those that did, their slots freed. An
        exception of a process's function is raised here."""
        while True:
            done, _ = concurrent.futures.wait(list(self._running), timeout=_WAIT_S,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            if done:
                break
        finished = []
        for future in sorted(done, key=lambda f: self._running[f].ended or 0.0):
            running = self._running.pop(future)
            self.free = [s for s in self.slots if s in self.free or s in running.slots]
            result = future.result()
            finished.append(Finished(running.task, result, running.slots,
                                     running.started or 0.0, running.ended or 0.0,
                                     self._neighbours(running)))
        return finished

    def _neighbours(self, me: _Running) -> list[Any]:
        """The tasks whose time overlapped ``me``'s: started before it ended, not ended
        before it started. One that started later cannot have: ``me`` has ended."""
        with self._lock:
            return [other.task for other in self._ran if other is not me
                    and other.started is not None and other.started < (me.ended or 0.0)
                    and (other.ended is None or other.ended > (me.started or 0.0))]

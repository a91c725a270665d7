"""Parity on real data: Tiny Shakespeare (shipped with the package) and the user's own files
(``--data-dir``), never downloaded.

    ampbench parity --models gpt2-tiny-shakespeare --device cpu
    ampbench parity --data-dir ~/data --device cuda      # every task the directory holds

Tasks, each a parity task name and the reference model it trains (vocabulary or classes
resized to the data's, for that task only: the reference models keep their own sizes):

- ``*-shakespeare`` (gpt2-tiny, llama-tiny, gpt2-small): next-character prediction on Tiny
  Shakespeare (bench/parity/data/tinyshakespeare.txt, its sha256 checked on every load), the
  first 90% for training, the last 10% for validation, a vocabulary of its 65 characters.
  Eval loss is in nats per character. The FP32 and every other policy's seed 0 end with a
  sample of generated text (seeded sampling from a fixed prompt), shown in the report.
- ``resnet-tiny-cifar10``: CIFAR-10's binary version in DIR/cifar-10-batches-bin (or DIR
  itself): data_batch_1..5.bin for training, test_batch.bin held out, each record 1 label
  byte and 3,072 pixel bytes (3 x 32 x 32, channel-major), each channel normalised by the
  training set's mean and std.
- ``gpt2-tiny-tokens``, ``llama-tiny-tokens``: nanoGPT's flat token files, DIR/train.bin and
  DIR/val.bin (uint16 ids, native byte order); the vocabulary is DIR/meta.json's
  ``vocab_size`` when that file exists, else the largest id in either file plus one.

Training draws random contiguous windows (or images) from the training split with the run
seed's generator; the held-out set is fixed: windows evenly spaced over the validation split,
or the test set's first images. The parent checks a data directory from file sizes alone
(``check_data_dir``, torch-free): a missing, truncated or wrong-sized file is one line naming
the file, exit 2, before any training. The child reads the contents (``make_task``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import models
from bench import BadInput

SHAKESPEARE_FILE = Path(__file__).with_name("data") / "tinyshakespeare.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_BYTES = 1_115_394
TRAIN_FRACTION = 0.9  # the first 90% trains, the last 10% validates (nanoGPT's split)
SAMPLE_PROMPT = "ROMEO:\n"
SAMPLE_CHARS = 200
_SAMPLE_SEED = 0
_SAMPLE_TEMPERATURE = 0.8  # below 1: a trained model's text reads as words, garbage stays garbage

CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = "test_batch.bin"
CIFAR_IMAGE = 3 * 32 * 32
CIFAR_RECORD = 1 + CIFAR_IMAGE  # a label byte, then the pixels
CIFAR_RECORDS = 10_000  # per file in the distribution; fewer are accepted (test sets)
CIFAR_CLASSES = 10
TOKEN_FILES = ("train.bin", "val.bin")
TOKEN_BYTES = 2  # uint16
META_JSON = "meta.json"

# Parity task -> the reference model it trains.
SHAKESPEARE_TASKS = {"gpt2-tiny-shakespeare": "gpt2-tiny",
                     "llama-tiny-shakespeare": "llama-tiny",
                     "gpt2-small-shakespeare": "gpt2-small"}
CIFAR_TASKS = {"resnet-tiny-cifar10": "resnet-tiny"}
TOKEN_TASKS = {"gpt2-tiny-tokens": "gpt2-tiny", "llama-tiny-tokens": "llama-tiny"}
TASK_MODELS = {**SHAKESPEARE_TASKS, **CIFAR_TASKS, **TOKEN_TASKS}


# --------------------------------------------------------------------------------------------
# The parent side: names, the data directory's files by size (torch-free)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_shakespeare(path: Path = SHAKESPEARE_FILE) -> Path:
    """The shipped text's path; BadInput (one line) when it is missing or not the known file."""
    if not path.is_file():
        raise BadInput(f"{path}: missing (Tiny Shakespeare ships with ampbench; reinstall it)")
    found = sha256(path)
    if found != SHAKESPEARE_SHA256:
        raise BadInput(f"{path}: sha256 {found[:16]}... is not Tiny Shakespeare's "
                       f"{SHAKESPEARE_SHA256[:16]}... (the file is damaged or replaced)")
    return path


@dataclass(frozen=True)
class DataDir:
    """A checked ``--data-dir``: its CIFAR-10 files (train then test) and token files."""

    path: Path
    cifar: tuple[Path, ...] = ()
    tokens: tuple[Path, ...] = ()
    meta: Path | None = None  # the token files' meta.json

    def tasks(self) -> list[str]:
        """The parity tasks its files make."""
        return [*(CIFAR_TASKS if self.cifar else ()), *(TOKEN_TASKS if self.tokens else ())]

    def files(self) -> list[dict[str, Any]]:
        """Each file a task reads, with its size: what the run records."""
        paths = [*self.cifar, *self.tokens, *([self.meta] if self.meta else [])]
        return [{"path": str(p), "bytes": p.stat().st_size} for p in paths]

    def fingerprint(self, task: str) -> list[Any]:
        """What makes a finished run on ``task`` reusable: its files' paths and sizes."""
        paths = self.cifar if task in CIFAR_TASKS else (
            [*self.tokens, *([self.meta] if self.meta else [])] if task in TOKEN_TASKS else [])
        return [[str(p), p.stat().st_size] for p in paths]


def _records(path: Path, record: int, what: str, unit: str) -> int:
    """How many whole ``record``-byte records ``path`` holds; BadInput if not a whole number."""
    size = path.stat().st_size
    if size == 0:
        raise BadInput(f"{path}: empty (0 bytes); expected {what}")
    if size % record:
        raise BadInput(f"{path}: {size:,} bytes is not a whole number of {record:,}-byte "
                       f"{unit}s: truncated, or not {what}")
    return size // record


def _check_cifar(folder: Path) -> tuple[Path, ...]:
    files = [folder / name for name in (*CIFAR_TRAIN, CIFAR_TEST)]
    what = "CIFAR-10's binary version (1 label byte + 3,072 pixel bytes per record)"
    for path in files:
        if not path.is_file():
            raise BadInput(f"{path}: missing; CIFAR-10's binary version needs "
                           f"{', '.join(CIFAR_TRAIN)} and {CIFAR_TEST} in {folder}")
        count = _records(path, CIFAR_RECORD, what, "record")
        if count > CIFAR_RECORDS:
            raise BadInput(f"{path}: {count:,} records, more than the {CIFAR_RECORDS:,} of a "
                           f"CIFAR-10 file: not {what}")
    return tuple(files)


def _check_tokens(folder: Path) -> tuple[tuple[Path, ...], Path | None]:
    files = [folder / name for name in TOKEN_FILES]
    for path in files:
        if not path.is_file():
            raise BadInput(f"{path}: missing; token files come in pairs: "
                           f"{' and '.join(TOKEN_FILES)} (uint16 token ids) in {folder}")
        _records(path, TOKEN_BYTES, "a flat file of uint16 token ids", "token id")
    meta = folder / META_JSON
    if not meta.is_file():
        return tuple(files), None
    vocab_size(meta)  # a bad meta.json is bad input too
    return tuple(files), meta


def vocab_size(meta: Path) -> int:
    """meta.json's ``vocab_size`` (BadInput when it has none, or not a whole number 2..65536)."""
    try:
        value = json.loads(meta.read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError) as exc:
        raise BadInput(f"{meta}: not a JSON object with vocab_size ({exc})") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 1 << 16:
        raise BadInput(f"{meta}: vocab_size must be a whole number from 2 to 65536 (uint16 "
                       f"ids), got {value!r}")
    return value


def check_data_dir(path: Path | str) -> DataDir:
    """The tasks a ``--data-dir`` holds, from its files' sizes alone (torch-free); BadInput,
    one line naming the file and the problem, for a missing, truncated or wrong-sized file or
    a directory that holds neither data set."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise BadInput(f"--data-dir {path}: not a directory")
    cifar_dir = folder / CIFAR_DIR if (folder / CIFAR_DIR).is_dir() else folder
    has_cifar = any((cifar_dir / name).exists() for name in (*CIFAR_TRAIN, CIFAR_TEST))
    has_tokens = any((folder / name).exists() for name in TOKEN_FILES)
    if not has_cifar and not has_tokens:
        raise BadInput(f"--data-dir {path}: holds neither {CIFAR_DIR}/ (CIFAR-10's binary "
                       f"version) nor {' and '.join(TOKEN_FILES)} (uint16 token ids)")
    cifar = _check_cifar(cifar_dir) if has_cifar else ()
    tokens, meta = _check_tokens(folder) if has_tokens else ((), None)
    return DataDir(folder.resolve(), cifar, tokens, meta)


def check_tasks(names: list[str], data_dir: DataDir | None) -> None:
    """BadInput for a named task whose data is not there (a data-dir task without --data-dir
    or its files; Tiny Shakespeare damaged)."""
    for name in names:
        if name in SHAKESPEARE_TASKS:
            check_shakespeare()
        elif name in CIFAR_TASKS or name in TOKEN_TASKS:
            needs = (f"{CIFAR_DIR}/ (CIFAR-10's binary version)" if name in CIFAR_TASKS
                     else f"{' and '.join(TOKEN_FILES)} (uint16 token ids)")
            if data_dir is None or name not in data_dir.tasks():
                where = f"--data-dir {data_dir.path} holds no" if data_dir else \
                    "give --data-dir DIR with"
                raise BadInput(f"parity task '{name}' trains on files of your own: {where} "
                               f"{needs}")


def check_lengths(setups: dict[str, dict[str, Any]], data_dir: DataDir | None) -> None:
    """BadInput when a token file holds fewer ids than one window of its task's setup."""
    for task, setup in setups.items():
        if task in TOKEN_TASKS and data_dir is not None:
            length = int(setup["size"]) + 1
            for path in data_dir.tokens:
                count = path.stat().st_size // TOKEN_BYTES
                if count < length:
                    raise BadInput(f"{path}: {count:,} token ids, fewer than one window of "
                                   f"{length} ({task}'s seq_len {setup['size']} + 1)")


def record(path: Path, tasks: list[str], data_dir: DataDir | None) -> None:
    """Write which real-data files the runs read (``path``: the run's parity_data.json), or
    remove an earlier run's when none is read now."""
    used: list[dict[str, Any]] = []
    if any(t in SHAKESPEARE_TASKS for t in tasks):
        # Named inside the package: where it is installed is this machine's business.
        used.append({"path": "bench/parity/data/tinyshakespeare.txt (shipped)",
                     "bytes": SHAKESPEARE_FILE.stat().st_size,
                     "sha256": SHAKESPEARE_SHA256, "tasks": [t for t in tasks
                                                             if t in SHAKESPEARE_TASKS]})
    if data_dir is not None:
        mine = [t for t in tasks if t in data_dir.tasks()]
        used += [{**item, "tasks": mine} for item in data_dir.files()] if mine else []
    if not used:
        path.unlink(missing_ok=True)
        return
    text = json.dumps({"data_dir": str(data_dir.path) if data_dir else None, "files": used},
                      indent=1)
    path.write_text(text + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# The child side: contents, models and batches (numpy and torch, imported where used)


@dataclass(frozen=True)
class Resized(models.ModelSpec):
    """A reference model with its vocabulary (or classes) set to a data set's, for one task."""

    classes: int = 0

    @property
    def config(self) -> Any:
        base = super().config
        return replace(base, **{"num_classes" if self.family == "resnet" else "vocab_size":
                                self.classes})


def resized(spec: models.ModelSpec, classes: int) -> models.ModelSpec:
    """``spec`` whose vocabulary (or classes) is ``classes``; itself when it already is."""
    field = "num_classes" if spec.family == "resnet" else "vocab_size"
    if getattr(spec.config, field) == classes:
        return spec
    return Resized(spec.name, spec.family, spec.unit, spec.size_arg, spec.default_size,
                   spec.max_size, spec.default_batch_size, spec.size, classes=classes)


@lru_cache(maxsize=1)
def shakespeare() -> tuple[bytes, Any, Any]:
    """(the characters in id order, training ids, validation ids) of Tiny Shakespeare."""
    import numpy as np

    raw = check_shakespeare().read_bytes()
    codes = np.frombuffer(raw, dtype=np.uint8)
    chars = np.unique(codes)
    lookup = np.zeros(256, dtype=np.int64)
    lookup[chars] = np.arange(len(chars))
    ids = lookup[codes]
    split = int(len(ids) * TRAIN_FRACTION)
    return bytes(chars), ids[:split], ids[split:]


def _token_vocab(folder: DataDir) -> int:
    """meta.json's vocab_size, else the largest id in the token files plus one; BadInput
    when an id is outside meta.json's vocabulary."""
    import numpy as np

    largest = max(int(np.max(_memmap(p), initial=0)) for p in folder.tokens)
    if folder.meta is None:
        return largest + 1
    size = vocab_size(folder.meta)
    if largest >= size:
        raise BadInput(f"{folder.meta}: vocab_size {size}, but the token files hold id "
                       f"{largest}")
    return size


def _memmap(path: Path) -> Any:
    import numpy as np

    return np.memmap(path, dtype=np.uint16, mode="r")


def classes(task: str, data_dir: DataDir | None) -> int:
    """The vocabulary (or number of classes) of a real-data task's data."""
    if task in SHAKESPEARE_TASKS:
        return len(shakespeare()[0])
    if task in CIFAR_TASKS:
        return CIFAR_CLASSES
    if data_dir is None or not data_dir.tokens:
        raise BadInput(f"parity task '{task}' needs --data-dir DIR with "
                       f"{' and '.join(TOKEN_FILES)}")
    return _token_vocab(data_dir)


class _Windows:
    """Next-token prediction on a flat id sequence: random windows of the training split
    (the run seed's generator), a fixed set spread evenly over the validation split."""

    optimal_loss = None

    def __init__(self, spec: models.ModelSpec, setup: Any, train: Any, val: Any,
                 names: list[str]) -> None:
        length = setup.size + 1
        for ids, name in zip((train, val), names, strict=True):
            if len(ids) < length:
                raise BadInput(f"{name}: {len(ids):,} tokens, fewer than one window of "
                               f"{length} (seq_len {setup.size} + 1)")
        self.spec, self.setup, self.train, self.val = spec, setup, train, val

    def _windows(self, ids: Any, starts: Any) -> tuple[Any, Any]:
        import numpy as np
        import torch

        rows = np.stack([np.asarray(ids[s:s + self.setup.size + 1], dtype=np.int64)
                         for s in starts])
        data = torch.from_numpy(rows)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def batch(self, generator: Any) -> tuple[Any, Any]:
        import torch

        high = len(self.train) - self.setup.size
        starts = torch.randint(0, high, (self.setup.batch_size,), generator=generator)
        return self._windows(self.train, starts.tolist())

    def held_out(self, device: Any) -> list[tuple[Any, Any]]:
        """The fixed validation windows, evenly spaced over the validation split."""
        import numpy as np

        count = self.setup.eval_batches * self.setup.batch_size
        starts = np.linspace(0, len(self.val) - self.setup.size - 1, count).astype(int)
        return [tuple(models.to_device(t, device)  # type: ignore[misc]
                      for t in self._windows(self.val, chunk))
                for chunk in np.array_split(starts, self.setup.eval_batches)]


class CharTask(_Windows):
    """Tiny Shakespeare at the character level; it can write a sample of text."""

    def __init__(self, spec: models.ModelSpec, setup: Any) -> None:
        chars, train, val = shakespeare()
        super().__init__(spec, setup, train, val, ["Tiny Shakespeare's training split",
                                                   "Tiny Shakespeare's validation split"])
        self.chars = chars

    def sample(self, trainer: Any, length: int = SAMPLE_CHARS) -> str:
        """``length`` characters the model writes after SAMPLE_PROMPT: seeded sampling at
        temperature 0.8, under the run's policy (its autocast)."""
        import torch

        index = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([[index[c] for c in SAMPLE_PROMPT.encode()]],
                           device=trainer.device)
        generator = torch.Generator().manual_seed(_SAMPLE_SEED)
        model = trainer.model
        model.eval()
        out = []
        with torch.no_grad(), trainer.policy.autocast(trainer.device.type):
            for _ in range(length):
                logits = model(ids[:, -self.setup.size:])[0, -1].float().cpu()
                probs = torch.softmax(logits / _SAMPLE_TEMPERATURE, dim=-1)
                if not torch.isfinite(probs).all() or probs.sum() <= 0:
                    probs = torch.full_like(probs, 1.0 / len(probs))  # a NaN model: noise
                nxt = int(torch.multinomial(probs, 1, generator=generator))
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device)], dim=1)
        model.train()
        return bytes(self.chars[i] for i in out).decode("ascii", errors="replace")


class TokenTask(_Windows):
    """nanoGPT's train.bin / val.bin."""

    def __init__(self, spec: models.ModelSpec, setup: Any, folder: DataDir) -> None:
        train, val = (_memmap(p) for p in folder.tokens)
        super().__init__(spec, setup, train, val, [str(p) for p in folder.tokens])


def read_cifar(paths: Iterator[Path] | tuple[Path, ...]) -> tuple[Any, Any]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) from CIFAR-10 binary files; BadInput
    naming the file for a label outside 0..9."""
    import numpy as np

    images, labels = [], []
    for path in paths:
        records = np.fromfile(path, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
        if records.size and records[:, 0].max() >= CIFAR_CLASSES:
            raise BadInput(f"{path}: label {int(records[:, 0].max())} outside 0..9: not "
                           "CIFAR-10's binary version")
        labels.append(records[:, 0].astype(np.int64))
        images.append(records[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)


class CifarTask:
    """CIFAR-10 images, each channel normalised by the training set's mean and std."""

    optimal_loss = None

    def __init__(self, spec: models.ModelSpec, setup: Any, folder: DataDir) -> None:
        import torch

        train_x, train_y = read_cifar(folder.cifar[:-1])
        test_x, test_y = read_cifar(folder.cifar[-1:])
        pixels = torch.from_numpy(train_x).double()
        self.mean = pixels.mean(dim=(0, 2, 3), keepdim=True)
        self.std = pixels.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        self.spec, self.setup = spec, setup
        self.train = (torch.from_numpy(train_x), torch.from_numpy(train_y))
        self.test = (torch.from_numpy(test_x), torch.from_numpy(test_y))

    def _images(self, raw: Any) -> Any:
        return ((raw.double() - self.mean) / self.std).float()

    def batch(self, generator: Any) -> tuple[Any, Any]:
        import torch

        index = torch.randint(0, len(self.train[1]), (self.setup.batch_size,),
                              generator=generator)
        return self._images(self.train[0][index]), self.train[1][index]

    def held_out(self, device: Any) -> list[tuple[Any, Any]]:
        """The test set's first ``eval_batches`` batches (fewer when it holds fewer images)."""
        size = self.setup.batch_size
        count = min(len(self.test[1]), self.setup.eval_batches * size)
        return [(models.to_device(self._images(self.test[0][i:i + size]), device),
                 models.to_device(self.test[1][i:i + size], device))
                for i in range(0, count, size)]


def make_task(name: str, spec: models.ModelSpec, setup: Any,
              data_dir: DataDir | None) -> Any:
    """The task object (``batch``, ``held_out``, ``optimal_loss``) of real-data task ``name``."""
    if name in SHAKESPEARE_TASKS:
        return CharTask(spec, setup)
    if data_dir is None:
        raise BadInput(f"parity task '{name}' needs --data-dir")
    return CifarTask(spec, setup, data_dir) if name in CIFAR_TASKS else \
        TokenTask(spec, setup, data_dir)

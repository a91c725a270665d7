"""Parity on real data (bench/parity/data.py): Tiny Shakespeare shipped and checked, CIFAR-10
and token files from a --data-dir checked by size (exit 2 before any training), read, and
trained on; the report's appendix shows the text each policy wrote."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import BadInput, report, store
from bench.cli import main
from bench.parity import data

RECORD = data.CIFAR_RECORD


def _cifar(root: Path, records: int = 4, skip: str | None = None) -> Path:
    """A CIFAR-10 binary set of ``records`` per file: label i % 10, pixels of value 10 * c."""
    folder = root / data.CIFAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*data.CIFAR_TRAIN, data.CIFAR_TEST):
        if name == skip:
            continue
        rows = np.zeros((records, RECORD), dtype=np.uint8)
        rows[:, 0] = np.arange(records) % 10
        rows[:, 1:] = np.repeat(np.arange(3) * 10 + np.arange(records)[:, None],
                                1024, axis=1)
        rows.tofile(folder / name)
    return root


def _tokens(root: Path, vocab: int = 50, count: int = 400) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ids = (np.arange(count) * 7 % vocab).astype(np.uint16)
    ids.tofile(root / "train.bin")
    ids[: count // 2].tofile(root / "val.bin")
    return root


# ------------------------------------------------------------------ Tiny Shakespeare


def test_the_shipped_text_is_tiny_shakespeare_split_90_10():
    assert data.check_shakespeare().stat().st_size == data.SHAKESPEARE_BYTES
    chars, train, val = data.shakespeare()
    assert len(chars) == 65 and chars[:2] == b"\n " and b"z" in chars
    assert len(train) == int(data.SHAKESPEARE_BYTES * 0.9) == 1_003_854
    assert len(train) + len(val) == data.SHAKESPEARE_BYTES
    text = data.SHAKESPEARE_FILE.read_bytes()
    assert bytes(chars[i] for i in train[:14]) == text[:14] == b"First Citizen:"
    assert bytes(chars[i] for i in val[-20:]) == text[-20:]


def test_a_damaged_copy_fails_its_checksum_in_one_line(tmp_path):
    copy = tmp_path / "tinyshakespeare.txt"
    shutil.copy(data.SHAKESPEARE_FILE, copy)
    with open(copy, "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    with pytest.raises(BadInput, match=r"sha256 \S+ is not Tiny Shakespeare's") as exc:
        data.check_shakespeare(copy)
    assert "\n" not in str(exc.value)
    with pytest.raises(BadInput, match="missing"):
        data.check_shakespeare(tmp_path / "gone.txt")


def test_the_char_task_learns_and_writes_text():
    import torch

    from bench.parity import tasks, train

    setup = tasks.setup_for("gpt2-tiny-shakespeare", steps=40)
    assert setup.num_states == 65
    setup = tasks.replace(setup, batch_size=16, size=32, eval_batches=2)
    spec = tasks.spec_for("gpt2-tiny-shakespeare", setup)
    assert spec.config.vocab_size == 65
    assert tasks.spec_for("gpt2-tiny").config.vocab_size == 512  # the reference stays exact
    row, curve, _ = train.train_one("gpt2-tiny-shakespeare", "fp32", 0, setup,
                                    torch.device("cpu"))
    assert row["initial_eval_loss"] > 4.0
    assert row["eval_loss"] < math.log(65) - 0.5
    assert len(row["sample_text"]) == data.SAMPLE_CHARS
    assert row["sample_prompt"] == data.SAMPLE_PROMPT
    assert curve[-1]["loss"] < curve[0]["loss"]


def test_validation_windows_are_fixed_and_from_the_last_tenth():
    from bench.parity import tasks

    setup = tasks.replace(tasks.setup_for("gpt2-tiny-shakespeare"), batch_size=4, size=16,
                          eval_batches=2)
    task = data.CharTask(tasks.spec_for("gpt2-tiny-shakespeare", setup), setup)
    first, again = task.held_out("cpu"), task.held_out("cpu")
    assert len(first) == 2 and tuple(first[0][0].shape) == (4, 16)
    assert all((a[0] == b[0]).all() for a, b in zip(first, again, strict=True))
    _, _, val = data.shakespeare()
    assert list(first[0][0][0].numpy()) == list(val[:16])  # the first window starts the split
    assert (first[0][1][:, :-1] == first[0][0][:, 1:]).all()  # targets: the next character


# ------------------------------------------------------------------ --data-dir: CIFAR-10


def test_a_cifar_set_of_few_records_is_a_task_and_reads_back(tmp_path):
    folder = data.check_data_dir(_cifar(tmp_path, records=4))
    assert folder.tasks() == ["resnet-tiny-cifar10"]
    assert [Path(f["path"]).name for f in folder.files()] == [*data.CIFAR_TRAIN, data.CIFAR_TEST]
    images, labels = data.read_cifar(folder.cifar[:1])
    assert images.shape == (4, 3, 32, 32) and list(labels) == [0, 1, 2, 3]
    assert images[2, 1, 5, 7] == 12  # channel 1 of record 2: 10 * 1 + 2


def test_cifar_batches_are_normalised_per_channel(tmp_path):
    from bench.parity import tasks

    folder = data.check_data_dir(_cifar(tmp_path, records=6))
    setup = tasks.replace(tasks.setup_for("resnet-tiny-cifar10"), batch_size=4, eval_batches=2)
    task = data.CifarTask(tasks.spec_for("resnet-tiny-cifar10", setup), setup, folder)
    every = task._images(task.train[0])
    assert every.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (every.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    held = task.held_out("cpu")
    assert [len(y) for _, y in held] == [4, 2]  # the test file's 6 records, batches of 4


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"data_batch_3.bin: 9,000 bytes is not a whole number of 3,073-byte records"),
    ("missing", r"test_batch.bin: missing; CIFAR-10's binary version needs"),
    ("empty", r"data_batch_3.bin: empty \(0 bytes\)"),
    ("large", r"data_batch_3.bin: 10,001 records, more than the 10,000"),
])
def test_a_damaged_cifar_set_is_one_line(tmp_path, damage, message):
    root = _cifar(tmp_path, skip=data.CIFAR_TEST if damage == "missing" else None)
    target = root / data.CIFAR_DIR / "data_batch_3.bin"
    size = {"truncate": 9000, "empty": 0, "large": 10_001 * RECORD}.get(damage)
    if size is not None:
        with open(target, "r+b") as f:
            f.truncate(size)  # sparse: no 30 MB written
    with pytest.raises(BadInput, match=message) as exc:
        data.check_data_dir(root)
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------ --data-dir: token files


def test_token_files_are_a_task_with_the_largest_id_as_vocabulary(tmp_path):
    from bench.parity import tasks

    folder = data.check_data_dir(_tokens(tmp_path, vocab=50))
    assert folder.tasks() == ["gpt2-tiny-tokens", "llama-tiny-tokens"]
    setup = tasks.setup_for("gpt2-tiny-tokens", data_dir=folder)
    assert setup.num_states == 50
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 64}))
    assert tasks.setup_for("gpt2-tiny-tokens", data_dir=data.check_data_dir(tmp_path)) \
        .num_states == 64
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 20}))
    with pytest.raises(BadInput, match="vocab_size 20, but the token files hold id 49"):
        tasks.setup_for("gpt2-tiny-tokens", data_dir=data.check_data_dir(tmp_path))


def test_a_token_task_trains_on_windows_of_the_files(tmp_path):
    import torch

    from bench.parity import tasks, train

    folder = data.check_data_dir(_tokens(tmp_path, vocab=50))
    setup = tasks.replace(tasks.setup_for("llama-tiny-tokens", steps=3, data_dir=folder),
                          batch_size=4, size=16, eval_batches=2)
    task = train.make_task("llama-tiny-tokens", setup, folder)
    inputs, targets = task.batch(torch.Generator().manual_seed(0))
    assert tuple(inputs.shape) == (4, 16) and (targets[:, :-1] == inputs[:, 1:]).all()
    assert ((targets - inputs) % 50 == 7).all()  # the files' rule: each id 7 past the last
    row, _, _ = train.train_one("llama-tiny-tokens", "fp32", 0, setup, torch.device("cpu"),
                                task=task)
    assert math.isfinite(row["eval_loss"]) and "sample_text" not in row


@pytest.mark.parametrize("damage, message", [
    ("odd", r"train.bin: 801 bytes is not a whole number of 2-byte token ids"),
    ("missing", r"val.bin: missing; token files come in pairs"),
    ("meta", r"meta.json: vocab_size must be a whole number from 2 to 65536"),
])
def test_damaged_token_files_are_one_line(tmp_path, damage, message):
    root = _tokens(tmp_path)
    if damage == "odd":
        with open(root / "train.bin", "ab") as f:
            f.write(b"\0")
    elif damage == "missing":
        (root / "val.bin").unlink()
    else:
        (root / "meta.json").write_text(json.dumps({"vocab_size": "fifty"}))
    with pytest.raises(BadInput, match=message):
        data.check_data_dir(root)


def test_a_directory_without_either_data_set_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="holds neither cifar-10-batches-bin/"):
        data.check_data_dir(tmp_path)
    with pytest.raises(BadInput, match="not a directory"):
        data.check_data_dir(tmp_path / "nowhere")


# ------------------------------------------------------------------ the CLI: exit 2 first


def _one_line_exit_2(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_parity_refuses_a_truncated_file_before_training(tmp_path, capsys):
    root = _cifar(tmp_path / "d")
    with open(root / data.CIFAR_DIR / data.CIFAR_TEST, "ab") as f:
        f.write(b"\0" * 10)
    out = tmp_path / "out"
    _one_line_exit_2(capsys, ["parity", "--device", "cpu", "--data-dir", str(root),
                              "--out", str(out)], "test_batch.bin: 12,302 bytes")
    assert not out.exists()


def test_parity_task_without_its_files_is_exit_2(tmp_path, capsys):
    _one_line_exit_2(capsys, ["parity", "--models", "resnet-tiny-cifar10", "--out",
                              str(tmp_path / "o")], "give --data-dir DIR with")
    _one_line_exit_2(capsys, ["parity", "--models", "resnet-tiny-cifar10", "--data-dir",
                              str(_tokens(tmp_path / "t")), "--out", str(tmp_path / "o")],
                     "holds no cifar-10-batches-bin/")


def test_run_refuses_a_bad_data_dir_before_any_cell(tmp_path, capsys):
    root = _tokens(tmp_path / "d")
    (root / "val.bin").unlink()
    out = tmp_path / "run"
    _one_line_exit_2(capsys, ["run", "--preset", "quick", "--out", str(out), "--data-dir",
                              str(root)], "val.bin: missing")
    assert not (out / store.RECORDS).exists()


@pytest.mark.slow
def test_parity_on_token_files_end_to_end_records_the_files(tmp_path):
    from bench.parity import run_parity

    root = _tokens(tmp_path / "d", vocab=50)
    path = run_parity(tmp_path / "run", models=["gpt2-tiny-tokens"], precisions=["fp32"],
                      steps=3, seeds=2, device="cpu", data_dir=root)
    frame = pd.read_csv(path)
    assert list(frame["model"]) == ["gpt2-tiny-tokens"] * 2 and frame["eval_loss"].notna().all()
    used = json.loads((tmp_path / "run" / "parity_data.json").read_text())
    assert [Path(f["path"]).name for f in used["files"]] == ["train.bin", "val.bin"]
    assert used["files"][0]["bytes"] == 800


# ------------------------------------------------------------------ the report


def test_the_appendix_shows_each_policys_text_and_the_data(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    store.write_meta(run, {"run_id": "r", "device_name": "Test CPU"})
    store.write_csv(run, [])
    task = "gpt2-tiny-shakespeare"
    rows, curves = [], []
    for policy, loss, verdict in (("fp32", 2.45, "PASS"), ("broken", 3.9, "FAIL")):
        for seed in range(2):
            rows.append(dict(model=task, precision=policy, seed=seed, steps=20,
                             eval_loss=loss + seed * 0.01, verdict=verdict, fp32_mean=2.455,
                             delta=0.0, tolerance=0.03, initial_eval_loss=4.2,
                             final_train_loss=loss))
            curves += [dict(model=task, precision=policy, seed=seed, step=s,
                            loss=4.2 - s * (0.08 if policy == "fp32" else 0.02))
                       for s in (10, 20)]
    pd.DataFrame(rows).to_csv(run / report.PARITY, index=False)
    pd.DataFrame(curves).to_csv(run / report.CURVES, index=False)
    pd.DataFrame([dict(model=task, precision="fp32", seed=0, prompt="ROMEO:\n",
                       text="What say you, my lord?"),
                  dict(model=task, precision="broken", seed=0, prompt="ROMEO:\n",
                       text="xq;;Zk\n\nQQ$")]).to_csv(run / "parity_samples.csv", index=False)
    data.record(run / "parity_data.json", [task], None)
    text = report.write_report(run).read_text()
    appendix = text[text.index("## Appendix: parity on real data"):]
    assert "**fp32** (PASS, eval loss 2.455)" in appendix
    assert "````\nROMEO:\nWhat say you, my lord?\n````" in appendix
    assert "**broken** (FAIL, eval loss 3.905)" in appendix and "xq;;Zk" in appendix
    assert f"1,115,394 bytes, sha256 {data.SHAKESPEARE_SHA256}" in appendix
    assert "nats per character on Tiny Shakespeare's last 10%" in text
    assert f"![{task}: training loss on real data](plots/real_loss-{task}.png)" in text
    assert (run / "plots" / f"real_loss-{task}.png").is_file()

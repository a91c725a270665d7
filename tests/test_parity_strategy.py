"""Parity on several ranks (``ampbench parity --strategy S --ranks N``): every policy trains
under FSDP2 (or DDP) on torchrun's ranks over gloo, each rank its slice of the batch, judged
against FP32 in one process. Two ranks on CPU, a few steps of gpt2-tiny."""

from __future__ import annotations

import pandas as pd
import pytest

from bench import BadInput, parity
from bench.parity import sharing as sharing_
from bench.parity import stage, tasks
from bench.parity.sharing import Sharing
from bench.strategy import parse

SHORT = dict(models=["gpt2-tiny"], steps=6, seeds=2, device="cpu")


def test_run_labels_name_the_policy_and_its_strategy():
    assert tasks.run_label("bf16", None) == "bf16"
    assert tasks.run_label("bf16", "fsdp2:bf16/fp32") == "bf16@fsdp2:bf16/fp32"
    assert tasks.split_label("bf16@fsdp2:bf16/fp32") == ("bf16", "fsdp2:bf16/fp32")
    assert tasks.split_label("fp16-noscale") == ("fp16-noscale", None)


def test_fp32_stays_in_one_process_as_the_reference_and_every_policy_runs_shared():
    sharing = Sharing(parse("fsdp2:bf16/fp32"), 2)
    labels = sharing_.labels(["fp32", "bf16"], sharing)
    assert labels == [("fp32", 0), ("fp32@fsdp2:bf16/fp32", 2), ("bf16@fsdp2:bf16/fp32", 2)]
    assert sharing_.labels(["fp32", "bf16"], None) == [("fp32", 0), ("bf16", 0)]


def test_ranks_are_checked_against_the_gpus_and_batches_or_fitted_to_them():
    fsdp2 = parse("fsdp2")
    batches = {"llama-small": 16, "gpt2-tiny-lowlr": 8}
    assert Sharing(fsdp2, 8).checked("cuda", 8, batches).ranks == 8
    with pytest.raises(BadInput, match="llama-small's parity batch of 16 does not split"):
        Sharing(fsdp2, 3).checked("cpu", None, batches)
    with pytest.raises(BadInput, match="one GPU each, and this machine shows 4"):
        Sharing(fsdp2, 8).checked("cuda", 4, batches)
    with pytest.raises(BadInput, match="use --device cuda, not cuda:1"):
        Sharing(fsdp2, 2).checked("cuda:1", 4, batches)
    # A run's matrix: as many ranks as its widest cell, brought down to what fits.
    assert Sharing(fsdp2, 8, fit=True).checked("cuda", 6, batches).ranks == 4
    assert Sharing(fsdp2, 8, fit=True).checked("cuda", 1, batches).ranks == 1
    assert Sharing(fsdp2, 16, fit=True).checked("cuda", 16, batches).ranks == 8


def test_bad_strategy_and_ranks_are_one_line_of_bad_input(tmp_path):
    with pytest.raises(BadInput, match="--strategy: unknown strategy 'zero3'"):
        Sharing.parse("zero3", 2)
    with pytest.raises(BadInput, match="--ranks must be at least 1"):
        Sharing.parse("fsdp2", 0)
    # gpt2-tiny's parity batch is 16: three ranks cannot split it (checked before any run).
    with pytest.raises(BadInput, match="batch of 16 does not split evenly"):
        parity.run_parity(tmp_path / "run", **SHORT, precisions=["fp32"],
                          sharing=Sharing(parse("fsdp2"), 3))
    assert not (tmp_path / "run" / "parity.csv").exists()


def test_the_cli_refuses_a_bad_strategy_in_one_line(tmp_path, capsys):
    from bench.__main__ import main

    code = main(["parity", "--device", "cpu", "--models", "gpt2-tiny", "--strategy", "zero3",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "zero3" in err[0]


@pytest.mark.slow
def test_sharded_fp32_trains_the_one_process_run_and_mixed_precision_is_judged(tmp_path,
                                                                             capsys):
    """FSDP2 without casts on two ranks, each half the batch, is the one-process run up to
    the order of float sums: the same eval loss to 1e-5 (measured: 6e-8). Under torchtitan's
    policy (bf16 gathered parameters, fp32 reduction) FP32 and bf16 are judged against the
    one-process band; fp16 over bf16-gathered parameters is refused with the reason."""
    path = parity.run_parity(tmp_path, **SHORT, precisions=["fp32", "bf16", "fp16"],
                             sharing=Sharing(parse("fsdp2"), 2))
    frame = pd.read_csv(path)
    one = frame[frame["precision"] == "fp32"].set_index("seed")
    shared = frame[frame["precision"] == "fp32@fsdp2"].set_index("seed")
    assert list(shared.index) == [0, 1]
    assert (shared["eval_loss"] - one["eval_loss"]).abs().max() < 1e-5
    assert (shared["final_train_loss"] - one["final_train_loss"]).abs().max() < 1e-5
    assert set(shared["strategy"]) == {"fsdp2"} and set(shared["ranks"]) == {2}
    assert set(one["ranks"]) == {1} and one["strategy"].isna().all()
    assert set(frame["verdict"]) == {"PASS"}
    assert frame.loc[frame["precision"] == "fp16@fsdp2", "scaler_skipped_steps"].notna().all()

    mixed = parity.run_parity(tmp_path / "mixed", **SHORT, precisions=["fp32", "bf16", "fp16"],
                              sharing=Sharing(parse("fsdp2:bf16/fp32"), 2))
    assert "skipping gpt2-tiny fp16@fsdp2:bf16/fp32: fp16 under fsdp2:bf16/fp32" \
        in capsys.readouterr().err
    frame = pd.read_csv(mixed)
    assert list(dict.fromkeys(frame["precision"])) == [
        "fp32", "fp32@fsdp2:bf16/fp32", "bf16@fsdp2:bf16/fp32"]
    cast = frame[frame["precision"] == "fp32@fsdp2:bf16/fp32"]
    # The policy takes effect: bf16 gathered parameters do not reproduce the FP32 run.
    assert (cast["eval_loss"].to_numpy() != one["eval_loss"].to_numpy()).all()
    assert frame["verdict"].notna().all()
    curves = pd.read_csv(tmp_path / "mixed" / "parity_curves.csv")
    assert set(curves["precision"]) == set(frame["precision"])


@pytest.mark.slow
def test_a_failing_rank_is_a_row_and_the_stage_goes_on(tmp_path, monkeypatch):
    """Seed 0 of bf16 under FSDP2 raises on its ranks: its row says so, the child ends (its
    peers could wait in a collective forever), seed 1 is a row with the child's error, and
    the other runs finish; run again into the directory, only the failed ones train."""
    sharing = Sharing(parse("fsdp2"), 2)
    monkeypatch.setenv("AMPBENCH_PARITY_FAULT", "gpt2-tiny:bf16@fsdp2:0=raise")
    path = parity.run_parity(tmp_path, **SHORT, precisions=["fp32", "bf16"], sharing=sharing)
    frame = pd.read_csv(path).set_index(["precision", "seed"])
    assert "injected fault" in frame.loc[("bf16@fsdp2", 0), "error"]
    assert frame.loc[("bf16@fsdp2", 0), "error"].startswith("rank ")
    assert isinstance(frame.loc[("bf16@fsdp2", 1), "error"], str)
    assert frame.loc[("bf16@fsdp2", 0), "verdict"] == "INCONCLUSIVE"
    assert frame.loc[("fp32@fsdp2", 1), "error"] != frame.loc[("fp32@fsdp2", 1), "error"]  # NaN

    monkeypatch.delenv("AMPBENCH_PARITY_FAULT")
    trained = []
    real = stage._train_pair
    monkeypatch.setattr(stage, "_train_pair", lambda runs, *a, **k: (
        trained.extend((r.precision, r.seed) for r in runs), real(runs, *a, **k))[1])
    frame = pd.read_csv(parity.run_parity(tmp_path, **SHORT, precisions=["fp32", "bf16"],
                                          sharing=sharing))
    assert trained == [("bf16@fsdp2", 0), ("bf16@fsdp2", 1)]
    assert frame["error"].isna().all() and set(frame["verdict"]) == {"PASS"}


def test_a_matrix_asks_for_parity_under_a_strategy_in_canonical_spelling(tmp_path):
    from bench import config

    path = tmp_path / "m.toml"
    text = ('world_size = [2]\nstrategies = ["fsdp2"]\nparity_strategy = "{}"\n'
            '[models.gpt2-tiny]\nbatch_sizes = [2]\n')
    path.write_text(text.format("fsdp2:fp32/fp32"))
    assert config.load(path).parity_strategy == "fsdp2"
    path.write_text(text.format("zero3"))
    with pytest.raises(BadInput, match="parity_strategy: unknown strategy 'zero3'"):
        config.load(path)
    assert config.preset("gpu-fsdp2").parity_strategy == "fsdp2:bf16/fp32"


@pytest.mark.slow
def test_a_run_judges_its_policies_under_the_matrix_parity_strategy(tmp_path, capsys):
    """`ampbench run` with a matrix whose parity_strategy is torchtitan's: parity on the
    widest cell's 2 ranks, and the report's summary gives the policy's verdict under it."""
    from bench import report
    from bench.__main__ import main

    matrix = tmp_path / "m.toml"
    matrix.write_text('precisions = ["fp32", "bf16"]\nworld_size = [2]\n'
                      'strategies = ["fsdp2:bf16/fp32"]\ndevice = "cpu"\nwarmup = 2\n'
                      'steps = 4\ncalibration = 0\nparity_steps = 6\nparity_seeds = 2\n'
                      'parity_strategy = "fsdp2:bf16/fp32"\n'
                      '[models.gpt2-tiny]\nbatch_sizes = [2]\n')
    out = tmp_path / "run"
    assert main(["run", "--matrix", str(matrix), "--out", str(out)]) == 0
    frame = pd.read_csv(out / "parity.csv")
    assert list(dict.fromkeys(frame["precision"])) == [
        "fp32", "fp32@fsdp2:bf16/fp32", "bf16@fsdp2:bf16/fp32"]
    assert list(frame["ranks"]) == [1, 1, 2, 2, 2, 2]
    text = report.render(report.load(out))
    row = next(line for line in text.splitlines() if line.startswith("| gpt2-tiny | bf16 "))
    assert "PASS under fsdp2:bf16/fp32 (eval loss" in row

"""The command line against hostile input: bad output paths, one reader (fuzzed flags and
matrix files are in test_cli_fuzz.py)."""

from __future__ import annotations

import os

import pytest

from bench import store
from bench.cli import main

OUTPUTS = [  # (command line with {out}, wants a directory)
    (["run", "--preset", "quick", "--out", "{out}"], True),
    (["cell", "--model", "gpt2-tiny", "--precision", "fp32", "--batch-size", "1", "--out",
      "{out}"], False),
    (["parity", "--out", "{out}"], True),
    (["report", "{run}", "--out", "{out}"], True),
    (["publish", "{run}", "--results", "{out}"], True),
    (["baseline", "{run}", "--out", "{out}"], False),
    (["peers", "--models", "gpt2-tiny", "--out", "{out}"], False),
    (["peers", "--models", "gpt2-tiny", "--out-dir", "{out}"], True),
    (["validate", "--out", "{out}", "--time-budget", "9m"], True),
]
BAD = {  # what is wrong -> the path, made under tmp_path
    "the wrong kind": lambda tmp, want_dir: _file(tmp / "taken") if want_dir else tmp,
    "under a file": lambda tmp, want_dir: _file(tmp / "taken") / "below",
    "a long name": lambda tmp, want_dir: tmp / ("n" * 256),
    "a long path": lambda tmp, want_dir: tmp.joinpath(*["p" * 250] * 17),
}


def _file(path):
    path.write_text("x")
    return path


@pytest.mark.parametrize("what", list(BAD))
@pytest.mark.parametrize(("argv", "want_dir"), OUTPUTS, ids=[a[0] for a, _ in OUTPUTS])
def test_every_bad_output_path_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, argv,
                                                                      want_dir, what):
    run = tmp_path / "run"
    run.mkdir()
    out = BAD[what](tmp_path, want_dir)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as stopped:
        main([a.format(out=out, run=run) for a in argv])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert os.listdir(run) == []


@pytest.mark.parametrize("out", ["/proc/ampbench-out", "/sys/ampbench-out"])
def test_an_unwritable_output_is_refused_by_trying_it(tmp_path, capsys, monkeypatch, out):
    # os.access says yes to root, under /proc too: the path is tried, not asked.
    monkeypatch.setattr(os, "access", lambda path, mode: True)
    for argv, _ in OUTPUTS:
        with pytest.raises(SystemExit) as stopped:
            main([a.format(out=out, run=tmp_path) for a in argv])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert "not writable" in err or "cannot create it" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_report_and_gate_refuse_the_same_malformed_results(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    store.append(run, store.empty_record(
        cell_id="c", repeat=0, model="gpt2-tiny", precision="fp32", batch_size=1,
        status="ok", samples_per_s=1.0, device_name="Test CPU"))
    store.write_csv(run)
    text = (run / store.RESULTS).read_text().replace(",1.0,", ",fast,", 1)
    (run / store.RESULTS).write_text(text)
    why = f"{run / store.RESULTS}: line 2: column samples_per_s holds 'fast', not a number"
    assert main(["report", str(run)]) == 2
    assert why in capsys.readouterr().err
    assert main(["gate", "--baseline", str(run), "--current", str(run)]) == 2
    assert why in capsys.readouterr().err

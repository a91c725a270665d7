"""The command line against hostile input: bad output paths, one reader, fuzzed flags.

The fuzz tests run a few hundred examples; a longer pass:
``AMPBENCH_FUZZ_EXAMPLES=20000 python -m pytest tests/test_cli.py -k fuzzed``.
"""

from __future__ import annotations

import os
import string

import pytest
import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import BadInput, config, matrix, store
from bench.__main__ import build_parser, main

EXAMPLES = int(os.environ.get("AMPBENCH_FUZZ_EXAMPLES", "300"))

OUTPUTS = [  # (command line with {out}, wants a directory)
    (["run", "--preset", "quick", "--out", "{out}"], True),
    (["cell", "--model", "gpt2-tiny", "--precision", "fp32", "--batch-size", "1", "--out",
      "{out}"], False),
    (["parity", "--out", "{out}"], True),
    (["report", "{run}", "--out", "{out}"], True),
    (["publish", "{run}", "--results", "{out}"], True),
    (["baseline", "{run}", "--out", "{out}"], False),
    (["peers", "--models", "gpt2-tiny", "--out", "{out}"], False),
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


def test_an_unwritable_output_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    for argv, _ in OUTPUTS:
        with pytest.raises(SystemExit):
            main([a.format(out=tmp_path / "x", run=tmp_path) for a in argv])
        assert "not writable" in capsys.readouterr().err


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


RUN_FLAGS = ["--models", "--precisions", "--batch-sizes", "--steps", "--warmup", "--repeats",
             "--world-size", "--nnodes", "--timeout", "--device", "--preset"]
VALUES = st.one_of(
    st.sampled_from(["", ",", "0", "-1", "1", "2", "1e9", "inf", "nan", "1.5", "gpt2-tiny",
                     "fp32", "bf16,fp32", "1,,2", " 3 ", "quick", "cpu", "cuda:9", "\u00e9",
                     "9" * 30, "0x10", "1_000"]),
    st.text(string.printable, max_size=12),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(RUN_FLAGS), VALUES), max_size=5))
def test_fuzzed_run_flags_are_a_matrix_or_one_line_of_bad_input(flags):
    argv = ["run", *[x for pair in flags for x in pair]]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 2
        return
    try:
        base = config.preset(args.preset) if args.preset and args.preset != "auto" \
            else config.quick()
        mx = config.override(
            base, models_=args.models, precisions=args.precisions,
            batch_sizes=args.batch_sizes, steps=args.steps, warmup=args.warmup,
            repeats=args.repeats, timeout_s=args.timeout, world_size=args.world_size,
            nnodes=args.nnodes)
        matrix.index(matrix.expand(mx))
    except BadInput as exc:  # one line, unless it quotes a value that has a line break
        assert "\n" not in str(exc) or any("\n" in value for _, value in flags)


TOML_VALUES = st.recursive(
    st.one_of(st.booleans(), st.integers(-2, 2**70), st.floats(), st.text(max_size=8),
              st.sampled_from(["fp32", "bf16", "gpt2-tiny", "cpu"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["batch_sizes", "seq_len", "image_size", "x"]), inner, max_size=3),
    max_leaves=8)
KEYS = st.sampled_from(["name", "precisions", "grad_accum", "compile", "world_size", "nnodes",
                        "repeats", "warmup", "steps", "device", "timeout_s", "parity",
                        "calibration", "bogus"])
MODELS = st.dictionaries(st.sampled_from(["gpt2-tiny", "resnet-tiny", "bert-tiny", "nope"]),
                         TOML_VALUES, max_size=2)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.dictionaries(KEYS, TOML_VALUES, max_size=4), st.one_of(st.none(), MODELS))
def test_fuzzed_matrix_tables_are_a_matrix_or_one_line_of_bad_input(data, models):
    if models is not None:
        data = {**data, "models": models}
    try:
        mx = config.from_dict(data, "m.toml")
    except BadInput as exc:
        assert "\n" not in str(exc) and str(exc).startswith("m.toml: ")
        return
    assert config.from_dict(mx.to_dict(), "meta.json") == mx  # what a resume reads back


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_fuzzed_matrix_files_are_a_matrix_or_one_line_of_bad_input(tmp_path, data):
    path = tmp_path / "m.toml"
    path.write_bytes(b'[models.gpt2-tiny]\nbatch_sizes = [1]\n' + data)
    try:
        config.load(path)
    except BadInput as exc:
        assert "\n" not in str(exc).strip() or "TOML" in str(exc)
    except tomllib.TOMLDecodeError:  # pragma: no cover - load must wrap it
        pytest.fail("TOMLDecodeError escaped")

"""The command line against fuzzed input: run flags, matrix tables and matrix files are a
matrix or one line of bad input. They need hypothesis (the test extra); without it they skip.

They run a few hundred examples; a longer pass:
``AMPBENCH_FUZZ_EXAMPLES=20000 python -m pytest tests/test_cli_fuzz.py``.
"""

from __future__ import annotations

import os
import string
import sys

import pytest

pytest.importorskip("hypothesis", reason="hypothesis is not installed (the test extra: "
                    "pip install -e .[test])")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import BadInput, config
from bench.cli import build_parser
from bench.config import matrix

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

EXAMPLES = int(os.environ.get("AMPBENCH_FUZZ_EXAMPLES", "300"))

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

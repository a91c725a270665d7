"""The command line: every command and flag explains itself in --help."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from bench.cli import build_parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_command_has_a_description_and_every_flag_a_help(command):
    parser = _commands()[command]
    assert parser.description, command
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:
            assert action.help, (command, action.option_strings or action.dest)
    parser.format_help()  # a stray % in a help text fails here


@pytest.mark.parametrize("command", ["run", "cell", "parity"])
def test_device_help_names_every_device_form(command):
    (device,) = (a for a in _commands()[command]._actions if "--device" in a.option_strings)
    for form in ("cpu", "cuda", "cuda:N", "auto"):
        assert form in device.help, (command, form)


def test_a_bad_value_with_a_line_break_is_still_one_line(tmp_path, capsys):
    assert main(["run", "--models", "gpt\n2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'gpt\\n2'" in err, err


def test_another_models_package_on_the_path_is_one_line_not_a_confusing_crash(tmp_path, cli_env):
    # `models` is a generic name (PyPI has a distribution of it): one that shadows ours is
    # named, exit 2, before any command runs.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    env = {**cli_env, "PYTHONPATH": os.pathsep.join([str(tmp_path), cli_env["PYTHONPATH"]])}
    done = subprocess.run([sys.executable, "-m", "bench", "models"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "another package named 'models' shadows it" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

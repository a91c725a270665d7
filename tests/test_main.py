"""The command line: every command and flag explains itself in --help."""

from __future__ import annotations

import argparse
import os
import re
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


# A command line each command accepts, so that a flag added to it is the only thing wrong.
ACCEPTED = {
    "run": [], "cell": ["--model", "gpt2-tiny", "--precision", "fp32", "--batch-size", "1"],
    "parity": [], "report": [], "publish": ["some-run"], "gate": [], "baseline": ["some-run"],
    "env": [], "models": [], "peers": [], "validate": ["--out", "{tmp}", "--time-budget", "9m"],
}


def _shown(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text of ``action`` as --help prints it, before line wrapping."""
    return parser._get_formatter()._expand_help(action)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_flag_shows_its_default_and_every_value_it_accepts(command):
    parser = _commands()[command]
    for action in _options(parser):
        text, flag = _shown(parser, action), action.option_strings[-1]
        for value in action.choices or ():
            assert str(value) in text, (command, flag, value)
        default = action.default
        if default is not None and not isinstance(default, bool):
            shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
            assert shown in text, (command, flag, text)
        elif action.nargs != 0 and not action.required:
            # No value of its own: the help says what happens without the flag.
            assert "default" in text, (command, flag, text)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_command_help_ends_with_an_example_of_itself(command):
    text = _commands()[command].format_help()
    example = text.split("example:\n", 1)[1]
    assert f"ampbench {command}" in example or f"-m bench {command}" in example, text


def test_run_help_gives_every_preset_and_what_each_sets_by_default():
    from bench.config import PRESETS

    run = _commands()["run"]
    helps = {a.dest: _shown(run, a) for a in _options(run)}
    assert "gpu-quick" in helps["preset"] and "auto, the default" in helps["preset"]
    for name, make in PRESETS.items():
        assert name in helps["preset"]
        if name == "auto":  # gpu or cpu, by whether CUDA is there
            continue
        matrix = make()
        for dest, value in (("steps", matrix.steps), ("warmup", matrix.warmup),
                            ("repeats", matrix.repeats), ("timeout", f"{matrix.timeout_s:g} s"),
                            ("calibration", matrix.calibration)):
            # "quick 3", not the "quick 3" of "gpu-quick 30"
            said = re.search(rf"(?<![\w-]){re.escape(f'{name} {value}')}(?![\w.])", helps[dest])
            assert said, (name, dest, helps[dest])


@pytest.mark.parametrize("command", sorted(_commands()))
def test_an_unknown_flag_is_an_error_of_the_command_that_got_it(command, tmp_path, capsys):
    assert set(ACCEPTED) == set(_commands())  # a new command needs its line above
    argv = [command, *(a.format(tmp=tmp_path / "out") for a in ACCEPTED[command])]
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--no-such-flag"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"ampbench {command}: error: unrecognized arguments: --no-such-flag "
                   "(see --help)\n")


def test_an_unknown_value_is_named_with_every_valid_one(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--preset", "huge"])
    err = capsys.readouterr().err
    assert err.startswith("ampbench run: error: argument --preset: unknown preset 'huge'; "
                          "valid: gpu, gpu-quick, gpu-fsdp2, cpu, cpu-shakespeare, cpu-fsdp2, "
                          "quick, auto")

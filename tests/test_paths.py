"""Output paths checked before any work (bench/paths.py), and one process per run directory
(bench/run/lock.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from bench import BadInput, paths
from bench.run import lock


def test_an_output_directory_may_be_new_or_existing(tmp_path):
    assert paths.output_dir(tmp_path) == tmp_path
    assert paths.output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not created


@pytest.mark.parametrize(("make", "message"), [
    (lambda t: (t / "f").write_text("x") and t / "f", "a file, not a directory"),
    (lambda t: (t / "f").write_text("x") and t / "f" / "run", "is a file, not a directory"),
    (lambda t: t / ("x" * 300), "a name of 300 bytes is too long"),
    (lambda t: t.joinpath(*["d" * 200] * 25), "path too long"),
    (lambda t: "", "empty path"),
    (lambda t: f"{t}/a\0b", "NUL"),
])
def test_a_bad_output_directory_is_one_line(tmp_path, make, message):
    with pytest.raises(BadInput, match=message):
        paths.output_dir(make(tmp_path))


def test_a_dangling_link_is_not_an_output(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(BadInput, match="dangling symbolic link"):
        paths.output_dir(tmp_path / "link")
    with pytest.raises(BadInput, match="dangling symbolic link"):
        paths.output_file(tmp_path / "link")


def test_an_unwritable_directory_is_refused_by_trying_it(tmp_path, monkeypatch):
    # /proc takes no new file, not even from root (to whom os.access says yes): tried, not asked.
    monkeypatch.setattr(os, "access", lambda path, mode: True)
    for check, given, said in (
            (paths.output_dir, "/proc", "directory not writable"),
            (paths.output_dir, "/proc/ampbench/run", "cannot create it under /proc"),
            (paths.output_file, "/proc/r.json", "directory /proc not writable")):
        with pytest.raises(BadInput, match="^" + re.escape(f"--out {given}: {said} (")):
            check(given)
    with pytest.raises(BadInput, match=re.escape("/proc/a/r.csv: directory /proc/a not writ")):
        paths.output_file("/proc/a/r.csv", make_parents=True)
    # A good path is tried too, and the try leaves nothing behind.
    assert paths.output_file(tmp_path / "a" / "b" / "r.csv", make_parents=True)
    assert paths.output_dir(tmp_path / "c" / "d") == tmp_path / "c" / "d"
    assert os.listdir(tmp_path) == []


def test_an_output_file_needs_an_existing_directory_unless_it_may_make_one(tmp_path):
    assert paths.output_file(tmp_path / "r.json") == tmp_path / "r.json"
    with pytest.raises(BadInput, match="a directory, not a file"):
        paths.output_file(tmp_path)
    with pytest.raises(BadInput, match="names a directory"):
        paths.output_file(f"{tmp_path}/new/")
    with pytest.raises(BadInput, match="does not exist"):
        paths.output_file(tmp_path / "missing" / "r.json")
    assert paths.output_file(tmp_path / "missing" / "r.csv", make_parents=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="is a file, not a directory"):
        paths.output_file(tmp_path / "file" / "r.json")
    with pytest.raises(BadInput, match="is a file, not a directory"):
        paths.output_file(tmp_path / "file" / "a" / "r.csv", make_parents=True)
    assert os.listdir(tmp_path) == ["file"]


HOLD = "import sys, time\nfrom bench.run.lock import lock\nwith lock(sys.argv[1], 'holder'):\n" \
       "    print('held', flush=True)\n    time.sleep(60)\n"


def test_a_run_directory_has_one_holder_and_a_dead_ones_lock_is_taken_over(tmp_path, cli_env):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=cli_env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        in_use = f"in use by another ampbench process \\(pid {holder.pid}, holder\\)"
        with pytest.raises(BadInput, match=in_use), lock.lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock; its file (and pid) is still there.
    assert f"pid {holder.pid}" in (tmp_path / lock.LOCK).read_text()
    deadline = time.monotonic() + 5
    with lock.lock(tmp_path, "second"):
        assert time.monotonic() < deadline
        assert (tmp_path / lock.LOCK).read_text() == f"pid {os.getpid()}, second\n"
        with lock.lock(tmp_path):  # re-entrant in one process: parity inside a run
            pass
        assert (tmp_path / lock.LOCK).read_text() == f"pid {os.getpid()}, second\n"

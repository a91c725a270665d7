import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from bench import BadInput, store
from bench.cli import main
from bench.run import launch, slots

# One timed step, no warmup, the tiniest model, two groups (fp32, bf16) of two batches.
FAST = ["--preset", "quick", "--models", "gpt2-tiny", "--steps", "1", "--warmup", "0",
        "--no-parity", "--no-report", "--precisions", "fp32,bf16", "--batch-sizes", "1,2",
        "--calibration", "0"]
TWO = ["--device-slots", "cpu0,cpu1"]


def _gated(started, release):
    """A pool function that says when it started and ends when released (or cancelled)."""
    def fn(task, on, cancel):
        started[task].set()
        while not release[task].wait(0.01):
            if cancel.is_set():
                return "cancelled"
        return f"{task} on {slots.label(on)}"
    return fn


def test_the_pool_runs_one_process_per_free_slot_and_records_who_overlapped():
    names = ("a", "b", "c", "wide")
    started = {n: threading.Event() for n in names}
    release = {n: threading.Event() for n in names}
    fn = _gated(started, release)
    with slots.Pool((slots.Slot("cpu0"), slots.Slot("cpu1"))) as pool:
        assert [s.name for s in pool.start("a", 1, fn)] == ["cpu0"]
        assert [s.name for s in pool.start("b", 1, fn)] == ["cpu1"]
        assert not pool.fits(1) and pool.running == ["a", "b"]
        started["a"].wait(5), started["b"].wait(5)
        release["a"].set()
        [done] = pool.wait()
        assert (done.task, done.result, done.neighbours) == ("a", "a on cpu0", ["b"])
        assert not pool.fits(2)  # a two-rank process waits for both
        assert [s.name for s in pool.start("c", 1, fn)] == ["cpu0"]
        started["c"].wait(5)
        release["b"].set()
        [done] = pool.wait()
        assert done.task == "b" and done.neighbours == ["a", "c"]
        release["c"].set()
        [done] = pool.wait()
        assert done.task == "c" and done.neighbours == ["b"]
        assert pool.fits(2)
        assert [s.name for s in pool.start("wide", 2, fn)] == ["cpu0", "cpu1"]
        release["wide"].set()
        [done] = pool.wait()
        assert done.result == "wide on cpu0,cpu1" and done.neighbours == []
        assert done.started_unix_s <= done.ended_unix_s


def test_a_stopped_pool_cancels_its_running_processes_before_it_returns():
    started = {"a": threading.Event()}
    fn = _gated(started, {"a": threading.Event()})
    results = []

    def run(task, on, cancel):
        results.append(fn(task, on, cancel))

    with pytest.raises(KeyboardInterrupt), slots.Pool(slots.ONE) as pool:
        pool.start("a", 1, run)
        started["a"].wait(5)
        raise KeyboardInterrupt
    assert results == ["cancelled"]


def test_a_cancelled_child_dies_with_its_tree(tmp_path):
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    began = time.monotonic()
    with pytest.raises(launch.Cancelled):
        launch.run_child_process([sys.executable, "-c", "import time; time.sleep(60)"], 60.0,
                                 tmp_path / "err", cancel=cancel)
    assert time.monotonic() - began < 10


def test_cells_running_beside_a_cell_are_the_runners_own_cpu_time_not_others():
    from bench.run import contention

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        before = contention._live_children_s()
        deadline = time.monotonic() + 20
        while contention._live_children_s() <= before + 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        # The running child's CPU seconds count as the runner's own, before it is reaped.
        assert contention._live_children_s() > before + 0.2
    finally:
        busy.kill()
        busy.wait()


def test_devices_resolve_to_slots_with_their_gpus():
    assert slots.check_devices(" all ") == "all" and slots.check_devices("3, 01") == "3,1"
    for bad, said in (("0,x", "'x' is not a GPU index"), ("0,,1", "an empty name"),
                      ("1,1", "1 named twice")):
        with pytest.raises(BadInput, match=said):
            slots.check_devices(bad)
    four = slots.resolve("all", None, "cuda", True, 4, None)
    assert [(s.name, s.visible) for s in four] == [(str(i), str(i)) for i in range(4)]
    # Under the runner's own CUDA_VISIBLE_DEVICES an index counts its entries.
    [one] = slots.resolve("1", None, "cuda", True, 2, "GPU-aaa,GPU-bbb")
    assert (one.name, one.visible) == ("1", "GPU-bbb")
    assert slots.child_env((one,)) == {"CUDA_VISIBLE_DEVICES": "GPU-bbb",
                                       "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert slots.gpus(four) == {0, 1, 2, 3} and slots.gpus((one,)) is None
    assert slots.resolve("", None, "cpu", False, 1, None) == slots.ONE
    assert slots.child_env(slots.ONE) == {} and slots.label(slots.ONE) is None
    with pytest.raises(BadInput, match="GPU 4 is not there; this machine shows 4"):
        slots.resolve("0,4", None, "cuda", True, 4, None)
    with pytest.raises(BadInput, match="this machine has no CUDA GPU"):
        slots.resolve("all", None, "cpu", False, 1, None)
    with pytest.raises(BadInput, match="the run's device is cuda:1"):
        slots.resolve("0", None, "cuda:1", True, 2, None)
    cpu = slots.resolve("", "cpu0,cpu1", "cpu", False, 1, None)
    assert [s.name for s in cpu] == ["cpu0", "cpu1"] and slots.child_env(cpu) == {}


def test_a_matrix_file_names_its_devices_and_a_bad_one_is_one_line(tmp_path, capsys):
    from bench import config

    path = tmp_path / "m.toml"
    path.write_text('devices = "0, 2"\n[models.gpt2-tiny]\nbatch_sizes = [1]\n')
    mx = config.load(path)
    assert mx.devices == "0,2" and config.from_dict(mx.to_dict()).devices == "0,2"
    path.write_text('devices = "gpu0"\n[models.gpt2-tiny]\nbatch_sizes = [1]\n')
    assert main(["run", "--matrix", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: devices 'gpu0': 'gpu0' is not a GPU index" in err and err.count("\n") == 1


def test_devices_on_a_cpu_machine_are_one_line_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *FAST, "--devices", "0,1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--devices 0,1: runs one cell per GPU, and this machine has no CUDA GPU" in err
    assert err.count("\n") == 1 and not out.exists()
    assert main(["run", *FAST, "--devices", "0,gpu1", "--out", str(out)]) == 2
    assert "'gpu1' is not a GPU index" in capsys.readouterr().err
    assert main(["run", *FAST, *TWO, "--world-size", "3", "--out", str(out)]) == 2
    assert "has 3 ranks, one GPU each, and --devices gives 2" in capsys.readouterr().err


class _FakeNvml:
    """Two GPUs: GPU 0 idle, GPU 1 held by another user's process (and this one's)."""

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        import os
        from types import SimpleNamespace

        procs = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=None)]
        return procs + ([SimpleNamespace(pid=4242, usedGpuMemory=2**30)] if handle == 1 else [])

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return []

    def nvmlSystemGetProcessName(self, pid):
        return b"someone-else"

    def nvmlShutdown(self):
        pass


def test_each_gpu_is_judged_on_its_own_and_a_held_one_makes_a_cell_contended(
        monkeypatch, tmp_path):
    from bench import report
    from bench.run import contention
    from bench.telemetry import machine

    monkeypatch.setattr(machine, "open_nvml", lambda: _FakeNvml())
    assert machine.gpu_users({0}) == 0 and machine.gpu_users({0, 1}) == 1
    held = {"index": 1, "processes": [{"pid": 4242, "name": "someone-else"}]}
    state = machine.MachineState({"gpus": [{"index": 0}, held]}, None)
    assert any("GPU 1: 1 other process" in w for w in machine.noise_warnings(state))
    assert not any("GPU 1" in w for w in machine.noise_warnings(state, {0}))

    assert contention.contended_rows(pd.DataFrame({"num_others_on_gpu": [0, 1]}))
    assert not contention.contended_rows(pd.DataFrame({"num_others_on_gpu": [0, None],
                                                       "others_cpu_pct": [1.0, 2.0]}))
    rows = [store.empty_record(run_id="r", cell_id=f"c{p}", model="gpt2-tiny", precision=p,
                               batch_size=1, seq_len=64, repeat=0, status="ok",
                               samples_per_s=10.0, device="cuda", device_name="GPU",
                               device_slot=str(i), neighbours=[], num_others_on_gpu=i)
            for i, p in enumerate(["fp32", "bf16"])]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    store.write_csv(run_dir, rows)
    cells = report.load(run_dir).cells.set_index("precision")
    assert cells.loc["bf16", "contended"] and not cells.loc["fp32", "contended"]


def _key(record):
    return f"{record['cell_id']}:{record['repeat']}"


def _overlapping(record, others):
    return {_key(o) for o in others if o is not record
            and o["started_unix_s"] < record["ended_unix_s"]
            and o["ended_unix_s"] > record["started_unix_s"]}


@pytest.mark.slow
def test_two_slots_run_cells_side_by_side_and_a_stopped_sweep_resumes(
        tmp_path, cli_env, processes_mentioning):
    # fp32 b=1 fails, fp32 b=2 hangs until Ctrl-C; bf16's two cells finish beside them.
    out = tmp_path / "run"
    env = {**cli_env, "TMPDIR": str(tmp_path),
           "AMPBENCH_FAULT": "gpt2-tiny:fp32:1=raise,gpt2-tiny:fp32:2=hang"}
    runner = subprocess.Popen([sys.executable, "-m", "bench", "run", *FAST, *TWO, "--out",
                               str(out)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and runner.poll() is None:
        if (out / store.RECORDS).exists() and len(
                (out / store.RECORDS).read_text().splitlines()) == 3:
            break
        time.sleep(0.1)
    assert runner.poll() is None, "the sweep ended before it could be stopped"
    runner.send_signal(signal.SIGINT)
    _, err = runner.communicate(timeout=60)
    assert runner.returncode == 130, err
    assert f"resume with: python -m bench run --resume {out}" in err
    assert not processes_mentioning(str(tmp_path)), "the hanging child outlived Ctrl-C"

    first = {(r["precision"], r["batch_size"]): r for r in store.load_records(out)}
    assert {k: r["status"] for k, r in first.items()} == {
        ("fp32", 1): "error", ("bf16", 1): "ok", ("bf16", 2): "ok"}
    assert "injected fault" in first[("fp32", 1)]["error"]
    assert {r["device_slot"] for r in first.values()} <= {"cpu0", "cpu1"}
    # Two ran at once from the start: fp32 b=1 and bf16 b=1, on different slots.
    assert first[("fp32", 1)]["device_slot"] != first[("bf16", 1)]["device_slot"]
    assert _key(first[("fp32", 1)]) in first[("bf16", 1)]["neighbours"]
    # Neighbours are the processes whose times overlapped: every recorded one, and besides
    # them only the hanging one that Ctrl-C killed (it left no record).
    records = list(first.values())
    hung = next(c.cell_id for c in _cells(out) if (c.precision, c.batch_size) == ("fp32", 2))
    for record in records:
        overlapping = _overlapping(record, records)
        assert overlapping <= set(record["neighbours"])
        assert set(record["neighbours"]) - overlapping <= {f"{hung}:0"}

    # The resume runs only what is missing or failed, two slots again.
    assert main(["run", "--resume", str(out), *TWO]) == 0
    lines = (out / store.RECORDS).read_text().splitlines()
    assert len(lines) == 5
    final = {(r["precision"], r["batch_size"]): r for r in store.load_records(out)}
    assert all(r["status"] == "ok" for r in final.values()) and len(final) == 4
    assert all(final[k]["timestamp"] == first[k]["timestamp"] for k in
               [("bf16", 1), ("bf16", 2)])
    again = [final[("fp32", 1)], final[("fp32", 2)]]
    for record in again:  # batches of one group run one after the other
        assert set(record["neighbours"]) == _overlapping(record, again) == set()
    assert again[0]["ended_unix_s"] <= again[1]["started_unix_s"]


def _cells(out):
    import json

    from bench import config
    from bench.config import matrix

    meta = json.loads((out / store.META).read_text())
    return matrix.expand(config.from_dict(meta["matrix"]))

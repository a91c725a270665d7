"""The parent side and analysis run without torch: these modules must not import it, even
indirectly, and `ampbench run` works in a process where ``import torch`` fails."""

import json

from bench import store

TORCH_FREE = ["bench.store", "bench.cli", "bench.precision", "bench.paths", "bench.failures",
              "bench.parity.convergence", "models"]
# Every module of these packages: the runner (the parent side), config, analysis, validate,
# the report, and telemetry (torch only lazily, in the child's device reads).
TORCH_FREE_PACKAGES = ["bench.run", "bench.config", "bench.analysis", "bench.validate",
                       "bench.report", "bench.telemetry"]

# `import torch` raises ImportError in this process (None in sys.modules blocks an import).
_NO_TORCH = "import sys\nsys.modules['torch'] = None\nfrom bench.cli import main\n"


def test_analysis_modules_do_not_import_torch(run_python):
    code = (
        "import importlib, pkgutil, sys\n"
        f"names = {TORCH_FREE!r}\n"
        f"for package in {TORCH_FREE_PACKAGES!r}:\n"
        "    path = importlib.import_module(package).__path__\n"
        "    names += [f'{package}.{m.name}' for m in pkgutil.iter_modules(path)]\n"
        "assert len(names) > 30, names\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "    assert 'torch' not in sys.modules, name + ' imported torch'\n"
    )
    run_python(code, timeout=120)


def test_model_and_policy_names_need_no_torch(run_python):
    code = (
        "import sys, models\n"
        "from bench import precision\n"
        "models.get('gpt2-small'); precision.get('bf16')\n"
        "assert models.get('gpt2-small').check_size(2048)\n"
        "assert 'torch' not in sys.modules\n"
    )
    run_python(code)


def test_ampbench_run_imports_no_torch_and_its_budget_prices_cells_with_the_probe(
        tmp_path, run_python):
    # The children train (processes of their own); the runner asks the device probe for the
    # device, the fingerprint and the FLOPs its --time-budget estimates scale by: bf16, never
    # run, is estimated from fp32's process, not given the timeout (120 s).
    out = tmp_path / "run"
    argv = ["run", "--preset", "quick", "--models", "gpt2-tiny", "--steps", "1", "--warmup",
            "0", "--no-parity", "--time-budget", "20m", "--out", str(out)]
    code = _NO_TORCH + (
        "from bench.run import sweep\n"
        "estimates, estimate_s = [], sweep.estimate_s\n"
        "def seen(*args):\n"
        "    estimates.append(estimate_s(*args))\n"
        "    return estimates[-1]\n"
        "sweep.estimate_s = seen\n"
        f"code = main({argv!r})\n"
        "assert code == 0, code\n"
        "assert estimates[0] == 120.0 and estimates[1] < 120.0, estimates\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    run_python(code, timeout=600)
    records = store.load_records(out)
    assert [(r["precision"], r["status"]) for r in records] == [("fp32", "ok"), ("bf16", "ok")]
    meta = json.loads((out / store.META).read_text())
    assert meta["device"] == "cpu" and meta["torch_version"] and meta["cpu_model"]
    assert records[0]["machine_id"] == meta["machine_id"]
    assert (out / "report.md").exists()


def test_the_auto_preset_and_a_bad_device_need_no_torch_in_the_runner(tmp_path, run_python,
                                                                        capsys):
    out = tmp_path / "run"
    import torch

    expected = "gpu" if torch.cuda.is_available() else "cpu"
    argv = ["run", "--models", "gpt2-tiny", "--precisions", "fp32", "--batch-sizes", "2",
            "--steps", "1", "--warmup", "0", "--calibration", "0", "--device", "cpu",
            "--no-parity", "--no-report", "--out", str(out)]
    run_python(_NO_TORCH + f"sys.exit(main({argv!r}))\n", timeout=300)
    assert json.loads((out / store.META).read_text())["matrix"]["name"] == expected
    assert [r["status"] for r in store.load_records(out)] == ["ok"]

    bad = tmp_path / "bad"
    code = _NO_TORCH + (
        "import contextlib, io\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        f"    code = main(['run', '--preset', 'quick', '--device', 'tpu', '--out', {str(bad)!r}])\n"
        "assert code == 2, code\n"
        "assert err.getvalue() == \"ampbench run: error: unknown device 'tpu'; valid: cpu, "
        "cuda, cuda:N, auto\\n\", err.getvalue()\n"
    )
    run_python(code, timeout=120)
    assert not bad.exists()

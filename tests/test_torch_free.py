"""Analysis runs without torch: these modules must not import it, even indirectly."""

TORCH_FREE = [
    "bench.store", "bench.config", "bench.config.matrix", "bench.report", "bench.analysis.gate",
    "bench.telemetry.power", "bench.precision", "bench.paths", "bench.run.proctree",
    "bench.analysis.noise", "bench.run.contention", "bench.analysis.gate_rates",
    "bench.failures", "bench.telemetry.amd",
    "models",
]


def test_analysis_modules_do_not_import_torch(run_python):
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
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

"""Analysis runs without torch: these modules must not import it, even indirectly."""

import subprocess
import sys

TORCH_FREE = [
    "bench.store", "bench.config", "bench.matrix", "bench.report", "bench.gate", "bench.power",
    "bench.precision", "bench.paths", "bench.procs", "bench.noise", "bench.load", "bench.rates",
    "bench.failures",
    "models",
]


def test_analysis_modules_do_not_import_torch(cli_env):
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'torch' not in sys.modules, name + ' imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_model_and_policy_names_need_no_torch(cli_env):
    code = (
        "import sys, models\n"
        "from bench import precision\n"
        "models.get('gpt2-small'); precision.get('bf16')\n"
        "assert models.get('gpt2-small').check_size(2048)\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

import subprocess
import sys

from bench import config
from bench.config import Cell, matrix


def test_expand_is_the_product_of_the_axes_with_batches_ascending():
    m = config.override(config.quick(), batch_sizes=[8, 2, 4], precisions=["fp32", "fp16"])
    m = config.override(m, world_size=[1, 2])
    cells = matrix.expand(m)
    assert len(cells) == 2 * 2 * 2 * 3
    assert len({c.cell_id for c in cells}) == len(cells)
    first = [c for c in cells if c.group == cells[0].group]
    assert [c.batch_size for c in first] == [2, 4, 8]
    gpt = [c for c in cells if c.model == "gpt2-tiny"]
    assert all(c.seq_len == 64 and c.image_size is None for c in gpt)
    resnet = [c for c in cells if c.model == "resnet-tiny"]
    assert all(c.image_size == 32 and c.seq_len is None for c in resnet)


def test_cell_ids_depend_on_every_key_field_only():
    cell = Cell("gpt2-tiny", "bf16", 4, seq_len=64)
    assert cell.cell_id == Cell("gpt2-tiny", "bf16", 4, seq_len=64).cell_id
    variants = [Cell("gpt2-tiny", "fp16", 4, seq_len=64), Cell("gpt2-tiny", "bf16", 8, seq_len=64),
                Cell("gpt2-tiny", "bf16", 4, seq_len=32), Cell("gpt2-tiny", "bf16", 4, seq_len=64,
                                                               grad_accum=2),
                Cell("gpt2-tiny", "bf16", 4, seq_len=64, compile=True),
                Cell("gpt2-tiny", "bf16", 4, seq_len=64, world_size=2),
                Cell("gpt2-tiny", "bf16", 4, seq_len=64, nnodes=2)]
    assert len({cell.cell_id, *(v.cell_id for v in variants)}) == 1 + len(variants)


def test_cell_ids_are_stable_across_python_processes(cli_env):
    ids = [c.cell_id for c in matrix.expand(config.gpu())]
    code = ("from bench import config\nfrom bench.config import matrix\n"
            "print(','.join(c.cell_id for c in matrix.expand(config.gpu())))")
    env = {**cli_env, "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.strip().split(",") == ids
    # Pinned: changing how ids are computed would orphan every existing run directory.
    assert Cell("gpt2-tiny", "fp32", 2, seq_len=64).cell_id == "7432c67d2be0"

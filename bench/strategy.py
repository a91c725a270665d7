"""How a cell of several processes shares its model: DDP replicas or FSDP2 shards.

A strategy is one value of the matrix's ``strategies`` axis and of ``--strategy``:

    ddp                 DistributedDataParallel: every rank holds the whole model (the default)
    fsdp2               torch's fully_shard on every block and the root, no casts: parameters
                        and gradient reduction in the parameters' own dtype (fp32)
    fsdp2:PARAM/REDUCE  the same under a MixedPrecisionPolicy: PARAM, the dtype parameters are
                        gathered in for forward and backward (bf16 | fp32), REDUCE, the dtype
                        gradients are reduce-scattered in (fp32 | bf16); fsdp2:bf16/fp32 is
                        torchtitan's default, fsdp2:fp32/fp32 is spelled fsdp2

A strategy only applies to a cell of several processes; a single process trains its model
alone. ``check`` says which precision policies a strategy cannot train under (an
``unsupported`` record, bench/cell/main.py). torch-free: bench/cell/fsdp.py applies it.

The pure-bf16 policies (weights stored in bf16, no fp32 masters) train under every strategy:
under fsdp2 each rank's bf16 AdamW updates its own shard. fp32 parameters mean "gathered in
the parameters' own dtype", bf16 for them, so fsdp2 and fsdp2:bf16/... gather the same bf16
weights; an fp32 reduction upcasts their bf16 gradients for the reduce-scatter and stores the
reduced shard back in bf16, a bf16 one reduces them as they are. The record's strategy fields
name the strategy as asked; what the weights are stored in is its ``param_dtypes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT = "ddp"
KINDS = ("ddp", "fsdp2")
PARAM_DTYPES = ("bf16", "fp32")
REDUCE_DTYPES = ("fp32", "bf16")
EXAMPLES = ("ddp", "fsdp2", "fsdp2:bf16/fp32", "fsdp2:bf16/bf16")


@dataclass(frozen=True)
class Strategy:
    """One strategy: its kind and, for fsdp2, the MixedPrecisionPolicy's dtypes."""

    kind: str = DEFAULT
    param_dtype: str | None = None  # fsdp2 only: bf16 | fp32
    reduce_dtype: str | None = None  # fsdp2 only: fp32 | bf16

    @property
    def name(self) -> str:
        """The canonical spelling (what cell ids and records hold)."""
        if self.kind != "fsdp2" or (self.param_dtype, self.reduce_dtype) == ("fp32", "fp32"):
            return self.kind
        return f"fsdp2:{self.param_dtype}/{self.reduce_dtype}"

    def record_fields(self, world_size: int) -> dict[str, str | None]:
        """The record's strategy fields; all None for a single process (nothing shared)."""
        if world_size <= 1:
            return {"strategy": None, "fsdp_param_dtype": None, "fsdp_reduce_dtype": None}
        return {"strategy": self.name, "fsdp_param_dtype": self.param_dtype,
                "fsdp_reduce_dtype": self.reduce_dtype}


def parse(text: str) -> Strategy:
    """``text`` as a Strategy; ValueError naming what is valid for anything else."""
    valid = f"valid: ddp, fsdp2 or fsdp2:PARAM/REDUCE with PARAM in " \
            f"{'|'.join(PARAM_DTYPES)} and REDUCE in {'|'.join(REDUCE_DTYPES)} (e.g. " \
            "fsdp2:bf16/fp32)"
    kind, colon, dtypes = text.strip().partition(":")
    if kind == "ddp" and not colon:
        return Strategy()
    if kind != "fsdp2":
        raise ValueError(f"unknown strategy '{text}'; {valid}")
    if not colon:
        return Strategy("fsdp2", "fp32", "fp32")
    param, slash, reduce = dtypes.partition("/")
    if not slash or param not in PARAM_DTYPES or reduce not in REDUCE_DTYPES:
        raise ValueError(f"unknown strategy '{text}'; {valid}")
    return Strategy("fsdp2", param, reduce)


def of_record(record: Any) -> str:
    """The canonical strategy a record (or results.csv row) says its cell ran: ddp when it
    says none (a single process, or a record from before the strategy fields)."""
    name = record.get("strategy")
    if not isinstance(name, str) or not name.strip():
        return DEFAULT
    try:
        return canonical(name)
    except ValueError:
        return name.strip()


def canonical(text: str) -> str:
    """``text``'s canonical spelling (fsdp2:fp32/fp32 is fsdp2); ValueError if unknown."""
    return parse(text).name


def check(strategy: Strategy, policy: str) -> str | None:
    """Why ``policy`` cannot train under ``strategy`` (an unsupported cell), or None.

    fp16 autocast over bf16-gathered parameters would compute in fp16 from weights already
    rounded to bf16: neither policy's numbers, so it is refused rather than mislabelled. fp16
    with fp32 parameters trains (a ShardedGradScaler agrees on inf/NaN across the shards).
    The bf16-pure policies (weights stored in bf16) train under every strategy: under fsdp2
    their AdamW (bench/cell/bf16_adamw.py) updates each rank's shard of the DTensor
    parameters, so no strategy refuses a policy for the dtype its weights are stored in.
    """
    if strategy.kind != "fsdp2":
        return None
    if strategy.param_dtype == "bf16" and policy.startswith("fp16"):
        return (f"{policy} under {strategy.name}: fp16 autocast over parameters gathered in "
                "bf16 computes in fp16 from bf16-rounded weights; use fsdp2 (fp32 parameters) "
                "with fp16, or bf16 with fsdp2:bf16/...")
    return None

"""Convergence in MLPerf's manner, from parity.csv's rows: per (model, policy), the steps and
the training seconds to reach FP32's target quality over N seeds with the fastest and the
slowest dropped, and a one-sided test of whether the policy converges slower than FP32.

The target is time to accuracy's (bench/parity/verdict.py ``target_loss``: FP32's mean final
training loss plus the parity tolerance, never below its worst seed's); ``steps_to_target``
and ``time_to_target_s`` are the per-seed numbers parity already writes. Here:

- Olympic mean (MLPerf's score: drop the fastest and the slowest run, average the rest): from
  ``DROP_FROM`` (3) seeds on, the fastest and the slowest seed are dropped and the others
  averaged (3 or 4 seeds: the mean of the middle one or two, the median); with 1 or 2 seeds
  nothing is dropped and the output says so. MLPerf asks for at least ``MLPERF_MIN_RUNS`` (5)
  runs; fewer are marked in the output. Ties are broken by seed number. Steps and seconds each
  drop their own fastest and slowest.
- A seed that never reaches the target has not converged (MLPerf: a failed run): it counts as
  slower than every seed that did, so with 3 or more seeds one such seed is the slowest and
  dropped; when one survives the drop, the mean is ``not reached``. A run that crashed (its
  ``error`` column set) is no measurement of convergence: it is left out of N and named.
- The test: is the policy slower to converge than FP32, in steps? An exact one-sided
  permutation test of the Wilcoxon rank-sum (Mann-Whitney U) statistic on steps to the target
  over every seed (none dropped), not-reached seeds tied with each other above every reached
  one, ties taking their mid-rank. Under the null hypothesis (the two policies' seeds come
  from one distribution) every split of the pooled seeds into the policy's and FP32's is
  equally likely; p is the share of the C(n + m, n) splits whose policy rank sum is at least
  the observed one, counted exactly (a subset-sum count, so no enumeration limit). With 3
  seeds each the smallest possible p is 1/20 = 0.05; with 2 each, 1/6: then the output says
  the test cannot reach ``ALPHA``. The seeds are paired (same initial weights and data
  order), which this two-sample test does not use: it is the conservative choice.

Energy to the target is not derived: parity's children run no power sampler, so parity.csv has
no joules (the benchmark's energy per sample is in its own records). torch-free.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DROP_FROM = 3  # seeds from which the fastest and the slowest are dropped
MLPERF_MIN_RUNS = 5  # MLPerf's fewest runs for a result (its image classification)
ALPHA = 0.05  # one-sided significance level of "slower than fp32"
REFERENCE = "fp32"
NOT_REACHED = "not reached"
NOTE = (f"MLPerf's rule: over N seeds, the fastest and the slowest are dropped (from {DROP_FROM} "
        "seeds on; with 3 or 4 that is the median; below 3 nothing is dropped) and the rest "
        "averaged; steps and seconds each drop their own. A seed that never reaches the target "
        "has not converged and counts as slower than any that did, so one such seed is dropped "
        "as the slowest and a second leaves the mean not reached; crashed runs are left out of "
        f"N. MLPerf asks for at least {MLPERF_MIN_RUNS} runs. The test is exact for any N and "
        "uses every seed (none dropped), ties at their mid-rank; with 3 seeds a side its "
        "smallest possible p is 0.05, with 2 it is 1/6, so too few seeds cannot show "
        "\"slower\". \"Not shown slower\" is no proof of equal speed.")
ENERGY_NOTE = ("Joules to the target: not measured (parity runs sample no power; the "
               "benchmark's energy per sample is in its own tables).")


@dataclass(frozen=True)
class Olympic:
    """MLPerf's mean of one measure over seeds: the fastest and slowest dropped."""

    value: float  # mean of the kept seeds; inf when a kept seed did not reach; nan without seeds
    kept: tuple[int, ...]  # seeds averaged, fastest first (ties: lower seed first)
    dropped: tuple[int, ...]  # (fastest, slowest), or () below DROP_FROM seeds
    not_reached: tuple[int, ...]  # seeds that never reached the target
    low: float  # fastest seed's value (inf if none reached)
    high: float  # slowest seed's value (inf if any did not reach)

    @property
    def n(self) -> int:
        return len(self.kept) + len(self.dropped)


@dataclass(frozen=True)
class RankTest:
    """The one-sided exact rank-sum test of "policy slower than fp32" (larger U: slower)."""

    u: float  # Mann-Whitney U of the policy: pairs (policy, fp32) where the policy is slower
    p: float  # exact one-sided p-value
    n: int  # the policy's seeds
    m: int  # fp32's seeds
    p_min: float  # the smallest p these n and m allow: 1 / C(n + m, n)

    @property
    def slower(self) -> bool:
        return self.p <= ALPHA


def _value(raw: Any) -> float:
    """A step count or time as a float: inf when it is missing (the seed did not reach)."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return math.inf
    return value if math.isfinite(value) else math.inf


def olympic(values: Mapping[int, Any]) -> Olympic:
    """The olympic mean of ``values`` (seed -> steps or seconds to the target, None or NaN for
    a seed that did not reach it): from DROP_FROM seeds on, the fastest and slowest dropped."""
    order = sorted(values, key=lambda seed: (_value(values[seed]), seed))
    found = [_value(values[s]) for s in order]
    if len(order) >= DROP_FROM:
        kept, dropped = order[1:-1], (order[0], order[-1])
    else:
        kept, dropped = order, ()
    averaged = [_value(values[s]) for s in kept]
    mean = sum(averaged) / len(averaged) if averaged else math.nan
    return Olympic(mean, tuple(kept), tuple(dropped),
                   tuple(s for s in order if math.isinf(_value(values[s]))),
                   found[0] if found else math.nan, found[-1] if found else math.nan)


def _doubled_midranks(pooled: Sequence[float]) -> list[int]:
    """Twice each value's mid-rank among ``pooled`` (1-based; ties share their mean rank), as
    integers: a tie group at positions i..j has mid-rank (i + j) / 2."""
    order = sorted(range(len(pooled)), key=lambda i: pooled[i])
    ranks = [0] * len(pooled)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and pooled[order[end + 1]] == pooled[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + 1) + (end + 1)
        start = end + 1
    return ranks


def slower_test(policy: Iterable[Any], fp32: Iterable[Any]) -> RankTest | None:
    """The exact one-sided rank-sum test that ``policy``'s steps to the target (one per seed;
    None or NaN: not reached) are larger than ``fp32``'s; None when either side has no seed."""
    xs, ys = [_value(v) for v in policy], [_value(v) for v in fp32]
    n, m = len(xs), len(ys)
    if not n or not m:
        return None
    ranks = _doubled_midranks(xs + ys)
    observed = sum(ranks[:n])
    # counts[k][s]: subsets of k of the pooled seeds seen so far whose doubled ranks sum to s.
    counts: list[Counter[int]] = [Counter() for _ in range(n + 1)]
    counts[0][0] = 1
    for seen, rank in enumerate(ranks, start=1):
        for k in range(min(n, seen), 0, -1):
            for total, ways in counts[k - 1].items():
                counts[k][total + rank] += ways
    splits = math.comb(n + m, n)
    tail = sum(ways for total, ways in counts[n].items() if total >= observed)
    u = observed / 2 - n * (n + 1) / 2
    return RankTest(u, tail / splits, n, m, 1 / splits)


@dataclass(frozen=True)
class Convergence:
    """One (model, policy): its seeds' convergence and the test against fp32."""

    model: str
    policy: str
    steps: Olympic
    seconds: Olympic | None  # None when parity.csv has no time to the target
    crashed: tuple[int, ...]  # seeds left out: their run crashed
    test: RankTest | None  # None for fp32 itself, or without seeds on either side


def _seeds(rows: Any, column: str) -> dict[int, Any]:
    if column not in rows:
        return {}
    return {int(seed): value for seed, value in zip(rows["seed"], rows[column], strict=True)}


def _crashed(rows: Any) -> Any:
    if "error" not in rows:
        return rows["seed"] != rows["seed"]  # all False
    return rows["error"].map(lambda e: isinstance(e, str) and bool(e.strip()))


def judge(frame: Any, model: str, policies: Sequence[str] | None = None) -> list[Convergence]:
    """Per policy of ``model`` in parity.csv's ``frame`` (one row per model, precision and
    seed): its convergence and, but for fp32, the test against fp32; [] when the frame has no
    steps to the target or no fp32 rows for ``model``."""
    rows = frame[frame["model"].astype(str) == model]
    if "steps_to_target" not in rows or rows.empty:
        return []
    rows = rows[~_crashed(rows)].assign(precision=rows["precision"].astype(str))
    crashed = frame[(frame["model"].astype(str) == model) & _crashed(frame)]
    fp32 = rows[rows["precision"] == REFERENCE]
    if fp32.empty or fp32["steps_to_target"].isna().all():
        return []  # no reference: nothing to converge to
    order = list(policies) if policies is not None else list(
        dict.fromkeys(frame.loc[frame["model"].astype(str) == model, "precision"].astype(str)))
    has_time = "time_to_target_s" in rows and rows["time_to_target_s"].notna().any()
    out = []
    for policy in order:
        group = rows[rows["precision"] == policy]
        lost = tuple(int(s) for s in crashed.loc[crashed["precision"].astype(str) == policy,
                                                 "seed"])
        if group.empty and not lost:
            continue
        test = None if policy == REFERENCE else slower_test(group["steps_to_target"],
                                                            fp32["steps_to_target"])
        out.append(Convergence(model, policy, olympic(_seeds(group, "steps_to_target")),
                               olympic(_seeds(group, "time_to_target_s")) if has_time
                               else None, lost, test))
    return out


# ------------------------------------------------------------------------------ words


def _num(value: float, unit: str = "", whole: bool = False) -> str:
    """A step count (``whole``: '120', '112.5') or seconds ('1.32'), or why there is none."""
    if math.isnan(value):
        return "no runs"
    if math.isinf(value):
        return NOT_REACHED
    if whole or value >= 100:
        return (f"{value:.0f}" if value == round(value) else f"{value:.1f}") + unit
    return f"{value:#.3g}" + unit


def how(result: Olympic) -> str:
    """How the mean was taken: which seeds were kept and dropped, and N."""
    n = result.n
    if not n:
        return "no seeds"
    fewer = f"; MLPerf asks for at least {MLPERF_MIN_RUNS}" if n < MLPERF_MIN_RUNS else ""
    if not result.dropped:
        return (f"mean of {n} seed{'s' * (n > 1)}, none dropped (fewer than {DROP_FROM})"
                f"{fewer}")
    fast, slow = result.dropped
    kept = ", ".join(map(str, sorted(result.kept)))
    return (f"mean of seed{'s' * (len(result.kept) > 1)} {kept} after dropping the fastest "
            f"(seed {fast}) and slowest (seed {slow}) of N={n}{fewer}")


def _range(result: Olympic, whole: bool = False) -> str:
    if not result.n:
        return ""
    if result.low == result.high:
        return f"all {_num(result.low, whole=whole)}"
    return f"{_num(result.low, whole=whole)} to {_num(result.high, whole=whole)}"


def test_text(test: RankTest | None) -> str:
    """The test's statistic, p-value and conclusion at ALPHA, one phrase."""
    if test is None:
        return "no test (no seeds on one side)"
    stats = f"U={test.u:g}, p={test.p:.3g}"
    if test.p_min > ALPHA:
        return (f"{stats}: cannot tell at alpha {ALPHA:g} with N={test.n} vs {test.m} "
                f"(smallest possible p {test.p_min:.3g})")
    verdict = "slower than fp32" if test.slower else "not shown slower than fp32"
    return f"{stats}: {verdict} at alpha {ALPHA:g} (N={test.n} vs {test.m})"


TEST_NAME = "one-sided exact rank-sum (Mann-Whitney U) permutation test on steps to the target"


def verdict_line(result: Convergence, fp32: Convergence | None) -> str:
    """One policy's verdict: its MLPerf mean and how it was taken, fp32's, the test."""
    text = f"{result.model} {result.policy}: {_num(result.steps.value, ' steps', True)} " \
           f"[{how(result.steps)}]"
    missed = result.steps.not_reached
    if missed:
        text += f" (did not reach the target: seed{'s' * (len(missed) > 1)} " \
                f"{', '.join(map(str, missed))})"
    if result.crashed:
        text += f" (crashed, left out: seed {', '.join(map(str, result.crashed))})"
    if result.policy == REFERENCE or fp32 is None:
        return text + " (the reference)" if result.policy == REFERENCE else text
    return (f"{text} vs fp32 {_num(fp32.steps.value, ' steps', True)}; {TEST_NAME}, "
            f"{test_text(result.test)}")


def verdict_lines(results: Sequence[Convergence]) -> list[str]:
    fp32 = next((r for r in results if r.policy == REFERENCE), None)
    return [verdict_line(r, fp32) for r in results]


def _answer(result: Convergence) -> str:
    """The table's word on the test: yes, not shown, or cannot tell (too few seeds)."""
    test = result.test
    if result.policy == REFERENCE:
        return "reference"
    if test is None:
        return ""
    if test.p_min > ALPHA:
        return f"cannot tell with N={test.n} vs {test.m} (p={test.p:.3g})"
    return f"{'yes' if test.slower else 'not shown'} (U={test.u:g}, p={test.p:.3g})"


def table(results: Sequence[Convergence]) -> str:
    """A github table, one column per policy: N, the MLPerf mean of steps and seconds with
    their seeds' range, seeds dropped and not reached, and the test against fp32."""
    from tabulate import tabulate

    def seeds(items: Sequence[int]) -> str:
        return ", ".join(map(str, items)) if items else "none"

    def dropped(r: Convergence) -> str:
        if not r.steps.dropped:
            return f"none (N < {DROP_FROM})"
        return f"{r.steps.dropped[0]} (fastest), {r.steps.dropped[1]} (slowest)"

    body = [
        ["seeds N (crashed runs left out)",
         *(f"{r.steps.n}" + (f" (crashed: {seeds(r.crashed)})" if r.crashed else "")
           for r in results)],
        ["steps to the target, MLPerf mean", *(_num(r.steps.value, whole=True) for r in results)],
        ["seeds dropped from it (by steps)", *(dropped(r) for r in results)],
        ["steps, range over every seed", *(_range(r.steps, whole=True) for r in results)],
        ["seeds that did not reach the target", *(seeds(r.steps.not_reached) for r in results)],
    ]
    if any(r.seconds is not None for r in results):
        body[4:4] = [["time to the target, s, MLPerf mean (own drops)",
                      *(_num(r.seconds.value) if r.seconds else "" for r in results)],
                     ["time, range over every seed, s",
                      *(_range(r.seconds) if r.seconds else "" for r in results)]]
    body.append([f"slower to converge than fp32? (exact one-sided rank-sum test on steps, "
                 f"alpha {ALPHA:g})", *(_answer(r) for r in results)])
    return tabulate(body, headers=["", *(r.policy for r in results)], tablefmt="github",
                    disable_numparse=True, colalign=["left"] + ["right"] * len(results))


def summary(frame: Any) -> str:
    """The convergence verdicts of every model in parity.csv's ``frame`` under a title, for the
    console; '' when no model has steps to the target."""
    if "model" not in frame or "steps_to_target" not in frame:
        return ""
    lines = []
    for model in dict.fromkeys(frame["model"].astype(str)):
        lines += verdict_lines(judge(frame, model))
    if not lines:
        return ""
    return "\n".join([f"Convergence, MLPerf-style (steps to FP32's target; fastest and slowest "
                      f"seed dropped from {DROP_FROM} seeds on; {TEST_NAME}, alpha {ALPHA:g}):",
                      *lines, ENERGY_NOTE])

"""Timers: one function per method, each returning a ``Timing`` (median, min, max in ms).

- CPU: ``time_cpu`` — ``time.perf_counter`` around each call, warm-up, then repeats until a
  time budget is spent (and at least ``min_reps`` calls).
- CUDA, kernels: ``time_do_bench`` — ``triton.testing.do_bench``, which zeroes a 256 MB buffer
  before every call (cold L2) and times each call with its own event pair;
  ``time_cuda_graph`` — ``triton.testing.do_bench_cudagraph``: many calls captured in one CUDA
  graph and replayed (no launch gaps, no L2 flush).
- CUDA, whole training/inference steps: ``time_cuda_events`` — events around each call after a
  synchronisation (steps are far larger than L2 and are not graph-capturable as written).

``Rotation`` cycles through several input sets so that back-to-back calls do not find their
inputs already in cache.

Not ``torch.utils.benchmark.Timer``: its ``blocked_autorange`` reports means of blocks of calls,
and the tables here need the median, min and max of single calls, interleaved across variants.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Sequence


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: Optional[int]   # timed calls (None when the method does not say)
    method: str           # how it was measured, e.g. "perf_counter", "do_bench (cold L2)"

    def as_dict(self) -> dict:
        return asdict(self)


def _from_samples(samples_s: Sequence[float], method: str) -> Timing:
    ms = [s * 1e3 for s in samples_s]
    return Timing(statistics.median(ms), min(ms), max(ms), len(ms), method)


class Rotation:
    """``next()`` returns the input sets in turn (the sets are tuples of arguments)."""

    def __init__(self, sets: Sequence):
        if not sets:
            raise ValueError("Rotation needs at least one input set")
        self.sets = list(sets)
        self.i = 0

    def next(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s

    def __len__(self) -> int:
        return len(self.sets)


def time_cpu(fn: Callable[[], object], budget_s: float, min_reps: int = 3,
             max_reps: int = 2000, warmup_fraction: float = 0.1,
             max_total_s: float = float("inf")) -> Timing:
    """Median of repeated ``fn()`` calls timed with perf_counter.

    The caller has already made one (untimed) call; further warm-up calls run while they cost
    less than ``warmup_fraction`` of the budget, so slow steps are not warmed up twice. Repeats
    run until ``budget_s`` is spent and ``min_reps`` are done, but stop at 3 repeats for calls
    slower than the budget and after ``max_total_s`` whatever the count (a loaded machine must
    not stretch the suite without bound; the repeat count is reported).
    """
    spent = 0.0
    while spent < warmup_fraction * budget_s:
        t0 = time.perf_counter()
        fn()
        spent += time.perf_counter() - t0
    samples = []
    total = 0.0
    while (total < budget_s or len(samples) < min_reps) and len(samples) < max_reps:
        if len(samples) >= 3 and total >= 3 * budget_s:
            break  # calls slower than the budget: 3 repeats, not min_reps
        if samples and total >= max_total_s:
            break
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        samples.append(dt)
        total += dt
    return _from_samples(samples, "perf_counter")


def time_interleaved(fns: Dict[str, Callable[[], object]], budget_s: float, min_rounds: int = 3,
                     max_rounds: int = 1000, max_total_s: float = float("inf"),
                     warmup_rounds: int = 1) -> Dict[str, Timing]:
    """Medians of calls made in rounds: each round calls every function once, the order rotated
    by one each round, so that slow drifts of the machine (other load, clock, heap state) touch
    every variant alike. Rounds go on until ``budget_s`` of timed calls and ``min_rounds`` are
    done, at most ``max_rounds``, and stop after ``max_total_s`` once 3 rounds are done."""
    keys = list(fns)
    samples: Dict[str, list] = {k: [] for k in keys}
    for _ in range(warmup_rounds):
        for k in keys:
            fns[k]()
    total, rounds = 0.0, 0
    while keys and rounds < max_rounds:
        if rounds >= min_rounds and total >= budget_s:
            break
        if rounds >= 3 and total >= max_total_s:
            break
        shift = rounds % len(keys)
        for k in keys[shift:] + keys[:shift]:
            t0 = time.perf_counter()
            fns[k]()
            dt = time.perf_counter() - t0
            samples[k].append(dt)
            total += dt
        rounds += 1
    return {k: _from_samples(v, f"perf_counter, interleaved rounds ({rounds})")
            for k, v in samples.items() if v}


def _quantiles(result) -> tuple:
    """(min, median, max) from triton's do_bench* answer for quantiles=[0, 0.5, 1]."""
    if isinstance(result, (list, tuple)):
        lo, med, hi = (float(v) for v in result)
        return lo, med, hi
    v = float(result)
    return v, v, v


def time_do_bench(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """``triton.testing.do_bench``: cold L2 (flushed before every call), per-call CUDA events."""
    from triton.testing import do_bench

    lo, med, hi = _quantiles(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.0, 0.5, 1.0]))
    reps = max(1, int(rep_ms / med)) if med > 0 else None  # do_bench's own repeat count
    return Timing(med, lo, hi, reps, "do_bench (cold L2, per call)")


def time_cuda_graph(fn: Callable[[], object], rep_ms: float = 20) -> Timing:
    """``triton.testing.do_bench_cudagraph``: calls captured in a CUDA graph, replayed 10 times
    (median over the replays of time per call); warm L2, no launch overhead."""
    from triton.testing import do_bench_cudagraph

    try:
        res = do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.0, 0.5, 1.0])
    except TypeError:  # an older triton without quantiles
        res = do_bench_cudagraph(fn, rep=rep_ms)
    lo, med, hi = _quantiles(res)
    return Timing(med, lo, hi, 10, "do_bench_cudagraph (graph replay, warm L2)")


def time_cuda_events(fn: Callable[[], object], budget_s: float, min_reps: int = 5,
                     warmup: int = 2, max_reps: int = 200) -> Timing:
    """CUDA events around each call, synchronised; for steps too large or too stateful to graph."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    total = 0.0
    while (total < budget_s or len(samples) < min_reps) and len(samples) < max_reps:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        dt = start.elapsed_time(end) / 1e3
        samples.append(dt)
        total += dt
    return _from_samples(samples, "cuda events (per call, synchronised)")


def format_time(ms: Optional[float]) -> str:
    """A duration in the unit that keeps 3 significant digits readable."""
    if ms is None:
        return "-"
    if ms < 1:
        return f"{ms * 1e3:.1f} us"
    if ms < 1000:
        return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"
    return f"{ms / 1e3:.2f} s"

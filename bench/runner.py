"""The suite's machinery: configuration, cases and variants, the runner, the progress line.

A *case* is one measurement setting (level, pass, shape, dtype) and holds *variants* (eager
baseline, torch.compile, fused backends...). Benchmark modules build cases without touching a
tensor; the runner builds each variant's callable only when it runs it, so that a missing kernel,
a compile error or an OOM becomes a "failed: <reason>" row and the suite goes on.
"""
from __future__ import annotations

import gc
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from . import roofline
from .timing import (Timing, format_time, time_cpu, time_cuda_events, time_cuda_graph,
                     time_do_bench)

LEVELS = ("strip", "msca", "dwconv_gelu", "mlp", "nmf", "block", "model", "patch", "memory")
# Levels that run only when named in --levels: each case runs in subprocesses, exports and
# compiles whole models (minutes).
OPT_IN_LEVELS = ("deploy",)
SIZES = ("smoke", "quick", "full")


@dataclass
class Config:
    device: torch.device
    dtype: torch.dtype                 # storage dtype of the conv levels (NMF computes in fp32)
    size: str = "full"                 # "full", "quick" or "smoke" (tiny, for tests)
    compile: bool = False              # run the torch.compile variants
    compile_budget_s: float = 120.0    # total compile time after which compile variants are skipped
    levels: tuple = LEVELS
    filter: Optional[re.Pattern] = None
    interpret: bool = False            # TRITON_INTERPRET=1 in the environment
    op_shapes: str = "default"         # "segnext": every op shape of SegNeXt-T/S/B at 512x512

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype_name(self) -> str:
        return roofline.DTYPE_NAMES.get(self.dtype, str(self.dtype))

    # Timing budgets per variant -------------------------------------------------------------
    def cpu_budget(self, heavy: bool = False) -> tuple:
        """(seconds, min_reps, max_total_s) for time_cpu; ``heavy`` for whole-model steps."""
        if self.size == "smoke":
            return 0.0, 2, 1.0
        if self.size == "quick":
            return (0.5, 2, 3.0) if heavy else (0.25, 3, 2.0)
        return (2.0, 3, 20.0) if heavy else (1.0, 5, 10.0)

    def cuda_rep_ms(self) -> tuple:
        """(warm-up ms, repeat ms) for do_bench and the repeat ms of the graph timer."""
        return {"smoke": (2, 5, 2), "quick": (10, 40, 10), "full": (25, 100, 20)}[self.size]


@dataclass
class Variant:
    name: str                          # "eager", "compile", "fused:<backend>", "conv2d", ...
    layout: str                        # "nchw", "cl" (channels_last) or "-"
    backend: str                       # segnext_kernels backend that runs it ("reference"...)
    make: Optional[Callable[[], Callable[[], object]]] = None  # builds the timed callable
    baseline: bool = False             # the eager baseline of its layout
    compiles: bool = False             # a torch.compile variant (compile budget applies)
    graph: bool = True                 # also time CUDA-graph replay on CUDA
    skip: Optional[str] = None         # reason it is not run (shown in the table)

    @property
    def fused(self) -> bool:
        return self.name.startswith("fused")


@dataclass
class Case:
    level: str
    pass_: str                         # "fwd", "fwd+bwd", "infer", "train", "saved", "peak"...
    shape: str                         # human-readable shape
    params: dict                       # the shape as numbers, for the JSON
    dtype: str
    variants: List[Variant]
    cost: Optional[roofline.Cost] = None
    metric: str = "time"               # "time" or "bytes"
    timer: str = "kernel"              # "kernel" (do_bench on CUDA) or "step" (CUDA events)
    unit_bytes: Optional[int] = None   # bytes of the op's input (memory level: "x u" column)
    # A case that builds and times its variants itself (e.g. interleaved, in a subprocess):
    # measure(cfg, variants) returns one Measured per variant, in order.
    measure: Optional[Callable[[Config, List["Variant"]], List["Measured"]]] = None


@dataclass
class Measured:
    """What a case's own ``measure`` found for one variant."""
    status: str                        # "ok", "failed", "skipped"
    reason: str = ""
    timing: Optional[Timing] = None
    first_call_s: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)


@dataclass
class Result:
    level: str
    pass_: str
    shape: str
    params: dict
    dtype: str
    variant: str
    layout: str
    backend: str
    metric: str
    status: str                        # "ok", "failed", "skipped"
    reason: str = ""
    timing: Optional[Timing] = None
    graph_timing: Optional[Timing] = None
    graph_error: str = ""
    first_call_s: Optional[float] = None
    bytes: Optional[int] = None
    unit_bytes: Optional[int] = None
    vs_eager: Optional[float] = None   # eager (same layout) / this: > 1 is faster or smaller
    vs_best_baseline: Optional[float] = None
    graph_vs_eager: Optional[float] = None
    roofline: Optional[dict] = None
    cost: Optional[dict] = None
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def median_ms(self) -> Optional[float]:
        return self.timing.median_ms if self.timing else None

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("timing", "graph_timing", "pass_")}
        d["pass"] = self.pass_
        d["timing"] = self.timing.as_dict() if self.timing else None
        d["graph_timing"] = self.graph_timing.as_dict() if self.graph_timing else None
        return d


def short_reason(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError if hasattr(torch.cuda, "OutOfMemoryError")
                  else MemoryError):
        return "out of memory"
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(exc).__name__}: {first}"[:300]


def filter_key(case: Case, variant: Variant) -> str:
    """What --filter matches: 'level/pass/variant/layout/shape', e.g.
    'model/train/fused:cuda/cl/SegNeXt-T B16 512x512'."""
    return f"{case.level}/{case.pass_}/{variant.name}/{variant.layout}/{case.shape}"


def selected(cfg: Config, case: Case, variant: Variant) -> bool:
    if cfg.filter is None:
        return True
    return bool(cfg.filter.search(filter_key(case, variant)))


def compile_filter(text: Optional[str]) -> Optional[re.Pattern]:
    """A case-insensitive regex; text that is not a valid regex is matched as a substring."""
    if not text:
        return None
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error:
        return re.compile(re.escape(text), re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Progress: tqdm when importable, else one plain-text line per variant
# --------------------------------------------------------------------------------------------
class Progress:
    def __init__(self, total: int, stream=None):
        self.total, self.n = total, 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None
        if self.tty:  # unattended logs get one plain line per variant instead
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=self.stream, unit="variant", dynamic_ncols=True,
                                leave=False)
            except Exception:  # tqdm is optional
                self.bar = None

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(label[:70])
        elif self.tty:
            self.stream.write(f"\r\033[K[{self.n + 1:>3}/{self.total}] {label}")
            self.stream.flush()

    def done(self, label: str, summary: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.tty:
            self.stream.write(f"\r\033[K[{self.n:>3}/{self.total}] {label}: {summary}")
            self.stream.flush()
        else:
            self.stream.write(f"[{self.n:>3}/{self.total}] {label}: {summary}\n")
            self.stream.flush()

    def write(self, text: str, out=None) -> None:
        """Print ``text`` (to stdout) without tearing the progress line."""
        out = out or sys.stdout
        if self.bar is not None:
            self.bar.clear()
        elif self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
        out.write(text + ("" if text.endswith("\n") else "\n"))
        out.flush()
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Runner:
    def __init__(self, cfg: Config, ceilings: roofline.Ceilings, progress: Progress):
        self.cfg, self.ceil, self.progress = cfg, ceilings, progress
        self.compile_spent = 0.0

    def run_case(self, case: Case) -> List[Result]:
        if case.measure is not None:
            return self._run_measured(case)
        results = []
        for v in case.variants:
            if not selected(self.cfg, case, v):
                continue
            label = f"{case.level} {case.pass_} {case.shape} {v.name} {v.layout}"
            self.progress.start(label)
            r = self._run_variant(case, v)
            results.append(r)
            self.progress.done(label, summarize(r))
            try:
                _release(self.cfg.device)
            except Exception:  # noqa: BLE001 - a broken CUDA context fails variants, not the run
                pass
        try:
            compare(case, results, self.ceil)
        except Exception as exc:  # noqa: BLE001 - ratios are extras: keep the timings
            for r in results:
                r.extra["compare_error"] = short_reason(exc)
        return results

    def _run_measured(self, case: Case) -> List[Result]:
        chosen = [v for v in case.variants if selected(self.cfg, case, v)]
        runnable = [v for v in chosen if not v.skip]
        label = f"{case.level} {case.pass_} {case.shape}"
        self.progress.start(f"{label} ({len(runnable)} variants)")
        outcomes: Dict[int, Measured] = {}
        if runnable:
            try:
                got = case.measure(self.cfg, runnable)
                if len(got) != len(runnable):
                    raise RuntimeError(f"measure returned {len(got)} outcomes for "
                                       f"{len(runnable)} variants")
            except Exception as exc:  # noqa: BLE001 - one case must not stop the suite
                got = [Measured("failed", short_reason(exc)) for _ in runnable]
            outcomes = {id(v): m for v, m in zip(runnable, got)}
        results = []
        for v in chosen:
            m = outcomes.get(id(v)) or Measured("skipped", v.skip or "not run")
            r = self._new_result(case, v, m.status, m.reason)
            r.timing = m.timing if m.status == "ok" else None
            r.first_call_s, r.extra = m.first_call_s, dict(m.extra)
            results.append(r)
            self.progress.done(f"{label} {v.name} {v.layout}", summarize(r))
        try:
            compare(case, results, self.ceil)
        except Exception as exc:  # noqa: BLE001
            for r in results:
                r.extra["compare_error"] = short_reason(exc)
        return results

    def _new_result(self, case: Case, v: Variant, status: str, reason: str = "") -> Result:
        return Result(level=case.level, pass_=case.pass_, shape=case.shape, params=case.params,
                      dtype=case.dtype, variant=v.name, layout=v.layout, backend=v.backend,
                      metric=case.metric, status=status, reason=reason,
                      unit_bytes=case.unit_bytes,
                      cost=case.cost.as_dict() if case.cost else None)

    def _run_variant(self, case: Case, v: Variant) -> Result:
        if v.skip:
            return self._new_result(case, v, "skipped", v.skip)
        if v.compiles and self.compile_spent >= self.cfg.compile_budget_s:
            return self._new_result(case, v, "skipped",
                                    f"compile budget spent ({self.compile_spent:.0f} s of "
                                    f"{self.cfg.compile_budget_s:.0f} s; --compile-budget)")
        r = self._new_result(case, v, "ok")
        fn = None
        try:
            if v.compiles:
                import torch._dynamo
                torch._dynamo.reset()  # each compile variant starts with empty caches
            fn = v.make()
            t0 = time.perf_counter()
            first = fn()  # compiles, autotunes, allocates: kept out of the timings
            _sync(self.cfg.device)
            r.first_call_s = time.perf_counter() - t0
            if v.compiles:
                self.compile_spent += r.first_call_s
            if case.metric == "bytes":
                r.bytes = int(first)
            else:
                del first  # do not hold an output through the timings
                r.timing = self._time(case, fn)
                if self.cfg.cuda and v.graph and case.timer == "kernel":
                    try:
                        r.graph_timing = time_cuda_graph(fn, rep_ms=self.cfg.cuda_rep_ms()[2])
                    except Exception as exc:  # noqa: BLE001 - capture may be impossible
                        r.graph_error = short_reason(exc)
                        try:
                            torch.cuda.synchronize()
                        except Exception:  # noqa: BLE001
                            pass
        except Exception as exc:  # noqa: BLE001 - one variant must not stop the suite
            r.status, r.reason = "failed", short_reason(exc)
            r.timing = None
        finally:
            del fn
        return r

    def _time(self, case: Case, fn) -> Timing:
        cfg = self.cfg
        heavy = case.timer == "step"
        if not cfg.cuda:
            budget, min_reps, max_total = cfg.cpu_budget(heavy)
            return time_cpu(fn, budget, min_reps=min_reps, max_total_s=max_total)
        if heavy:
            budget, min_reps = {"smoke": (0.0, 2), "quick": (1.0, 3), "full": (2.0, 5)}[cfg.size]
            return time_cuda_events(fn, budget, min_reps=min_reps, warmup=2)
        warm, rep, _ = cfg.cuda_rep_ms()
        return time_do_bench(fn, warmup_ms=warm, rep_ms=rep)


def summarize(r: Result) -> str:
    if r.status != "ok":
        return f"{r.status}: {r.reason}"
    if r.metric == "bytes":
        return f"{r.bytes / 2**20:.2f} MiB"
    s = f"median {format_time(r.median_ms)}"
    if r.graph_timing:
        s += f", graph {format_time(r.graph_timing.median_ms)}"
    return s


def compare(case: Case, results: List[Result], ceil: roofline.Ceilings) -> None:
    """Fill in the ratios to the eager baseline (same layout, else any layout), to the best
    non-fused variant, and the roofline numbers."""
    ok = [r for r in results if r.status == "ok"]
    baselines = {v.layout: v.name for v in case.variants if v.baseline}

    def value(r: Result) -> Optional[float]:
        return float(r.bytes) if case.metric == "bytes" else r.median_ms

    def eager_of(layout: str) -> Optional[Result]:
        name = baselines.get(layout)
        for r in ok:
            if r.variant == name and r.layout == layout:
                return r
        for r in ok:  # no baseline in this layout: the first baseline that ran
            if r.variant in baselines.values():
                return r
        return None

    base_vals = [value(r) for r in ok if not r.variant.startswith("fused")]
    best_base = min(base_vals) if base_vals else None
    for r in ok:
        e = eager_of(r.layout)
        v = value(r)
        if e is not None and v:
            r.vs_eager = value(e) / v
            if case.metric == "time" and r.graph_timing and e.graph_timing:
                r.graph_vs_eager = e.graph_timing.median_ms / r.graph_timing.median_ms
        if best_base and v:
            r.vs_best_baseline = best_base / v
        if case.metric == "time" and case.cost is not None and r.median_ms:
            r.roofline = roofline.achieved(case.cost, ceil, r.median_ms)
            if r.graph_timing:
                g = roofline.achieved(case.cost, ceil, r.graph_timing.median_ms)
                r.roofline["graph_fraction_of_floor"] = g.get("fraction_of_floor")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")

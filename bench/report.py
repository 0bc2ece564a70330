"""Reporting: the environment record, one text table per level, the JSON file and the plot."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .runner import Config, Result
from .timing import format_time

LEVEL_TITLES = {
    "strip": "single depthwise strip conv, forward",
    "msca": "MSCA, the whole op",
    "dwconv_gelu": "the MLP's depthwise 3x3 conv + GELU",
    "mlp": "the whole MSCAN MLP, inference",
    "nmf": "NMF2D decomposition (Hamburger)",
    "block": "one MSCAN block",
    "model": "SegNeXt, inference and training step",
    "memory": "bytes saved for backward; peak of a training step",
    "deploy": "SegNeXt CPU inference against deployment runtimes",
}

LEGEND = ("vs eager = eager time in the same layout / this time (>1: faster; memory: smaller); "
          "vs best = best non-fused variant / this; floor = minimal time from the measured "
          "ceilings as % of this time, bound by memory (mem) or arithmetic (compute); over "
          "100% when the data stays in cache")


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    """HEAD of the repository (read-only query); None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except Exception:  # noqa: BLE001 - git missing
        pass
    return None


def _nvidia_smi() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,"
                              "power.limit,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def environment(cfg: Config) -> dict:
    env = dict(
        device_type=cfg.device.type,
        device_name=(torch.cuda.get_device_name(cfg.device) if cfg.cuda else _cpu_model()),
        cpu_model=_cpu_model(),
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        python=sys.version.split()[0],
        platform=platform.platform(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cudnn=(torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None),
        git_commit=_git_commit(),
        triton_interpret=cfg.interpret,
        load_average=(list(os.getloadavg()) if hasattr(os, "getloadavg") else None),
    )
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = f"not importable ({type(exc).__name__})"
    if cfg.cuda:
        props = torch.cuda.get_device_properties(cfg.device)
        env.update(sm_count=props.multi_processor_count, gpu_memory_bytes=props.total_memory,
                   capability=f"{props.major}.{props.minor}", nvidia_smi=_nvidia_smi())
        l2 = getattr(props, "L2_cache_size", None)
        if l2:
            env["l2_bytes"] = l2
    try:
        from segnext_kernels.info import collect
        info = collect()
        env["segnext_kernels"] = {k: info[k] for k in ("segnext_kernels", "extension", "backends",
                                                       "op_backends", "selected_backend")}
    except Exception as exc:  # noqa: BLE001
        env["segnext_kernels"] = f"info failed: {type(exc).__name__}: {exc}"
    return env


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _floor(r: Result, key: str = "fraction_of_floor") -> str:
    rf = r.roofline or {}
    f = rf.get(key)
    if f is None:
        return "-"
    pct = f"{f * 100:.0f}%" if f >= 0.01 else "<1%"
    return f"{pct} {rf.get('bound', '')}".strip()


def _mib(n: Optional[int]) -> str:
    if n is None:
        return "-"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _row(r: Result, cuda: bool) -> tuple:
    head = [r.pass_, r.shape, r.dtype, r.variant, r.layout]
    if r.status != "ok":
        return head, f"{r.status}: {r.reason}"
    if r.metric == "bytes":
        times_u = "-" if not r.unit_bytes else f"{r.bytes / r.unit_bytes:.1f}"
        return head + [_mib(r.bytes), times_u, _ratio(r.vs_eager)], None
    t = r.timing
    spread = f"{format_time(t.min_ms)} - {format_time(t.max_ms)}"
    if t.reps is not None and t.reps < 3:
        spread += f" (n={t.reps})"  # few repeats: slow calls on a loaded machine
    cells = head + [format_time(t.median_ms), spread,
                    _ratio(r.vs_eager), _ratio(r.vs_best_baseline), _floor(r)]
    if cuda:
        g = r.graph_timing
        cells += [format_time(g.median_ms) if g else ("failed" if r.graph_error else "-"),
                  _ratio(r.graph_vs_eager)]
    return cells, None


def format_table(level: str, results: List[Result], cuda: bool, notes: List[str] = ()) -> str:
    if level == "deploy":  # its own layout: the allocator states side by side
        from .bench_deploy import format_table as deploy_table
        return deploy_table(results, notes)
    bytes_metric = any(r.metric == "bytes" for r in results)
    header = ["pass", "shape", "dtype", "variant", "layout"]
    if bytes_metric:
        header += ["bytes", "x input", "vs eager"]
    else:
        header += ["median (cold L2)" if cuda else "median", "min - max", "vs eager", "vs best",
                   "floor"]
        if cuda:
            header += ["graph replay", "graph vs eager"]
    rows, prev_key = [], None
    for r in results:
        key = (r.pass_, r.shape)
        cells, text = _row(r, cuda)
        if key == prev_key:  # repeat pass/shape/dtype only on a case's first row
            cells = ["", "", ""] + cells[3:]
        prev_key = key
        rows.append((cells, text))
    widths = [len(h) for h in header]
    for cells, text in rows:
        for i, c in enumerate(cells):
            widths[i] = max(widths[i], len(c))
    right = set(range(5, len(header)))

    def fmt(cells, strip=True):
        line = "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                         for i, c in enumerate(cells))
        return line.rstrip() if strip else line
    title = f"== {level}: {LEVEL_TITLES.get(level, level)} =="
    lines = [title, fmt(header), fmt(["-" * w for w in widths])]
    prev_case = None
    for (cells, text), r in zip(rows, results):
        if prev_case is not None and (r.pass_, r.shape) != prev_case:
            lines.append("")
        prev_case = (r.pass_, r.shape)
        lines.append(fmt(cells) if text is None else fmt(cells, strip=False) + "  " + text)
    graph_errors = sorted({r.graph_error for r in results if r.graph_error})
    for e in graph_errors:
        lines.append(f"note: CUDA-graph timing failed for some variants: {e}")
    for n in notes:
        lines.append(f"note: {n}")
    return "\n".join(lines) + "\n"


def format_ceilings(ceil) -> str:
    return "\n".join(["measured ceilings:"] + [f"  {line}" for line in ceil.describe()]) + "\n"


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def file_stem(env: dict) -> str:
    tag = re.sub(r"[^A-Za-z0-9]+", "-", env.get("device_name") or "device").strip("-")[:40]
    if env.get("device_type") == "cpu":
        tag = "cpu-" + tag
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"bench_{tag}_{stamp}"


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def write_plot(path: Path, results: List[Result], title: str) -> Optional[str]:
    """A bar chart of 'vs eager' per level; returns why it was not written, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401  (used through matplotlib.ticker)
    except Exception:  # noqa: BLE001 - matplotlib is optional
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    levels: Dict[str, List[Result]] = {}
    for r in results:
        if r.status == "ok" and r.vs_eager is not None:
            levels.setdefault(r.level, []).append(r)
    if not levels:
        return "no ratios to plot"
    try:
        fig, axes = plt.subplots(len(levels), 1, squeeze=False,
                                 figsize=(10, 1.2 + 0.28 * sum(len(v) for v in levels.values())
                                          + 0.6 * len(levels)))
        for ax, (level, rs) in zip(axes[:, 0], levels.items()):
            labels = [f"{r.pass_} {r.shape} {r.variant} {r.layout}" for r in rs]
            vals = [r.vs_eager for r in rs]
            colors = ["tab:green" if r.variant.startswith("fused") else
                      ("tab:orange" if r.variant == "compile" else "tab:gray") for r in rs]
            ax.barh(range(len(rs)), vals, color=colors)
            ax.set_yticks(range(len(rs)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.invert_yaxis()
            ax.axvline(1.0, color="black", lw=0.8)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{level}: vs eager (>1 better)", fontsize=9)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    except Exception as exc:  # noqa: BLE001
        return f"plot failed: {type(exc).__name__}: {exc}"
    return None

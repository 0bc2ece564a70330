"""Benchmark suite of segnext-kernels: ``python -m bench`` (see ``bench/__main__.py``), run from
the repository root (the package is not installed).

One module per benchmarked op or level, as Liger-Kernel lays its benchmarks out:
``bench_strip_conv`` (one depthwise strip conv), ``bench_msca`` (the whole MSCA, and its saved
bytes), ``bench_dwconv_gelu`` (the MLP's depthwise 3x3 + GELU), ``bench_mlp`` (the whole MLP),
``bench_nmf2d`` (the NMF2D decomposition), ``bench_block`` (one MSCAN block), ``bench_model``
(SegNeXt-T/B inference and training step, and its memory), ``bench_patch`` (the official-layout
SegNeXt as is and patched), ``bench_deploy`` (CPU inference against deployment runtimes).
Shared pieces: ``timing`` (timers), ``roofline`` (measured ceilings, cost models, floors),
``report`` (tables, JSON, plot), ``runner`` (cases, variants, the failure-tolerant runner) and
``common`` (shapes, the variants of an op level, timed callables).
"""
from .runner import LEVELS, Case, Config, Result, Variant

__all__ = ["LEVELS", "Case", "Config", "Result", "Variant"]

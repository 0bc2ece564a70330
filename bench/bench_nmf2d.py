"""Level "nmf": the NMF2D decomposition of the Hamburger head, forward (7 steps, as in eval) and
forward+backward (6 steps, as in training) in the ``unrolled`` and ``one_step`` gradient modes.

Variants: the eager reference (``nmf_decompose_ref``), ``torch.compile`` of it, and the fused
op on every backend of the device with an NMF kernel (``op_backends()["nmf2d"]``).
The decomposition itself is timed on X (b, D, N) float32 with given random bases, as the public
``nmf2d`` calls it: the wrapper's input check synchronises with the host (which CUDA-graph
capture forbids) and would add the same cost to every variant.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from . import roofline
from .common import cycle, fused_variants, n_rotations
from .runner import Case, Config, Variant

EPS, INV_T = 1e-6, 1.0
EVAL_STEPS, TRAIN_STEPS = 7, 6


def configs(cfg: Config) -> List[Tuple[str, int, int, int, int]]:
    """(name, b, D, R, HW side): the heads of SegNeXt-T (D256 R16) and SegNeXt-B (D512 R64) at
    512x512 input (the head works at 1/8: 64x64)."""
    if cfg.size == "smoke":
        return [("tiny", 1, 16, 4, 8)]
    if cfg.cuda:
        return [("SegNeXt-T", 16, 256, 16, 64), ("SegNeXt-B", 16, 512, 64, 64)]
    if cfg.size == "quick":
        return [("SegNeXt-T", 1, 256, 16, 64)]
    return [("SegNeXt-T", 2, 256, 16, 64), ("SegNeXt-B", 1, 512, 64, 64)]


def _steps(cfg: Config, grad) -> int:
    if cfg.size == "smoke":
        return 2
    return EVAL_STEPS if grad is None else TRAIN_STEPS


def _timed(decompose, b, D, R, N, cfg: Config, grad):
    """``decompose(X, bases, steps, grad)`` as a timed callable with rotated inputs."""
    from segnext_kernels import draw_bases

    steps = _steps(cfg, grad)
    sets = []
    for _ in range(n_rotations(b * D * N * 4 * (2 if grad else 1), cfg)):
        X = torch.rand(b, D, N, device=cfg.device) + 1e-3  # non-negative, never zero
        bases = draw_bases(b, D, R, device=cfg.device)
        if grad:
            sets.append((X.requires_grad_(True), bases, torch.randn_like(X)))
        else:
            sets.append((X, bases))
    nxt = cycle(sets)
    if grad:
        def fwd_bwd():
            X, bases, g = nxt()
            return torch.autograd.grad(decompose(X, bases, steps, grad), X, g)
        return fwd_bwd

    def fwd():
        X, bases = nxt()
        with torch.no_grad():
            return decompose(X, bases, steps, "unrolled")
    return fwd


def _ref(X, bases, steps, grad):
    from segnext_kernels import nmf_decompose_ref
    return nmf_decompose_ref(X, bases, steps, EPS, INV_T, grad)


def _make_eager(dims, cfg, grad):
    return lambda: _timed(_ref, *dims, cfg, grad)


def _make_compiled(dims, cfg, grad):
    def make():
        from segnext_kernels import nmf_decompose_ref
        compiled = torch.compile(nmf_decompose_ref, dynamic=False)
        return _timed(lambda X, B, s, g: compiled(X, B, s, EPS, INV_T, g), *dims, cfg, grad)
    return make


def _make_fused(dims, cfg, grad):
    def make_for(backend, layout):
        def make():
            from segnext_kernels.ops import nmf2d_fused

            def decompose(X, bases, steps, g):
                return nmf2d_fused(X, bases, steps, EPS, INV_T, g, backend)
            return _timed(decompose, *dims, cfg, grad)
        return make
    return make_for


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    out, notes = [], ["nmf: X float32 (the op computes in float32 whatever the storage dtype); "
                      "fwd = 7 steps without grad, fwd+bwd = 6 steps, gradient of X"]
    for name, b, D, R, side in configs(cfg):
        N = side * side
        dims = (b, D, R, N)
        for grad in (None, "unrolled", "one_step"):
            steps = _steps(cfg, grad)
            variants = [Variant("eager", "-", "reference", baseline=True,
                                make=_make_eager(dims, cfg, grad))]
            if cfg.compile:
                variants.append(Variant("compile", "-", "reference", compiles=True,
                                        make=_make_compiled(dims, cfg, grad)))
            fused, fused_notes = fused_variants("nmf2d", cfg, ("-",), _make_fused(dims, cfg, grad))
            notes += fused_notes
            out.append(Case(level="nmf", pass_="fwd" if grad is None else f"fwd+bwd {grad}",
                            shape=f"{name} b{b} D{D} R{R} {side}x{side} {steps} steps",
                            params=dict(model=name, b=b, D=D, R=R, H=side, W=side, steps=steps,
                                        grad=grad),
                            dtype="float32", variants=variants + fused,
                            cost=roofline.nmf_cost(b, D, N, R, steps, grad)))
    return out, list(dict.fromkeys(notes))

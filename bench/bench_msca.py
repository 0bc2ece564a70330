"""Level "msca": the whole multi-scale convolutional attention, forward and forward+backward;
and (level "memory") the bytes it saves for backward.

Variants: the eager reference (``msca_ref``: the official module's 7 depthwise convs, 3 adds,
1x1 conv and multiply) in NCHW and channels_last — the baselines —, ``torch.compile`` of the
reference (channels_last), and ``segnext_kernels.msca`` on every fused backend of the device
(``op_backends()["msca"]``: ``cpu`` on CPU, ``triton`` and ``cuda`` on CUDA), both layouts.
Forward runs under ``torch.no_grad``; forward+backward computes the gradients of u and of the
16 weights (what a training step needs).
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from . import roofline
from .common import (SavedBytes, cycle, fused_variants, n_rotations, primary_layout,
                     segnext_stage_shapes, to_layout)
from .runner import Case, Config, Variant


def shapes(cfg: Config) -> List[Tuple[int, int, int, int]]:
    if cfg.op_shapes == "segnext":
        return [dims[:4] for dims in segnext_stage_shapes()]
    if cfg.size == "smoke":
        return [(1, 8, 16, 16)]
    if cfg.cuda:
        # MSCAN-B stages 1 and 3 at 512x512 (docs/kernels.md#msca-cost)
        return [(16, 64, 128, 128), (16, 320, 32, 32)]
    if cfg.size == "quick":
        return [(2, 64, 128, 128), (2, 320, 32, 32)]
    return [(2, 64, 128, 128), (2, 320, 32, 32), (1, 32, 256, 256)]


def _weights(C: int, cfg: Config, requires_grad: bool):
    from segnext_kernels import MSCA
    module = MSCA(C).to(device=cfg.device, dtype=cfg.dtype)  # the official init
    return [w.detach().clone().requires_grad_(requires_grad) for w in module.weights()]


def _inputs(dims, cfg: Config, layout: str, backward: bool):
    B, C, H, W = dims
    nbytes = B * C * H * W * roofline.elsize(cfg.dtype) * (2 if backward else 1)
    sets = []
    for _ in range(n_rotations(nbytes, cfg)):
        u = to_layout(torch.randn(dims, device=cfg.device, dtype=cfg.dtype), layout)
        if backward:
            g = to_layout(torch.randn(dims, device=cfg.device, dtype=cfg.dtype), layout)
            sets.append((u.requires_grad_(True), g))
        else:
            sets.append((u,))
    return sets


def _timed(op, dims, cfg: Config, layout: str, backward: bool):
    """``op(u, *weights)`` as a timed callable with rotated inputs."""
    weights = _weights(dims[1], cfg, requires_grad=backward)
    nxt = cycle(_inputs(dims, cfg, layout, backward))
    if backward:
        def fwd_bwd():
            u, g = nxt()
            out = op(u, *weights)
            return torch.autograd.grad(out, [u] + weights, g)
        return fwd_bwd

    def fwd():
        with torch.no_grad():
            return op(nxt()[0], *weights)
    return fwd


def _make_eager(dims, cfg, layout, backward):
    def make():
        from segnext_kernels import msca_ref
        return _timed(msca_ref, dims, cfg, layout, backward)
    return make


def _make_compiled(dims, cfg, layout, backward):
    def make():
        from segnext_kernels import msca_ref
        return _timed(torch.compile(msca_ref, dynamic=False), dims, cfg, layout, backward)
    return make


def _make_fused(dims, cfg, backward):
    def make_for(backend, layout):
        def make():
            from segnext_kernels import msca

            def op(u, *w):
                return msca(u, *w, backend=backend)
            return _timed(op, dims, cfg, layout, backward)
        return make
    return make_for


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    out, notes = [], []
    for dims in shapes(cfg):
        B, C, H, W = dims
        for backward in (False, True):
            variants = [Variant("eager", layout, "reference", baseline=True,
                                make=_make_eager(dims, cfg, layout, backward))
                        for layout in ("nchw", "cl")]
            if cfg.compile:
                layout = primary_layout(cfg)
                variants.append(Variant("compile", layout, "reference", compiles=True,
                                        make=_make_compiled(dims, cfg, layout, backward)))
            fused, fused_notes = fused_variants("msca", cfg, ("nchw", "cl"),
                                                _make_fused(dims, cfg, backward))
            notes += fused_notes
            out.append(Case(level="msca", pass_="fwd+bwd" if backward else "fwd",
                            shape=f"B{B} C{C} {H}x{W}", params=dict(B=B, C=C, H=H, W=W),
                            dtype=cfg.dtype_name, variants=variants + fused,
                            cost=roofline.msca_cost(B, C, H, W, cfg.dtype, backward)))
    return out, list(dict.fromkeys(notes))


# --------------------------------------------------------------------------------------------
# Memory level: bytes saved for backward by one forward with gradients
# --------------------------------------------------------------------------------------------
def _make_saved(op_name: str, backend: str, dims, cfg: Config, layout: str):
    def make():
        import segnext_kernels as sk
        weights = _weights(dims[1], cfg, requires_grad=True)
        u = to_layout(torch.randn(dims, device=cfg.device, dtype=cfg.dtype), layout).requires_grad_(True)

        def op(x):
            if op_name == "eager":
                return sk.msca_ref(x, *weights)
            return sk.msca(x, *weights, backend=backend)

        def saved_bytes():
            counter = SavedBytes(exclude=weights)
            with counter.hooks():
                out = op(u)
            del out
            return counter.total
        return saved_bytes
    return make


def memory_cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    out, notes = [], []
    for dims in shapes(cfg):
        B, C, H, W = dims
        variants = [Variant("eager", layout, "reference", baseline=True,
                            make=_make_saved("eager", "reference", dims, cfg, layout))
                    for layout in ("nchw", "cl")]
        fused, fused_notes = fused_variants(
            "msca", cfg, ("nchw", "cl"),
            lambda b, layout, dims=dims: _make_saved("fused", b, dims, cfg, layout))
        notes += fused_notes
        out.append(Case(level="memory", pass_="msca saved", shape=f"B{B} C{C} {H}x{W}",
                        params=dict(B=B, C=C, H=H, W=W), dtype=cfg.dtype_name,
                        variants=variants + fused, metric="bytes",
                        unit_bytes=B * C * H * W * roofline.elsize(cfg.dtype)))
    return out, list(dict.fromkeys(notes))

"""NMF2D Triton kernels against the reference (float64 on float64 copies), forward and both
gradient modes; public API paths, torch.library/torch.compile integration, numerics edge cases.

Runs on the CPU through TRITON_INTERPRET=1 (set by conftest.py), so shapes stay small; the
``gpu`` tests take realistic shapes when a CUDA GPU is present.

Tolerance: max|diff| / max|ref| ≤ 1e-4 against the float64 reference. Where the float32
*reference* itself misses that (rounding amplified by the multiplicative updates, e.g. the bases
gradient with R > N or a 1e-6…1e4 input range), the bound is twice the float32 reference's
own error: the kernel must be as accurate as the spec run in float32. Where float32 keeps no
digit at all (the float32 reference is > 1e-2 off: the R = 1 bases gradient after 7 steps, which
is ~1e-7 of dX), only the noise level is compared; R = 1 is checked exactly with a larger eps.
"""
from __future__ import annotations

import pytest
import torch

import segnext_kernels
from segnext_kernels.nmf2d import triton as nmf_triton
from segnext_kernels.nmf2d.reference import draw_bases, nmf_decompose_ref
from segnext_kernels.ops import nmf2d_op

import compile_launches
from utils import output_and_grads, rel_err

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
GRADS = ("unrolled", "one_step")
TOL32 = 1e-4


def reference(X, bases, steps, grad, gY, eps=1e-6, inv_t=1.0, dtype=torch.float64):
    """[Y, dX, dbases or None] of the reference computed in ``dtype``."""
    return output_and_grads(lambda x, b: nmf_decompose_ref(x, b, steps, eps, inv_t, grad),
                            [X, bases], gY, dtype, allow_unused=True)


def check(name, got, X, bases, steps, grad, gY, **kw):
    """Compare the kernel's (Y, dX, dB) with the float64 reference (see module docstring)."""
    ref64 = reference(X, bases, steps, grad, gY, **kw)
    ref32 = reference(X, bases, steps, grad, gY, dtype=torch.float32, **kw)
    for what, g, r64, r32 in zip(("Y", "dX", "dbases"), got, ref64, ref32):
        if r64 is None:  # one_step: the reference detaches the bases
            assert g is None or not g.abs().any(), f"{name}: {what} should be None/zero"
            continue
        assert g is not None, f"{name}: {what} missing"
        assert torch.isfinite(g).all(), f"{name}: {what} has NaN/Inf"
        err32 = rel_err(r32, r64)
        # float32 keeps no digits when err32 > 1e-2 (e.g. the bases gradient with R = 1 after
        # 7 steps: the iterations forget B_0, its gradient is ~1e-7 of dX and pure rounding):
        # then only the size of the noise is compared.
        bound = max(TOL32, 2 * err32) if err32 <= 1e-2 else 4 * err32
        err = rel_err(g, r64)
        assert err <= bound, f"{name}: {what} rel err {err:.2e} > {bound:.2e}"


def run_launchers(X, bases, steps, grad, gY, n_chunks=None, eps=1e-6, inv_t=1.0):
    Y, *saved = nmf_triton.nmf_forward(X, bases, steps, eps, inv_t, grad == "unrolled",
                                       n_chunks=n_chunks)
    dX, dB = nmf_triton.nmf_backward(gY, X, *saved, steps, eps, inv_t, grad, n_chunks=n_chunks)
    return Y, dX, dB


# (b, D, N, R, steps, N chunks): a covering subset of D {8, 64, 256} × N {1, 7, 64, 300} ×
# R {1, 16, 64} × steps {0, 1, 7}, both launch modes (1 chunk = persistent kernel).
SHAPES = [
    (2, 8, 1, 1, 0, 1),
    (2, 8, 7, 16, 1, 1),
    (1, 64, 64, 16, 7, 1),
    (1, 64, 300, 64, 1, 3),
    (1, 256, 7, 64, 7, 1),      # R > N
    (2, 256, 64, 1, 0, 1),
    (1, 8, 300, 16, 7, 2),
    (1, 256, 300, 16, 1, 1),
    (2, 64, 1, 64, 7, 1),       # R > N, N = 1
    (1, 64, 7, 1, 7, 1),
    (2, 64, 300, 16, 7, 3),
]


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("b,D,N,R,steps,chunks", SHAPES)
def test_launchers_match_reference(b, D, N, R, steps, chunks, grad):
    X = torch.rand(b, D, N, device=DEV)
    bases = draw_bases(b, D, R, device=DEV)
    gY = torch.randn(b, D, N, device=DEV)
    got = run_launchers(X, bases, steps, grad, gY, n_chunks=chunks)
    check(f"{(b, D, N, R, steps, chunks)}", got, X, bases, steps, grad, gY)


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("R,steps,eps,inv_t", [(5, 2, 1e-2, 100.0), (1, 7, 1e-1, 1.0),
                                               (3, 2, 1e-6, -0.5)])
def test_eps_and_inv_t_are_honoured(R, steps, eps, inv_t, grad):
    X = torch.rand(2, 16, 20, device=DEV)
    bases = draw_bases(2, 16, R, device=DEV)
    gY = torch.randn_like(X)
    kw = dict(eps=eps, inv_t=inv_t)
    got = run_launchers(X, bases, steps, grad, gY, **kw)
    check(f"eps/inv_t {R, steps, eps, inv_t}", got, X, bases, steps, grad, gY, **kw)


@pytest.mark.parametrize("grad", GRADS)
def test_gpu_block_sizes_rank_32(monkeypatch, grad):
    """The launchers with their GPU tiles (the ones compile_launches.py compiles for sm_80 and
    sm_90) at padded rank 32: several D and N blocks, partial last ones, both launch modes."""
    monkeypatch.setattr(nmf_triton, "block_sizes", nmf_triton._gpu_block_sizes)
    for b, D, N, R, steps, chunks in [(1, 80, 100, 20, 2, 1), (1, 80, 100, 20, 2, 2)]:
        X = torch.rand(b, D, N, device=DEV)
        bases = draw_bases(b, D, R, device=DEV)
        gY = torch.randn_like(X)
        got = run_launchers(X, bases, steps, grad, gY, n_chunks=chunks)
        check(f"gpu tiles {(b, D, N, R, steps, chunks)}", got, X, bases, steps, grad, gY)


def test_poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: nothing unwritten may leak out."""
    monkeypatch.setenv("SEGNEXT_POISON", "1")
    for (b, D, N, R, steps, chunks) in [(2, 20, 37, 3, 2, 1), (1, 20, 37, 3, 2, 2),
                                        (2, 8, 5, 16, 0, 1), (1, 8, 40, 16, 1, 2)]:
        X = torch.rand(b, D, N, device=DEV)
        bases = draw_bases(b, D, R, device=DEV)
        gY = torch.randn_like(X)
        for grad in GRADS:
            got = run_launchers(X, bases, steps, grad, gY, n_chunks=chunks)
            check(f"poisoned {(b, D, N, R, steps, chunks)}", got, X, bases, steps, grad, gY)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def api_grads(x, bases, R, steps, S, grad, gY, **kw):
    x = x.detach().clone().requires_grad_()
    bases = bases.detach().clone().requires_grad_()
    y = segnext_kernels.nmf2d(x, R=R, steps=steps, S=S, bases=bases, grad=grad, **kw)
    y.backward(gY.to(y.dtype))
    return y, x.grad, bases.grad


@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("S,steps", [(2, 1), (2, 7), (1, 0)])
def test_nmf2d_api_groups(S, steps, grad):
    """S groups are a reshape in the wrapper; backend chosen by argument and by use_backend."""
    B, C, H, W, R = 2, 16, 5, 7, 4
    x = torch.rand(B, C, H, W, device=DEV)
    bases = draw_bases(B * S, C // S, R, device=DEV)
    gY = torch.randn(B, C, H, W, device=DEV)
    ref = api_grads(x.double(), bases.double(), R, steps, S, grad, gY.double(),
                    backend="reference")
    got = api_grads(x, bases, R, steps, S, grad, gY, backend="triton")
    with segnext_kernels.use_backend("triton"):
        got_ctx = api_grads(x, bases, R, steps, S, grad, gY)
    for g, gc, r, what in zip(got, got_ctx, ref, ("y", "x.grad", "bases.grad")):
        if grad == "one_step" and what == "bases.grad":
            assert r is None and g is None and gc is None
            continue
        assert rel_err(g, r) <= TOL32, what
        assert torch.equal(g, gc), what


def test_nmf2d_module_and_generator():
    ham = segnext_kernels.NMF2D(S=2, R=8)
    x = torch.rand(2, 32, 4, 6, device=DEV, requires_grad=True)
    for training in (True, False):  # 6 train steps, 7 eval steps
        ham.train(training)
        gens = [torch.Generator(device=DEV).manual_seed(3) for _ in range(2)]
        with segnext_kernels.use_backend("triton"):
            y = ham(x, generator=gens[0])
        y_ref = segnext_kernels.nmf2d(x.double(), R=8, steps=6 if training else 7, S=2,
                                      bases=draw_bases(4, 16, 8, device=DEV,
                                                       generator=gens[1]).double(),
                                      backend="reference")
        assert rel_err(y, y_ref) <= TOL32
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
        assert rel_err(gx, gx_ref) <= TOL32


def test_float16_input_computes_in_float32():
    x = torch.rand(2, 16, 6, 5, device=DEV).half().requires_grad_()
    bases = draw_bases(2, 16, 16, device=DEV)
    y = segnext_kernels.nmf2d(x, R=16, steps=7, bases=bases, backend="triton")
    assert y.dtype == torch.float16
    y.float().sum().backward()
    xr = x.detach().double().requires_grad_()
    yr = segnext_kernels.nmf2d(xr, R=16, steps=7, bases=bases.double(), backend="reference")
    yr.sum().backward()
    assert rel_err(y, yr) <= 1e-2 and rel_err(x.grad, xr.grad) <= 1e-2
    # the computation itself ran in float32: same as the float32 input path up to the cast
    y32 = segnext_kernels.nmf2d(x.detach().float(), R=16, steps=7, bases=bases, backend="triton")
    assert torch.equal(y, y32.half())


def test_autocast_runs_in_float32():
    x = torch.rand(1, 16, 4, 4, device=DEV)
    bases = draw_bases(1, 16, 4, device=DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        y = segnext_kernels.nmf2d(x, R=4, steps=3, bases=bases, backend="triton")
    y_ref = segnext_kernels.nmf2d(x.double(), R=4, steps=3, bases=bases.double(),
                                  backend="reference")
    assert y.dtype == torch.float32 and rel_err(y, y_ref) <= TOL32


# --------------------------------------------------------------------------------------------
# numerics edge cases
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("case", ["zeros", "dynamic_range", "R_gt_N"])
def test_numerics_edge_cases(case, grad):
    """No NaN/Inf, and the reference's values (the reference is finite on all three)."""
    if case == "zeros":
        X, R = torch.zeros(2, 8, 7, device=DEV), 16
    elif case == "dynamic_range":  # 1e-6 … 1e4
        magnitude = 10 ** (torch.rand(2, 64, 64, device=DEV) * 10 - 6)
        X, R = torch.rand(2, 64, 64, device=DEV) * magnitude, 16
    else:
        X, R = torch.rand(2, 8, 3, device=DEV), 64
    bases = draw_bases(X.shape[0], X.shape[1], R, device=DEV)
    gY = torch.randn_like(X)
    for chunks in (1, 2):
        got = run_launchers(X, bases, 7, grad, gY, n_chunks=chunks)
        check(case, got, X, bases, 7, grad, gY)
    if case == "zeros":
        assert not got[0].any() and not got[1].any()


def test_nothing_saved_without_grad():
    X = torch.rand(1, 8, 9, device=DEV)
    bases = draw_bases(1, 8, 4, device=DEV)
    Y, bases_hist, coef_hist, *_ = nmf2d_op(X, bases, 7, 1e-6, 1.0, "unrolled", False, "triton")
    assert bases_hist.shape[1] == 2 and coef_hist.shape[1] == 2  # rings, not 7 steps
    Y2, bases_hist, coef_hist, *_ = nmf2d_op(X, bases, 7, 1e-6, 1.0, "unrolled", True, "triton")
    assert bases_hist.shape[1] == 8 and coef_hist.shape[1] == 9 and torch.equal(Y, Y2)


# --------------------------------------------------------------------------------------------
# torch.library / torch.compile
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad", GRADS)
def test_opcheck(grad):
    X = torch.rand(2, 8, 7, device=DEV)
    bases = draw_bases(2, 8, 3, device=DEV)
    torch.library.opcheck(nmf2d_op, (X.requires_grad_(), bases.requires_grad_(), 2, 1e-6, 1.0,
                                     grad, True, "triton"))


def test_torch_compile_fullgraph():
    bases = draw_bases(2, 8, 3, device=DEV)

    def f(x, b):
        return segnext_kernels.nmf2d(x, R=3, steps=2, bases=b, backend="triton")

    x = torch.rand(2, 8, 3, 5, device=DEV, requires_grad=True)
    y_eager = f(x, bases)
    (g_eager,) = torch.autograd.grad(y_eager.sum(), x)
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, bases)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y, y_eager) and torch.equal(g, g_eager)


# --------------------------------------------------------------------------------------------
# compile-only check for A100s and H100s (sm_80, sm_90) on a machine without a GPU
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests compile and run the kernels for real")
def test_kernels_compile_for_sm80_and_sm90():
    """The interpreter accepts code the compiler rejects: compile every kernel launch the
    launchers make, with their GPU configuration (tiles, warps, maxnreg), for the SegNeXt heads
    and every padded rank (tests/compile_launches.py), for sm_80 and sm_90 with this Triton: no
    error, no register spill, shared memory within an A100's."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    results = compile_launches.compile_in_subprocesses("nmf")
    compile_launches.check_results(results, compile_launches.NMF_KERNELS)


# --------------------------------------------------------------------------------------------
# GPU: realistic shapes (SegNeXt-T / -B heads) in both launch modes
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("b,D,N,R,steps", [(4, 256, 1024, 16, 7), (2, 512, 1024, 64, 6),
                                           (3, 96, 333, 5, 2)])
@pytest.mark.parametrize("chunks", [None, 1])
def test_gpu_realistic(b, D, N, R, steps, grad, chunks):
    X = torch.rand(b, D, N, device="cuda")
    bases = draw_bases(b, D, R, device="cuda")
    gY = torch.randn_like(X)
    got = run_launchers(X, bases, steps, grad, gY, n_chunks=chunks)
    check(f"gpu {(b, D, N, R, steps, chunks)}", got, X, bases, steps, grad, gY)


@pytest.mark.gpu
def test_gpu_api_and_compile():
    x = torch.rand(2, 64, 16, 16, device="cuda", requires_grad=True)
    bases = draw_bases(2, 64, 16, device="cuda")
    y = segnext_kernels.nmf2d(x, R=16, steps=6, bases=bases, backend="triton")
    yc = torch.compile(lambda x, b: segnext_kernels.nmf2d(x, R=16, steps=6, bases=b,
                                                          backend="triton"),
                       fullgraph=True)(x, bases)
    y_ref = segnext_kernels.nmf2d(x.double(), R=16, steps=6, bases=bases.double(),
                                  backend="reference")
    assert rel_err(y, y_ref) <= TOL32 and torch.equal(y, yc)


def test_rank_above_the_kernels_limit_runs_the_reference():
    # R > MAX_RANK (shared memory of the backward) falls back to the reference, same result;
    # the launcher itself refuses it, and sizes its int32 offsets cannot index, clearly.
    B, C, H, W, R = 1, 8, 2, 3, nmf_triton.MAX_RANK + 2
    x = torch.rand(B, C, H, W, device=DEV)
    bases = draw_bases(B, C, R, device=DEV)
    got = segnext_kernels.nmf2d(x, R=R, steps=2, bases=bases, backend="triton")
    want = segnext_kernels.nmf2d(x, R=R, steps=2, bases=bases, backend="reference")
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="rank R=130 is above"):
        nmf_triton.check_sizes(8, 6, 130)
    with pytest.raises(ValueError, match="32-bit offsets"):
        nmf_triton.check_sizes(1 << 16, 1 << 16, 16)
    nmf_triton.check_sizes(512, 4096, 64)  # SegNeXt-B's decoder: fine

"""The fused depthwise 3x3 conv + bias + GELU (csrc/cpu/dwconv_gelu_cpu.cpp) against its float64
reference (the MLP it belongs to: tests/test_mlp.py).

Forward and every gradient on odd shapes (H or W of 1, 2, primes), both memory formats, 1 and 2
threads, float32 / bfloat16 / float16 / float64; gradcheck and opcheck; poisoned outputs;
bitwise determinism across thread counts; autocast; bad input.
"""
import pytest
import torch

import segnext_kernels as sk
from segnext_kernels.dwconv_gelu import dwconv_gelu, dwconv_gelu_ref
from utils import FORMATS, check_all_close, output_and_grads, rel_err, run_poisoned

pytestmark = pytest.mark.skipif(
    "cpu" not in sk.op_backends().get("dwconv_gelu", ()),
    reason="segnext_kernels._C has no CPU kernel for dwconv_gelu: "
           + sk.available_backends()["cpu"].reason)

NAMES = ("y", "grad_x", "grad_weight", "grad_bias")
# H, W of 1 and 2 (every tap at an edge), primes, a 1-wide image; C below, at and above one
# 16-float vector, with a channel tail.
SHAPES = [(1, 1, 1, 1), (2, 3, 1, 7), (1, 5, 7, 1), (2, 16, 2, 2), (1, 17, 5, 11),
          (2, 40, 13, 3), (1, 33, 23, 29), (3, 64, 9, 16)]


def make_inputs(B, C, H, W, dtype=torch.float64, fmt=torch.contiguous_format, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(C, 1, 3, 3, generator=gen, dtype=torch.float64) * 0.5
    b = torch.randn(C, generator=gen, dtype=torch.float64) * 0.3
    g = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return (cast(x).contiguous(memory_format=fmt), cast(w), cast(b),
            cast(g).contiguous(memory_format=fmt))


def reference(x, w, b, g):
    return output_and_grads(dwconv_gelu_ref, [x, w, b], g, torch.float64)


def fused(x, w, b, g):
    return output_and_grads(lambda *t: dwconv_gelu(*t, backend="cpu"), [x, w, b], g)


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_reference(shape, fmt, nthreads, threads):
    threads(nthreads)
    x, w, b, g = make_inputs(*shape, dtype=torch.float32, fmt=FORMATS[fmt])
    got = fused(x, w, b, g)
    assert got[0].dtype == torch.float32
    assert got[0].stride() == torch.empty_like(x).stride()
    assert got[1].stride() == torch.empty_like(x).stride()
    check_all_close(NAMES, got, reference(x, w, b, g), 1e-4, f"{shape} {fmt} threads={nthreads}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", [(2, 17, 11, 23), (1, 64, 5, 2), (1, 3, 1, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_low_precision_matches_reference(shape, fmt, dtype):
    x, w, b, g = make_inputs(*shape, dtype=dtype, fmt=FORMATS[fmt])
    got = fused(x, w, b, g)
    assert all(t.dtype == dtype for t in got)
    check_all_close(NAMES, got, reference(x, w, b, g), 1e-2, f"{shape} {fmt} {dtype}")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_float64_matches_reference(fmt):
    x, w, b, g = make_inputs(2, 19, 13, 7, fmt=FORMATS[fmt])
    check_all_close(NAMES, fused(x, w, b, g), reference(x, w, b, g), 1e-12, fmt)


def test_gelu_tails_and_large_values():
    # erf saturates beyond |z| ~ 4 and the GELU's derivative has its bump near z = -0.75:
    # values spread over [-30, 30] exercise the clamped polynomial and the exp.
    x, w, b, g = make_inputs(1, 32, 6, 7, dtype=torch.float32)
    x = x * 10.0
    check_all_close(NAMES, fused(x, w, b, g), reference(x, w, b, g), 1e-4, "large")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_extreme_values(fmt):
    # z = bias (x = 0, weight 0), one value per channel: huge |z| (erf saturated, the density
    # underflowed) and +-inf must give gelu(z) = z or 0 and gelu'(z) = 1 or 0 exactly (not an
    # ulp of erf times z, nor inf * 0); NaN propagates. grad_bias = H * W * gelu'(z).
    vals = [1e6, -1e6, 3e38, -3e38, float("inf"), -float("inf"), 30.0, -30.0, 13.5, -13.5,
            5.0, -5.0, 0.5, -0.75, float("nan")]
    C = len(vals)
    b = torch.tensor(vals)
    x = torch.zeros(1, C, 3, 4).contiguous(memory_format=FORMATS[fmt])
    w = torch.zeros(C, 1, 3, 3)
    y = torch.ops.segnext_C.dwconv_gelu_forward(x, w, b)
    _, _, gb = torch.ops.segnext_C.dwconv_gelu_backward(torch.ones_like(x), x, w, b)
    y, gprime = y[0, :, 1, 2], gb / 12
    for c, z in enumerate(vals):
        if z != z:
            assert torch.isnan(y[c]) and torch.isnan(gprime[c])
        elif abs(z) == float("inf"):
            # IEEE: z * Phi(z) is inf * 0 at -inf (PyTorch gives NaN for both signs and for
            # the gradient); the kernel gives NaN or the limit, never a finite wrong value.
            lim_y, lim_g = (z, 1.0) if z > 0 else (0.0, 0.0)
            assert torch.isnan(y[c]) or y[c] == lim_y, (z, y[c])
            assert torch.isnan(gprime[c]) or gprime[c] == lim_g, (z, gprime[c])
        elif z > 13:
            assert y[c] == z and gprime[c] == 1.0, (z, y[c], gprime[c])
        elif z < -13:
            assert y[c] == 0 and gprime[c] == 0.0, (z, y[c], gprime[c])
        else:
            zd = torch.tensor(z, dtype=torch.float64, requires_grad=True)
            yd = torch.nn.functional.gelu(zd)
            (gd,) = torch.autograd.grad(yd, zd)
            assert abs(y[c].item() - yd.item()) <= 1e-6 * max(1.0, abs(yd.item())), z
            assert abs(gprime[c].item() - gd.item()) <= 1e-6, z


def test_channels_last_weight_strides():
    # A model moved to channels_last has (C, 1, 3, 3) depthwise weights with channels-last
    # strides: the weight gradient must come back with the strides the fake promises.
    x, w, b, g = make_inputs(2, 6, 5, 7, dtype=torch.float32, fmt=torch.channels_last)
    w = w.contiguous(memory_format=torch.channels_last)
    _, gw, _ = torch.ops.segnext_C.dwconv_gelu_backward(g, x, w, b)
    assert gw.stride() == torch.empty_like(w).stride()
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), "cpu")
    torch.library.opcheck(torch.ops.segnext.dwconv_gelu.default, args)


def test_gradcheck():
    x, w, b, _ = make_inputs(1, 3, 5, 4)
    inputs = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *t: dwconv_gelu(*t, backend="cpu"), inputs,
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_opcheck(fmt):
    x, w, b, _ = make_inputs(2, 5, 6, 7, dtype=torch.float32, fmt=FORMATS[fmt])
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), "cpu")
    torch.library.opcheck(torch.ops.segnext.dwconv_gelu.default, args)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_deterministic_across_runs_and_threads(fmt, threads):
    # Weight gradients are summed per slot of rows (channels-last; a function of H only) or per
    # plane (NCHW), then in a fixed order: bitwise equal for any thread count.
    x, w, b, g = make_inputs(2, 40, 37, 30, dtype=torch.float32, fmt=FORMATS[fmt])
    runs = {}
    for nt in (1, 2, 2, 3):
        threads(nt)
        res = [torch.ops.segnext_C.dwconv_gelu_forward(x, w, b)] + \
            list(torch.ops.segnext_C.dwconv_gelu_backward(g, x, w, b))
        if nt in runs:
            assert all(torch.equal(p, q) for p, q in zip(runs[nt], res)), f"threads={nt} rerun"
        runs[nt] = res
    for nt in (2, 3):
        assert all(torch.equal(p, q) for p, q in zip(runs[1], runs[nt])), f"1 vs {nt} threads"


def test_poisoned_outputs_are_overwritten():
    # SEGNEXT_POISON=1 (in a fresh interpreter): the outputs start as NaN.
    run_poisoned("""
        from segnext_kernels.dwconv_gelu import dwconv_gelu_ref
        for x, dt in poisoned_inputs():
            C, g = x.shape[1], torch.randn_like(x)
            w, b = (torch.randn(C, 1, 3, 3) * 0.5).to(dt), (torch.randn(C) * 0.3).to(dt)
            y = torch.ops.segnext_C.dwconv_gelu_forward(x, w, b)
            grads = torch.ops.segnext_C.dwconv_gelu_backward(g, x, w, b)
            assert all(torch.isfinite(t).all() for t in [y, *grads]), (x.shape, dt)
            ref = dwconv_gelu_ref(x.double(), w.double(), b.double())
            assert rel_err(y, ref) < (1e-2 if dt == torch.bfloat16 else 1e-4), (x.shape, dt)
        print("ok")
    """)


def test_bad_input_raises_clear_error():
    x, w, b, _ = make_inputs(1, 4, 5, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="weight must have shape"):
        dwconv_gelu(x, torch.zeros(4, 1, 5, 5), b)
    with pytest.raises(ValueError, match="bias must have shape"):
        dwconv_gelu(x, w, torch.zeros(5))
    with pytest.raises(ValueError, match="x must be a 4-D tensor"):
        dwconv_gelu(x[0], w, b)
    with pytest.raises(TypeError, match="weight has dtype"):
        dwconv_gelu(x, w.double(), b)
    with pytest.raises(RuntimeError, match=r"dwconv_gelu_forward: weight must have shape \(4, 1, 3, 3\)"):
        torch.ops.segnext_C.dwconv_gelu_forward(x, torch.zeros(4, 1, 3, 5), b)
    with pytest.raises(RuntimeError, match="dwconv_gelu_backward: grad must match x"):
        torch.ops.segnext_C.dwconv_gelu_backward(x[:, :, :4], x, w, b)


def test_autocast_computes_in_the_autocast_dtype():
    # As conv2d under autocast: inputs and weights cast to bfloat16, result in bfloat16, close to
    # the reference on the cast values.
    x, w, b, _ = make_inputs(1, 16, 6, 7, dtype=torch.float32, fmt=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dwconv_gelu(x, w, b, backend="cpu")
    assert y.dtype == torch.bfloat16
    bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    assert rel_err(y, dwconv_gelu_ref(bf(x), bf(w), bf(b))) <= 1e-2

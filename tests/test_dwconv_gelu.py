"""The fused depthwise 3x3 conv + bias + GELU (csrc/cpu/dwconv_gelu_cpu.cpp) and the fused
inference MLP (csrc/cpu/mlp_cpu.cpp) against their float64 references.

dwconv_gelu: forward and every gradient on odd shapes (H or W of 1, 2, primes), both memory
formats, 1 and 2 threads, float32 / bfloat16 / float16 / float64; gradcheck and opcheck;
poisoned outputs; bitwise determinism across thread counts; bad input.
mlp: forward on the same sweep; the gradient path (fc1 -> dwconv_gelu -> fc2) when autograd
needs it; the model's Mlp modules with the cpu backend against the reference backend.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import segnext_kernels as sk
from segnext_kernels.dwconv_gelu import dwconv_gelu, dwconv_gelu_ref
from segnext_kernels.mlp import mlp, mlp_ref

pytestmark = pytest.mark.skipif(
    "cpu" not in sk.op_backends().get("dwconv_gelu", ()) or "cpu" not in sk.op_backends().get("mlp", ()),
    reason="segnext_kernels._C has no CPU kernels for dwconv_gelu/mlp: "
           + sk.available_backends()["cpu"].reason)

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
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
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y = dwconv_gelu_ref(*leaves)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, g.double()))


def fused(x, w, b, g):
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    y = dwconv_gelu(*leaves, backend="cpu")
    return [y.detach()] + list(torch.autograd.grad(y, leaves, g))


def rel_err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_close(got, want, tol, what=""):
    for name, a, r in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, want):
        assert a.shape == r.shape, f"{what} {name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite values"
        err = rel_err(a, r)
        assert err <= tol, f"{what} {name}: relative error {err:.3g} > {tol}"


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
    assert_close(got, reference(x, w, b, g), 1e-4, f"{shape} {fmt} threads={nthreads}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", [(2, 17, 11, 23), (1, 64, 5, 2), (1, 3, 1, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_low_precision_matches_reference(shape, fmt, dtype):
    x, w, b, g = make_inputs(*shape, dtype=dtype, fmt=FORMATS[fmt])
    got = fused(x, w, b, g)
    assert all(t.dtype == dtype for t in got)
    assert_close(got, reference(x, w, b, g), 1e-2, f"{shape} {fmt} {dtype}")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_float64_matches_reference(fmt):
    x, w, b, g = make_inputs(2, 19, 13, 7, fmt=FORMATS[fmt])
    assert_close(fused(x, w, b, g), reference(x, w, b, g), 1e-12, fmt)


def test_gelu_tails_and_large_values():
    # erf saturates beyond |z| ~ 4 and the GELU's derivative has its bump near z = -0.75:
    # values spread over [-30, 30] exercise the clamped polynomial and the exp.
    x, w, b, g = make_inputs(1, 32, 6, 7, dtype=torch.float32)
    x = x * 10.0
    assert_close(fused(x, w, b, g), reference(x, w, b, g), 1e-4, "large")


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
    # SEGNEXT_POISON=1 (in a fresh interpreter): outputs and the MLP's scratch start as NaN.
    script = textwrap.dedent("""
        import torch, segnext_kernels as sk
        from segnext_kernels.dwconv_gelu import dwconv_gelu_ref
        from segnext_kernels.mlp import mlp_ref
        torch.manual_seed(0)
        for shape, fmt in [((2, 17, 11, 23), torch.channels_last), ((1, 3, 2, 64), torch.contiguous_format),
                           ((1, 40, 33, 7), torch.channels_last), ((1, 1, 1, 1), torch.contiguous_format)]:
            C = shape[1]
            for dt in (torch.float32, torch.bfloat16, torch.float64):
                x = torch.randn(shape).to(dt).contiguous(memory_format=fmt)
                g = torch.randn(shape).to(dt).contiguous(memory_format=fmt)
                w, b = (torch.randn(C, 1, 3, 3) * 0.5).to(dt), (torch.randn(C) * 0.3).to(dt)
                y = torch.ops.segnext_C.dwconv_gelu_forward(x, w, b)
                grads = torch.ops.segnext_C.dwconv_gelu_backward(g, x, w, b)
                assert all(torch.isfinite(t).all() for t in [y, *grads]), (shape, dt)
                ref = dwconv_gelu_ref(x.double(), w.double(), b.double())
                tol = 1e-2 if dt == torch.bfloat16 else 1e-4
                assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol
                ws = [(torch.randn(s) * 0.3).to(dt) for s in
                      [(3 * C, C, 1, 1), (3 * C,), (3 * C, 1, 3, 3), (3 * C,), (C, 3 * C, 1, 1), (C,)]]
                y = torch.ops.segnext_C.mlp_forward(x, ws)
                assert torch.isfinite(y).all(), (shape, dt)
                ref = mlp_ref(x.double(), *[t.double() for t in ws])
                assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol
        print("ok")
    """)
    env = dict(os.environ, SEGNEXT_POISON="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


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


# ------------------------------------------------------------------------------------------
# mlp
# ------------------------------------------------------------------------------------------
def make_mlp(B, C, H, W, ratio, dtype=torch.float64, fmt=torch.contiguous_format, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hid = C * ratio
    shapes = [(hid, C, 1, 1), (hid,), (hid, 1, 3, 3), (hid,), (C, hid, 1, 1), (C,)]
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    ws = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.4 for s in shapes]
    return x.to(dtype).contiguous(memory_format=fmt), [w.to(dtype) for w in ws]


@pytest.mark.parametrize("nthreads", [1, 2, 3])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 2), (2, 3, 1, 7, 4), (1, 5, 7, 1, 8),
                                   (1, 3, 2, 5, 4), (2, 17, 13, 5, 4), (3, 33, 11, 23, 4),
                                   (1, 64, 11, 128, 8), (2, 40, 9, 96, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_mlp_inference_matches_reference(shape, fmt, nthreads, threads):
    # Chunks are ~1.5 MB of hidden rows: a 128-wide, 512-channel hidden gets 2-row chunks, so
    # bands of 11 rows (1 thread) or 6 + 5 (2 threads) roll their halo rows several times
    # (W=96, 320 channels: 3-row chunks, two images); H=2 with 3 threads: bands of few rows.
    threads(nthreads)
    x, ws = make_mlp(*shape, dtype=torch.float32, fmt=FORMATS[fmt])
    with torch.no_grad():
        y = mlp(x, *ws, backend="cpu")
    ref = mlp_ref(x.double(), *[w.double() for w in ws])
    assert y.stride() == torch.empty_like(x).stride() and y.dtype == torch.float32
    assert rel_err(y, ref) <= 1e-4, f"{shape} {fmt} threads={nthreads}"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2),
                                       (torch.float16, 1e-2)])
@pytest.mark.parametrize("shape", [(2, 12, 9, 10, 4), (1, 64, 5, 128, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_mlp_inference_dtypes(dtype, tol, shape):
    x, ws = make_mlp(*shape, dtype=dtype, fmt=torch.channels_last)
    y = torch.ops.segnext_C.mlp_forward(x, ws)
    ref = mlp_ref(x.double(), *[w.double() for w in ws])
    assert y.dtype == dtype and rel_err(y, ref) <= tol


def test_mlp_training_path_gradients():
    # With autograd the functional runs fc1 -> fused dwconv_gelu -> fc2 (the inference op has
    # no backward): every gradient against the reference.
    x, ws = make_mlp(2, 6, 9, 7, 4, dtype=torch.float32, fmt=torch.channels_last)
    leaves = [t.detach().requires_grad_() for t in [x] + ws]
    y = mlp(*leaves, backend="cpu")
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in [x] + ws]
    yr = mlp_ref(*ref_leaves)
    want = torch.autograd.grad(yr, ref_leaves, g.double())
    assert rel_err(y.detach(), yr.detach()) <= 1e-4
    for i, (a, r) in enumerate(zip(got, want)):
        assert rel_err(a, r) <= 1e-4, f"gradient {i}"


def test_mlp_compiles_without_graph_breaks():
    x, ws = make_mlp(1, 4, 6, 5, 2, dtype=torch.float32, fmt=torch.channels_last)
    fn = torch.compile(lambda *t: mlp(*t, backend="cpu"), fullgraph=True, backend="eager")
    with torch.no_grad():
        assert rel_err(fn(x, *ws), mlp_ref(x.double(), *[w.double() for w in ws])) <= 1e-4


def test_mlp_bad_input():
    x, ws = make_mlp(1, 4, 5, 5, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"w1 must have shape \(hidden, 4, 1, 1\)"):
        mlp(x, torch.zeros(8, 3, 1, 1), *ws[1:])
    with pytest.raises(ValueError, match="wd must have shape"):
        mlp(x, *ws[:2], torch.zeros(8, 1, 5, 5), *ws[3:])
    with pytest.raises(RuntimeError, match=r"mlp_forward: w2 must have shape \(4, 8, 1, 1\)"):
        torch.ops.segnext_C.mlp_forward(x, [*ws[:4], torch.zeros(4, 7, 1, 1), ws[5]])


def test_model_mlps_with_cpu_backend_match_reference():
    # A whole SegNeXt-T block stack: inference (fused MLP) and a training forward/backward
    # (fused dwconv_gelu) with the cpu backend against the reference backend.
    import segnext
    torch.manual_seed(0)
    model = segnext.segnext_t(num_classes=5).to(memory_format=torch.channels_last)
    img = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():  # the decoder's NMF draws its bases per call: same seed for both
        with sk.use_backend("reference"):
            torch.manual_seed(1)
            want = model(img)
        with sk.use_backend("cpu"):
            torch.manual_seed(1)
            got = model(img)
    assert rel_err(got, want.double()) <= 1e-4
    model.train()
    for p in model.modules():  # batch statistics would differ only by rounding; keep them fixed
        if isinstance(p, torch.nn.BatchNorm2d):
            p.eval()
    grads = {}
    for backend in ("reference", "cpu"):
        model.zero_grad()
        with sk.use_backend(backend):
            torch.manual_seed(1)
            model(img).square().mean().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None and "mlp" in n}
    assert grads["cpu"], "no MLP parameter received a gradient"
    for name, ref in grads["reference"].items():
        assert rel_err(grads["cpu"][name], ref.double()) <= 1e-3, name


@pytest.mark.parametrize("layout", list(FORMATS))
def test_folded_block_inference_matches_reference(layout):
    # With a fused backend, an eval-mode Block folds its norms and layer scales into the
    # convs: with non-trivial running statistics, affine parameters and layer scales it must
    # still compute the block as written (the reference backend runs it unfolded).
    from segnext.mscan import Block
    torch.manual_seed(0)
    block = Block(24, 4, torch.nn.BatchNorm2d)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        for n in (block.norm1, block.norm2):
            n.running_mean.copy_(torch.randn(24) * 0.5)
            n.running_var.copy_(torch.rand(24) + 0.5)
    block.eval()
    x = torch.randn(2, 24, 11, 13).contiguous(memory_format=FORMATS[layout])
    with torch.no_grad():
        with sk.use_backend("reference"):
            want = block(x)
        with sk.use_backend("cpu"):
            assert block._folds(x)
            got = block(x)
            assert block._folds(x) and block._folded_cache is not None
            again = block(x)  # cached folded weights
        ref64 = copy_block_double(block)(x.double())
    assert got.stride() == want.stride()
    assert rel_err(got, ref64) <= 1e-4 and rel_err(want, ref64) <= 1e-4
    assert torch.equal(got, again)
    # the cache follows the parameters: an in-place update is seen by the next call
    with torch.no_grad():
        block.layer_scale_2.mul_(2.0)
        with sk.use_backend("cpu"):
            got2 = block(x)
        ref2 = copy_block_double(block)(x.double())
    assert rel_err(got2, ref2) <= 1e-4


def copy_block_double(block):
    import copy
    b64 = copy.deepcopy(block).double()
    def run(x):
        with sk.use_backend("reference"), torch.no_grad():
            return b64(x)
    return run


def test_block_does_not_fold_when_training_or_with_grad():
    from segnext.mscan import Block
    block = Block(8, 4, torch.nn.BatchNorm2d).eval()
    x = torch.randn(1, 8, 5, 5)
    with sk.use_backend("cpu"):
        assert not block._folds(x)  # grad mode on: the graph needs the block as written
        with torch.no_grad():
            assert block._folds(x)
            block.train()
            assert not block._folds(x)
            block.eval()
    with sk.use_backend("reference"), torch.no_grad():
        assert not block._folds(x)


def test_folded_block_compiles():
    from segnext.mscan import Block
    torch.manual_seed(0)
    block = Block(8, 4, torch.nn.BatchNorm2d).eval()
    x = torch.randn(1, 8, 6, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), sk.use_backend("cpu"):
        want = block(x)
        got = torch.compile(block, fullgraph=True, backend="eager")(x)
    assert rel_err(got, want.double()) <= 1e-5


def test_autocast_computes_in_the_autocast_dtype():
    # As conv2d under autocast: inputs and weights cast to bfloat16, result in bfloat16, close to
    # the reference on the cast values.
    x, w, b, _ = make_inputs(1, 16, 6, 7, dtype=torch.float32, fmt=torch.channels_last)
    xm, ws = make_mlp(1, 8, 6, 7, 4, dtype=torch.float32, fmt=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dwconv_gelu(x, w, b, backend="cpu")
        ym = mlp(xm, *ws, backend="cpu")
    assert y.dtype == torch.bfloat16 and ym.dtype == torch.bfloat16
    bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    assert rel_err(y, dwconv_gelu_ref(bf(x), bf(w), bf(b))) <= 1e-2
    assert rel_err(ym, mlp_ref(bf(xm), *[bf(t) for t in ws])) <= 2e-2

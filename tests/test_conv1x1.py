"""The fused 1x1 conv with its epilogue (conv1x1, CPU, inference only) against the reference:
odd shapes, both layouts, four dtypes, every epilogue; bad input; the reference with a gradient;
poisoned outputs; opcheck and torch.compile."""
import pytest
import torch

import segnext_kernels as sk
from utils import FORMATS, rel_err, run_poisoned

pytestmark = pytest.mark.skipif("cpu" not in sk.op_backends().get("conv1x1", ()),
                                reason="segnext_kernels._C has no CPU kernels: "
                                       + sk.available_backends()["cpu"].reason)

# (B, K, H, W, N): channel tails on both sides (K odd: the float32 GEMM for bfloat16 too),
# 1-pixel maps, primes, a SegNeXt width
CONV_SHAPES = [(2, 17, 5, 7, 33), (1, 32, 3, 1, 16), (1, 3, 1, 1, 1), (3, 64, 11, 13, 64),
               (1, 160, 8, 8, 150)]


def conv_inputs(B, K, H, W, N, dtype=torch.float32, fmt=torch.channels_last, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale)  # noqa: E731
    x = t(B, K, H, W).to(dtype).contiguous(memory_format=fmt)
    w = t(N, K, 1, 1, scale=K ** -0.5).to(dtype)
    b = t(N).to(dtype)
    r = t(B, N, H, W).to(dtype).contiguous(memory_format=fmt)
    s = t(N).to(dtype)
    return x, w, b, r, s


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12),
                                       (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv1x1_matches_reference(shape, fmt, dtype, tol):
    x, w, b, r, s = conv_inputs(*shape, dtype=dtype, fmt=FORMATS[fmt])
    for act, res, sc, bias in [("none", False, False, True), ("gelu", False, False, True),
                               ("relu", True, True, False), ("none", True, False, True),
                               ("gelu", True, True, True)]:
        args = (x, w, b if bias else None)
        kw = dict(act=act, residual=r if res else None, scale=s if sc else None)
        with torch.no_grad(), sk.record_kernels() as ran:
            y = sk.conv1x1(*args, **kw, backend="cpu")
        assert ran[("conv1x1", "cpu")] == 1
        want = sk.conv1x1_ref(*[t.double() if t is not None else None for t in args],
                              act, r.double() if res else None, s.double() if sc else None)
        assert y.dtype == dtype and y.stride() == torch.empty_like(r).stride()
        assert rel_err(y, want) <= tol, (act, res, sc, bias)


def test_conv1x1_bad_input_raises_clear_errors():
    x, w, b, r, s = conv_inputs(1, 4, 5, 5, 6)
    with pytest.raises(ValueError, match=r"weight must have shape \(out, 4, 1, 1\)"):
        sk.conv1x1(x, torch.zeros(6, 4, 3, 3), b)
    with pytest.raises(ValueError, match="act must be one of"):
        sk.conv1x1(x, w, b, act="silu")
    with pytest.raises(ValueError, match="scale is given without a residual"):
        sk.conv1x1(x, w, b, scale=s)
    with pytest.raises(ValueError, match=r"residual must have shape \(1, 6, 5, 5\)"):
        sk.conv1x1(x, w, b, residual=r[:, :3])
    with pytest.raises(ValueError, match="scale must have 6 elements"):
        sk.conv1x1(x, w, b, residual=r, scale=s[:4])
    with pytest.raises(TypeError, match="weight has dtype"):
        sk.conv1x1(x, w.double(), b)
    with pytest.raises(ValueError, match="conv1x1_forward: act must be 'none', 'gelu' or 'relu'"):
        torch.ops.segnext_C.conv1x1_forward(x, w, b, "tanh", None, None)
    with pytest.raises(ValueError, match=r"conv1x1_forward: bias must have shape \(6\)"):
        torch.ops.segnext_C.conv1x1_forward(x, w, b[:2], "none", None, None)


def test_conv1x1_with_a_gradient_runs_the_reference():
    x, w, b, r, s = conv_inputs(1, 8, 4, 5, 8)
    w.requires_grad_()
    with sk.record_kernels() as ran:
        y = sk.conv1x1(x, w, b, act="gelu", residual=r, scale=s, backend="cpu")
        y.sum().backward()
    assert ran[("conv1x1", "reference")] == 1 and ("conv1x1", "cpu") not in ran
    assert w.grad is not None


def test_conv1x1_poisoned_output_is_overwritten():
    run_poisoned("""
        import torch, segnext_kernels as sk
        torch.manual_seed(0)
        for dt in (torch.float32, torch.bfloat16, torch.float64):
            for shape in [(2, 17, 5, 7), (1, 64, 3, 1), (1, 3, 1, 1)]:
                x = torch.randn(shape).to(dt).contiguous(memory_format=torch.channels_last)
                w = torch.randn(33, shape[1], 1, 1).to(dt)
                y = torch.ops.segnext_C.conv1x1_forward(x, w, None, "gelu", None, None)
                assert torch.isfinite(y).all(), (dt, shape)
        print("ok")
    """)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_conv1x1_opcheck_and_compile(fmt):
    x, w, b, r, s = conv_inputs(2, 6, 5, 3, 10, fmt=FORMATS[fmt])
    torch.library.opcheck(torch.ops.segnext.conv1x1.default, (x, w, b, "gelu", r, s, "cpu"))
    fn = torch.compile(lambda t: sk.conv1x1(t, w, b, act="relu", residual=r, scale=s,
                                            backend="cpu"), fullgraph=True, backend="eager")
    with torch.no_grad():
        assert rel_err(fn(x), sk.conv1x1_ref(x.double(), w.double(), b.double(), "relu",
                                              r.double(), s.double())) <= 1e-5

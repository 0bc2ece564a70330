"""The CPU NMF2D kernel (csrc/cpu/nmf2d_cpu.cpp, inference only) against the float64 reference.

Odd shapes (D not a multiple of the 16-lane vectors, R > N, N = 1, S > 1 groups, 0 steps),
both memory formats, float32 / float64 and half-precision inputs, 1-3 threads (bitwise equal),
poisoned outputs and scratch, the non-negativity check, bad arguments, the functional and the
model's head routed to it (the dispatch counter proves it ran), torch.compile and opcheck.
"""
import pytest
import torch

import segnext_kernels as sk
from segnext_kernels.nmf2d.reference import nmf_decompose_ref
from utils import FORMATS, rel_err, run_poisoned

pytestmark = pytest.mark.skipif("cpu" not in sk.op_backends().get("nmf2d", ()),
                                reason="segnext_kernels._C has no CPU NMF kernel: "
                                       + sk.available_backends()["cpu"].reason)

# (B, C, H, W, S, R, steps)
SHAPES = [(1, 16, 8, 8, 1, 4, 7), (2, 33, 5, 7, 1, 20, 3), (1, 12, 3, 3, 2, 5, 7),
          (2, 8, 1, 1, 1, 3, 1), (1, 6, 4, 4, 3, 2, 0), (1, 40, 13, 11, 2, 17, 2),
          (3, 64, 6, 5, 1, 16, 7)]


def make(B, C, H, W, S, R, dtype=torch.float32, fmt=torch.channels_last, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, C, H, W, generator=gen, dtype=torch.float64) * 3 + 0.01)
    bases = sk.draw_bases(B * S, C // S, R, device="cpu", generator=gen, dtype=torch.float64)
    return x.to(dtype).contiguous(memory_format=fmt), bases


def reference(x, bases, S, steps):
    B, C, H, W = x.shape
    X = x.double().reshape(B * S, C // S, H * W)
    return nmf_decompose_ref(X, bases.double(), steps).reshape(B, C, H, W)


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_reference(shape, fmt, nthreads, threads):
    threads(nthreads)
    B, C, H, W, S, R, steps = shape
    x, bases = make(B, C, H, W, S, R, fmt=FORMATS[fmt])
    y = torch.ops.segnext_C.nmf2d_forward(x, bases.float(), S, steps, 1e-6, 1.0)
    assert y.dtype == torch.float32 and y.stride() == torch.empty_like(x).stride()
    assert rel_err(y, reference(x, bases, S, steps)) <= 1e-4


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_float64_matches_reference(fmt):
    x, bases = make(2, 33, 5, 7, 1, 20, dtype=torch.float64, fmt=FORMATS[fmt])
    y = torch.ops.segnext_C.nmf2d_forward(x, bases, 1, 3, 1e-6, 1.0)
    assert y.dtype == torch.float64 and rel_err(y, reference(x, bases, 1, 3)) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_read_as_they_are(dtype):
    # The reconstruction is float32, from the half values themselves (no float32 copy first).
    x, bases = make(1, 40, 13, 11, 2, 17, dtype=dtype)
    y = torch.ops.segnext_C.nmf2d_forward(x, bases.float(), 2, 5, 1e-6, 1.0)
    assert y.dtype == torch.float32
    assert rel_err(y, reference(x.double(), bases, 2, 5)) <= 1e-4


def test_large_shapes_and_inv_t():
    # The SegNeXt-T head at a 256x256 input (D=256, R=16), several chunks and slots per item;
    # inv_t != 1 changes only the softmax init.
    x, bases = make(1, 256, 32, 40, 1, 16)
    for inv_t in (1.0, 0.5):
        y = torch.ops.segnext_C.nmf2d_forward(x, bases.float(), 1, 7, 1e-6, inv_t)
        X = x.double().reshape(1, 256, -1)
        ref = nmf_decompose_ref(X, bases, 7, 1e-6, inv_t).reshape(x.shape)
        assert rel_err(y, ref) <= 1e-4, inv_t


def test_bitwise_identical_across_threads(threads):
    x, bases = make(2, 64, 37, 29, 1, 16)
    runs = []
    for n in (1, 2, 3):
        threads(n)
        runs.append(torch.ops.segnext_C.nmf2d_forward(x, bases.float(), 1, 7, 1e-6, 1.0))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_poisoned_outputs_are_overwritten():
    # SEGNEXT_POISON=1 (in a fresh interpreter): the output and the coef state start as NaN.
    run_poisoned("""
        import torch, segnext_kernels as sk
        from segnext_kernels.nmf2d.reference import nmf_decompose_ref
        torch.manual_seed(0)
        for (B, C, H, W, S, R, steps), fmt in [((2, 33, 5, 7, 1, 20, 3), torch.channels_last),
                                               ((1, 12, 3, 3, 2, 5, 7), torch.contiguous_format),
                                               ((1, 64, 40, 33, 1, 16, 2), torch.channels_last)]:
            for dt in (torch.float32, torch.float64):
                x = (torch.rand(B, C, H, W, dtype=dt) + 0.1).contiguous(memory_format=fmt)
                bases = sk.draw_bases(B * S, C // S, R, device="cpu", dtype=dt)
                y = torch.ops.segnext_C.nmf2d_forward(x, bases, S, steps, 1e-6, 1.0)
                assert torch.isfinite(y).all(), (B, C, H, W, dt)
                ref = nmf_decompose_ref(x.double().reshape(B * S, C // S, H * W), bases.double(),
                                        steps).reshape(B, C, H, W)
                assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4
        print("ok")
    """)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_negative_or_nan_input_as_the_reference(bad):
    """Values are not checked (no host read, as every backend): NaN in its sample gives NaN out
    there and nowhere else; a negative entry is decomposed as the reference does."""
    x, bases = make(2, 16, 6, 6, 1, 4)
    x[1, 5, 3, 2] = bad
    y = torch.ops.segnext_C.nmf2d_forward(x, bases.float(), 1, 2, 1e-6, 1.0)
    ref = reference(x, bases, 1, 2)
    assert torch.isfinite(y[0]).all()
    if bad != bad:
        assert torch.isnan(y[1]).any()
    else:
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_bad_arguments_raise_clear_errors():
    x, bases = make(1, 16, 6, 6, 1, 4)
    b = bases.float()
    op = torch.ops.segnext_C.nmf2d_forward
    with pytest.raises(ValueError, match="x must be 4-D"):
        op(x[0], b, 1, 2, 1e-6, 1.0)
    with pytest.raises(ValueError, match="S must be >= 1 and divide C = 16"):
        op(x, b, 3, 2, 1e-6, 1.0)
    with pytest.raises(ValueError, match=r"bases must have shape \(B\*S, D, R\) = \(1, 16, R\)"):
        op(x, b[:, :8], 1, 2, 1e-6, 1.0)
    with pytest.raises(TypeError, match="bases must be Float"):
        op(x, bases, 1, 2, 1e-6, 1.0)
    with pytest.raises(TypeError, match="x must be float32, float64"):
        op(x.to(torch.int32), b, 1, 2, 1e-6, 1.0)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        op(x, b, 1, -1, 1e-6, 1.0)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        op(x, b, 1, 2, float("nan"), 1.0)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        op(x, b, 1, 2, 0.0, 1.0)
    with pytest.raises(ValueError, match="inv_t must be finite"):
        op(x, b, 1, 2, 1e-6, float("inf"))
    with pytest.raises(ValueError, match="x must not be empty"):
        op(x[:, :, :0], b, 1, 2, 1e-6, 1.0)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_functional_runs_the_cpu_kernel_for_inference(fmt):
    x, bases = make(2, 12, 5, 6, 2, 3, fmt=FORMATS[fmt])
    bases = bases.float()
    with sk.record_kernels() as ran:
        y = sk.nmf2d(x, R=3, steps=4, S=2, bases=bases)  # auto
    assert ran[("nmf2d", "cpu")] == 1 and ("nmf2d", "reference") not in ran
    assert y.dtype == x.dtype and rel_err(y, reference(x, bases, 2, 4)) <= 1e-4
    # With a gradient to compute, the reference runs (the kernel has no backward).
    xg = x.clone().requires_grad_()
    with sk.record_kernels() as ran:
        sk.nmf2d(xg, R=3, steps=4, S=2, bases=bases, backend="cpu").sum().backward()
    assert ran[("nmf2d", "reference")] == 1 and ("nmf2d", "cpu") not in ran
    assert xg.grad is not None


def test_functional_bfloat16_returns_bfloat16():
    x, bases = make(1, 32, 7, 9, 1, 8, dtype=torch.bfloat16)
    with torch.no_grad(), sk.record_kernels() as ran:
        y = sk.nmf2d(x, R=8, steps=7, bases=bases.float(), backend="cpu")
    assert ran[("nmf2d", "cpu")] == 1
    assert y.dtype == torch.bfloat16 and rel_err(y, reference(x.double(), bases, 1, 7)) <= 1e-2


def test_head_uses_the_cpu_kernel_and_matches_the_reference():
    import segnext
    torch.manual_seed(0)
    model = segnext.segnext_t(num_classes=19).eval().to(memory_format=torch.channels_last)
    img = torch.randn(1, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    bases = sk.draw_bases(1, 256, 16, device="cpu")
    with torch.no_grad():
        with sk.record_kernels() as ran:
            got = model(img, bases=bases)
        with sk.use_backend("reference"):
            want = model(img, bases=bases)
    assert ran[("nmf2d", "cpu")] == 1
    assert rel_err(got, want.double()) <= 1e-4


def test_compiles_without_graph_breaks():
    x, bases = make(1, 16, 6, 5, 1, 4)
    bases = bases.float()
    fn = torch.compile(lambda t: sk.nmf2d(t, R=4, steps=3, bases=bases, backend="cpu"),
                       fullgraph=True, backend="eager")
    with torch.no_grad():
        assert rel_err(fn(x), reference(x, bases, 1, 3)) <= 1e-4


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_opcheck(fmt):
    x, bases = make(1, 20, 5, 3, 2, 4, fmt=FORMATS[fmt])
    torch.library.opcheck(torch.ops.segnext.nmf2d_inference.default, (x, bases.float(), 2, 3, 1e-6, 1.0))

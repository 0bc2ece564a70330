"""The fused C++ CPU kernels of MSCA (csrc/cpu/msca_cpu.cpp) against the float64 reference.

Forward and every gradient, on odd shapes, both memory formats, 1 and 2 threads, float32 /
bfloat16 / float16 / float64; gradcheck and opcheck through the public op; poisoned outputs;
determinism (bitwise, also across thread counts); the public module path; bad input.
"""
import pytest
import torch

import segnext_kernels as sk
from segnext_kernels.msca.reference import MSCAWeights, weight_shapes
from utils import (FORMATS, check_all_close, msca_inputs, msca_reference, output_and_grads, rel_err,
                   run_poisoned)

pytestmark = pytest.mark.skipif(
    "cpu" not in sk.op_backends().get("msca", ()),
    reason="segnext_kernels._C has no CPU kernel for msca: " + sk.available_backends()["cpu"].reason)

NAMES = ("out", "grad_u") + tuple("grad_" + n for n in MSCAWeights._fields)


def fused(u, ws, g):
    """Output and the 17 gradients through the public op (autograd -> msca_forward / msca_backward)."""
    return output_and_grads(lambda *t: sk.msca(*t, backend="cpu"), [u, *ws], g)


# A covering subset of H, W in {1, 2, 5, 11, 23, 64} and C in {1, 3, 17, 64}: every value of
# each, H or W below the largest kernel (21), primes, a 1-wide image, bands split by threads.
SHAPES = [
    (1, 1, 1, 1),
    (2, 3, 1, 64),
    (1, 17, 64, 1),
    (2, 3, 2, 5),
    (1, 17, 5, 11),
    (2, 64, 11, 23),
    (1, 3, 23, 2),
    (1, 1, 64, 5),
    (2, 17, 23, 64),
    (1, 64, 64, 11),
]


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_reference(shape, fmt, nthreads, threads):
    threads(nthreads)
    u, ws, g = msca_inputs(*shape, dtype=torch.float32, fmt=FORMATS[fmt])
    got = fused(u, ws, g)
    assert got[0].dtype == torch.float32
    assert got[0].stride() == torch.empty_like(u).stride()
    check_all_close(NAMES, got, msca_reference(u, ws, g), 1e-4,
                    f"{shape} {fmt} threads={nthreads}")


@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_many_bands(nthreads, threads):
    # Tall single images: the rows are split into bands whose halos (22+2 rows in the
    # backward) cross several band boundaries.
    threads(nthreads)
    for shape in [(1, 8, 100, 9), (3, 5, 47, 3)]:
        u, ws, g = msca_inputs(*shape, dtype=torch.float32)
        check_all_close(NAMES, fused(u, ws, g), msca_reference(u, ws, g), 1e-4,
                        f"{shape} threads={nthreads}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", [(2, 17, 11, 23), (1, 64, 23, 5), (1, 3, 2, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_low_precision_matches_reference(shape, fmt, dtype):
    # Storage in bf16/fp16, float32 inside: the error is about one rounding of each result
    # (bf16: 2^-9 ~ 2e-3 relative), against the reference run on the rounded inputs.
    u, ws, g = msca_inputs(*shape, dtype=dtype, fmt=FORMATS[fmt])
    got = fused(u, ws, g)
    assert all(t.dtype == dtype for t in got)
    check_all_close(NAMES, got, msca_reference(u, ws, g), 1e-2, f"{shape} {fmt} {dtype}")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_float64_matches_reference(fmt):
    u, ws, g = msca_inputs(2, 17, 23, 11, dtype=torch.float64, fmt=FORMATS[fmt])
    check_all_close(NAMES, fused(u, ws, g), msca_reference(u, ws, g), 1e-12, fmt)


def test_gradcheck():
    u, ws, _ = msca_inputs(1, 3, 6, 5, dtype=torch.float64)
    inputs = [u.requires_grad_()] + [w.requires_grad_() for w in ws]
    assert torch.autograd.gradcheck(lambda *t: sk.msca(*t, backend="cpu"), inputs,
                                    eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_opcheck(fmt):
    u, ws, _ = msca_inputs(2, 3, 5, 7, dtype=torch.float32, fmt=FORMATS[fmt])
    args = (u.requires_grad_(), [w.requires_grad_() for w in ws], "cpu")
    torch.library.opcheck(torch.ops.segnext.msca.default, args)


def test_raw_ops_strides_and_dtype():
    # The C++ ops return tensors with empty_like(u)'s strides (what the fakes promise),
    # including ambiguous layouts (C == 1, H == W == 1) and a non-contiguous view of u.
    for shape, fmt in [((2, 1, 5, 7), torch.channels_last), ((2, 5, 1, 1), torch.channels_last),
                       ((1, 3, 4, 6), torch.contiguous_format), ((2, 20, 3, 4), torch.channels_last)]:
        u, ws, g = msca_inputs(*shape, dtype=torch.float32, fmt=fmt)
        out = torch.ops.segnext_C.msca_forward(u, ws)
        grads = torch.ops.segnext_C.msca_backward(g, u, ws)
        assert out.stride() == torch.empty_like(u).stride()
        assert grads[0].stride() == torch.empty_like(u).stride()
        assert [t.shape for t in grads[1:]] == [w.shape for w in ws]
    u, _, g = msca_inputs(2, 6, 9, 12, dtype=torch.float32)
    _, ws, _ = msca_inputs(2, 3, 9, 11, dtype=torch.float32)
    view = u[:, ::2, :, 1:]  # strided in C and offset in W
    ref = msca_reference(view, ws, g[:, ::2, :, 1:])
    out = torch.ops.segnext_C.msca_forward(view, ws)
    assert out.stride() == torch.empty_like(view).stride()
    assert rel_err(out, ref[0]) <= 1e-4
    grads = torch.ops.segnext_C.msca_backward(g[:, ::2, :, 1:], view, ws)
    check_all_close(NAMES, [out] + list(grads), ref, 1e-4, "strided view")


def test_empty_batch():
    u, ws, g = msca_inputs(0, 4, 5, 6, dtype=torch.float32)
    assert torch.ops.segnext_C.msca_forward(u, ws).shape == u.shape
    grads = torch.ops.segnext_C.msca_backward(g, u, ws)
    assert grads[0].shape == u.shape and all((t == 0).all() for t in grads[1:])


def test_poisoned_outputs_are_overwritten():
    # SEGNEXT_POISON=1 makes the C++ ops fill their outputs with NaN before computing (here set
    # in the environment of a fresh interpreter, the way users set it): every element of every
    # output must be written.
    run_poisoned("""
        from segnext_kernels.msca.reference import msca_ref, weight_shapes
        for u, dt in poisoned_inputs([((2, 17, 11, 23), torch.channels_last),
                                      ((1, 3, 2, 64), torch.contiguous_format),
                                      ((1, 64, 40, 7), torch.channels_last),
                                      ((1, 1, 1, 1), torch.contiguous_format)]):
            g = torch.randn_like(u)
            ws = [(torch.randn(s) * 0.3).to(dt) for s in weight_shapes(u.shape[1])]
            out = torch.ops.segnext_C.msca_forward(u, ws)
            grads = torch.ops.segnext_C.msca_backward(g, u, ws)
            assert all(torch.isfinite(t).all() for t in [out, *grads]), (u.shape, dt)
            err = rel_err(out, msca_ref(u.double(), *[w.double() for w in ws]))
            assert err < (1e-2 if dt == torch.bfloat16 else 1e-4), (u.shape, dt, err)
        print("ok")
    """)


def test_poison_flag_is_handed_to_the_library():
    # SEGNEXT_POISON is read in _env.py and handed to _C when it loads; tests flip it in process.
    from segnext_kernels import _env, _extension
    assert _extension._C.poison() == _env.poison()
    u, ws, g = msca_inputs(1, 5, 7, 9, dtype=torch.float32, fmt=torch.channels_last)
    was = _extension._C.poison()
    try:
        _extension.set_poison(True)
        assert _extension._C.poison()
        out = torch.ops.segnext_C.msca_forward(u, ws)
        grads = torch.ops.segnext_C.msca_backward(g, u, ws)
        assert all(torch.isfinite(t).all() for t in [out, *grads])
    finally:
        _extension.set_poison(was)
    assert _extension._C.poison() == was


def test_cxx_weight_contract_matches_python():
    # csrc/msca_weights.h and segnext_kernels/msca/reference.py state the same 16 tensors.
    from segnext_kernels import _extension
    for C in (1, 6):
        assert _extension._C.msca_weights(C) == list(zip(MSCAWeights._fields, weight_shapes(C)))


@pytest.mark.parametrize("shape", [(2, 20, 37, 30), (1, 64, 70, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_deterministic_across_runs_and_threads(shape, threads):
    # Weight gradients are summed per fixed slot of rows and the slots in a fixed order, so
    # results are bitwise equal run to run and for any number of threads.
    u, ws, g = msca_inputs(*shape, dtype=torch.float32, fmt=torch.channels_last)
    runs = {}
    for nt in (1, 2, 2, 3):
        threads(nt)
        res = [torch.ops.segnext_C.msca_forward(u, ws)] + list(torch.ops.segnext_C.msca_backward(g, u, ws))
        if nt in runs:
            assert all(torch.equal(a, b) for a, b in zip(runs[nt], res)), f"threads={nt} rerun"
        runs[nt] = res
    for nt in (2, 3):
        for name, a, b in zip(NAMES, runs[1], runs[nt]):
            assert torch.equal(a, b), f"{name}: 1 thread and {nt} threads differ"


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_module_path(fmt):
    torch.manual_seed(0)
    C = 17
    module = sk.MSCA(C)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    u = torch.randn(2, C, 13, 9).contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    g = torch.randn_like(u)
    with sk.use_backend("cpu"):
        out = module(u)
    out.backward(g)
    got = [out.detach(), u.grad] + [p.grad for p in module.weights()]
    check_all_close(NAMES, got, msca_reference(u, module.weights(), g), 1e-4, fmt)


def test_bad_input_raises_clear_error():
    u, ws, _ = msca_inputs(1, 4, 5, 5, dtype=torch.float32)
    bad = list(ws)
    bad[2] = torch.zeros(4, 1, 1, 5)  # w0_1 must be (4, 1, 1, 7)
    with pytest.raises(ValueError, match="w0_1"):
        sk.msca(u, *bad, backend="cpu")
    with pytest.raises(RuntimeError, match=r"msca_forward: w0_1 must have shape \[4, 1, 1, 7\]"):
        torch.ops.segnext_C.msca_forward(u, bad)
    with pytest.raises(RuntimeError, match="msca_backward: w0_1 must have shape"):
        torch.ops.segnext_C.msca_backward(u, u, bad)
    with pytest.raises(RuntimeError, match="msca_forward: u must be a 4-D tensor"):
        torch.ops.segnext_C.msca_forward(u[0], ws)
    with pytest.raises(RuntimeError, match="b3 has dtype"):
        torch.ops.segnext_C.msca_forward(u, [*ws[:-1], ws[-1].double()])
    with pytest.raises(RuntimeError, match="msca_backward: grad must have u's shape"):
        torch.ops.segnext_C.msca_backward(u[:, :, :4], u, ws)

"""Triton MSCA kernels (segnext_kernels/msca/triton.py) against the float64 reference.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py), where
one program instance costs tens of ms per image row, so the shapes stay small: a pairwise cover
of H, W in {1, 3, 7, 20, 33}, C in {1, 5, 16, 40}, both memory formats and float32/float16,
plus one case with small tiles that crosses tile seams in rows, columns and channel blocks.
Every kernel test runs with ``SEGNEXT_POISON=1``: outputs and temporaries start as NaN, so an element a
kernel forgets to write shows up as NaN. bfloat16 and the default (large) GPU tiles are tested
only on a GPU (``@pytest.mark.gpu``): the interpreter has no bfloat16 arithmetic.
"""
import pytest
import torch

import segnext_kernels
from segnext_kernels.msca import triton as mt
from segnext_kernels.msca.reference import MSCAWeights, msca_ref

import compile_launches
from utils import check_close, msca_inputs, msca_reference

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GRAD_NAMES = ("u",) + MSCAWeights._fields


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every kernel output and temporary starts as NaN; tile overrides are per test."""
    monkeypatch.setenv("SEGNEXT_POISON", "1")
    monkeypatch.setattr(mt, "TILES", {})


def make_inputs(B, C, H, W, dtype=torch.float32, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return msca_inputs(B, C, H, W, dtype, fmt, device=DEV)


def check_kernels(u, ws, g):
    """msca_forward and msca_backward against the reference; layouts and dtypes of the results."""
    tol = TOL[u.dtype]
    ref_out, *ref_grads = msca_reference(u, ws, g)
    out = mt.msca_forward(u, *ws)
    assert out.dtype == u.dtype and out.stride() == u.stride()
    check_close("out", out, ref_out, tol)
    grads = mt.msca_backward(g, u, *ws)
    assert len(grads) == 17
    assert grads[0].stride() == u.stride()
    for name, x, like, r in zip(GRAD_NAMES, grads, [u] + ws, ref_grads):
        assert x.dtype == like.dtype and x.shape == like.shape, name
        check_close(f"grad {name}", x, r, tol)
    return grads


# pairwise cover: every H meets every W and C at least once across the cases, each layout with
# both dtypes; batch 2 in a few
CASES = [
    # B, C, H, W, dtype, channels_last
    (2, 1, 1, 33, torch.float32, False),
    (1, 5, 3, 20, torch.float16, True),
    (1, 16, 7, 1, torch.float16, False),
    (1, 40, 3, 7, torch.float32, True),
    (1, 5, 20, 3, torch.float32, False),
    (1, 16, 33, 7, torch.float32, True),
    (1, 1, 7, 20, torch.float16, True),
    (2, 40, 1, 1, torch.float16, False),
    (1, 5, 1, 7, torch.float32, True),
]


@pytest.mark.parametrize("B,C,H,W,dtype,cl", CASES,
                         ids=[f"B{c[0]}C{c[1]}H{c[2]}W{c[3]}-{str(c[4])[6:]}-{'cl' if c[5] else 'nchw'}"
                              for c in CASES])
def test_kernels_match_reference(B, C, H, W, dtype, cl):
    u, ws, g = make_inputs(B, C, H, W, dtype, cl)
    check_kernels(u, ws, g)


def test_tile_seams_persistent_loop():
    """Small tiles: 2 row tiles x 2 column tiles x 2 channel blocks, and fewer programs than tiles,
    so programs walk several tiles (the persistent loop and its scratch reuse)."""
    small = dict(TH=8, TW=8, BC=4)
    mt.TILES.update(dw=small, strip_bwd=small, dw5_bwd=small, max_programs=3,
                    gemm=dict(BM=16))
    u, ws, g = make_inputs(1, 6, 12, 11, torch.float32, channels_last=True)
    check_kernels(u, ws, g)


@pytest.mark.parametrize("dtype,cl", [(torch.float32, False), (torch.float16, True)])
def test_gpu_depthwise_tiles(dtype, cl):
    """The depthwise kernels with their GPU tiles (the ones compile_launches.py compiles for
    sm_80/sm_90): several column tiles and channel blocks, a partial last column tile."""
    for which in ("dw", "strip_bwd", "dw5_bwd"):
        cfg = mt._dw_tiles(64, which, gpu=True)
        mt.TILES[which] = {k: cfg[k] for k in ("TH", "TW", "BC")}
    u, ws, g = make_inputs(1, 3, 9, 37, dtype, channels_last=cl)
    check_kernels(u, ws, g)


def test_deterministic_weight_grads():
    """Weight gradients are reduced in a fixed order: two runs are bitwise equal."""
    u, ws, g = make_inputs(2, 3, 3, 9)
    mt.TILES.update(dw=dict(TW=8), strip_bwd=dict(TW=8), dw5_bwd=dict(TW=8))  # 2 column tiles
    first = mt.msca_backward(g, u, *ws)
    second = mt.msca_backward(g, u, *ws)
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), name


def test_poison_switch_fills_nan():
    assert torch.isnan(mt._empty(torch.empty(3, 4))).all()
    assert torch.isnan(mt._scratch(5, torch.device("cpu"))).all()


def test_non_standard_strides():
    """A u that is neither contiguous nor channels_last still gives the right answer."""
    u, ws, g = make_inputs(1, 3, 4, 6)
    u_odd = u.transpose(2, 3).contiguous().transpose(2, 3)   # W-major pixels
    ref_out = msca_reference(u, ws, g)[0]
    out = mt.msca_forward(u_odd, *ws)
    assert out.stride() == torch.empty_like(u_odd).stride()
    check_close("out", out, ref_out, 1e-4)


# --------------------------------------------------------------------------------------------
# through the public API and the custom op
# --------------------------------------------------------------------------------------------
def test_public_functional_and_autograd():
    u, ws, g = make_inputs(1, 4, 5, 6, channels_last=True)
    ref_out, *ref_grads = msca_reference(u, ws, g)
    ut = u.clone().requires_grad_()
    wt = [w.clone().requires_grad_() for w in ws]
    with segnext_kernels.use_backend("triton"):
        out = segnext_kernels.msca(ut, *wt)
    assert out.is_contiguous(memory_format=torch.channels_last)
    check_close("out", out.detach(), ref_out, 1e-4)
    out.backward(g)
    for name, t, r in zip(GRAD_NAMES, [ut] + wt, ref_grads):
        check_close(f"grad {name}", t.grad, r, 1e-4)


def test_public_module():
    torch.manual_seed(1)
    m = segnext_kernels.MSCA(3).to(DEV)
    u = torch.randn(2, 3, 4, 5, device=DEV, requires_grad=True)
    ref = msca_ref(u.double(), *[p.double() for p in m.weights()])
    with segnext_kernels.use_backend("triton"):
        out = m(u)
    check_close("out", out.detach(), ref.detach(), 1e-4)
    out.square().sum().backward()
    ud = u.detach().double().requires_grad_()
    wd = [p.detach().double().requires_grad_() for p in m.weights()]
    msca_ref(ud, *wd).square().sum().backward()
    check_close("grad u", u.grad, ud.grad, 1e-4)
    for p, r in zip(m.weights(), wd):
        check_close("grad param", p.grad, r.grad, 1e-4)


def test_opcheck():
    """All opcheck sub-tests run (schema, autograd registration, fake tensor, aot dispatch)."""
    u, ws, _ = make_inputs(1, 2, 3, 4)
    args = (u.requires_grad_(), [w.requires_grad_() for w in ws], "triton")
    result = torch.library.opcheck(torch.ops.segnext.msca.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_torch_compile_fullgraph():
    """A small module around the op compiles with fullgraph (fake-tensor tracing of the custom op
    and its autograd) and matches. The backend is named in the call: ``use_backend`` reads a
    ContextVar, which dynamo cannot trace (see backends.py)."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    m = segnext_kernels.MSCA(3).to(DEV)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = m

        def forward(self, x):
            return segnext_kernels.msca(x, *self.attn.weights(), backend="triton") + x

    compiled = torch.compile(Net(), fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 3, 4, 6, device=DEV).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = compiled(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = msca_ref(x.double(), *[p.double() for p in m.weights()]) + x.double()
    check_close("compiled out", out.detach(), ref.detach(), 1e-4)
    out.sum().backward()
    xd = x.detach().double().requires_grad_()
    wd = [p.detach().double().requires_grad_() for p in m.weights()]
    (msca_ref(xd, *wd) + xd).sum().backward()
    check_close("compiled grad x", x.grad, xd.grad, 1e-4)
    for p, r in zip(m.weights(), wd):
        check_close("compiled grad param", p.grad, r.grad, 1e-4)


def test_saved_for_backward_is_only_u():
    """The op saves u (and the weights): distinct saved storages <= 2x u's bytes."""
    u, ws, _ = make_inputs(1, 16, 16, 16)
    u.requires_grad_()
    wt = [w.requires_grad_() for w in ws]
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with segnext_kernels.use_backend("triton"):
            out = segnext_kernels.msca(u, *wt)
    assert u.untyped_storage().data_ptr() in storages   # u itself, not a copy
    u_bytes = u.numel() * u.element_size()
    assert sum(storages.values()) <= 2 * u_bytes, (sum(storages.values()), u_bytes)
    del out


# --------------------------------------------------------------------------------------------
# compile-only check for A100s and H100s (sm_80, sm_90) on a machine without a GPU
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests compile and run the kernels for real")
def test_kernels_compile_for_sm80_and_sm90():
    """The interpreter accepts code the compiler rejects: compile every kernel launch the
    launchers make, with their GPU tiles and warps, for every dtype and both memory formats
    (tests/compile_launches.py), for sm_80 and sm_90 with this Triton: no error, no register
    spill, shared memory within an A100's."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    results = compile_launches.compile_in_subprocesses("msca")
    compile_launches.check_results(results, compile_launches.MSCA_KERNELS)


# --------------------------------------------------------------------------------------------
# GPU only: bfloat16 and the default (large) tiles on bigger shapes
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("shape", [(2, 64, 40, 70), (1, 5, 3, 130), (3, 40, 150, 9)])
def test_gpu_default_tiles(shape, dtype, cl):
    u, ws, g = make_inputs(*shape, dtype=dtype, channels_last=cl)
    check_kernels(u, ws, g)


@pytest.mark.gpu
def test_gpu_public_api_bf16():
    u, ws, g = make_inputs(2, 32, 17, 23, torch.bfloat16, channels_last=True)
    ref_out = msca_reference(u, ws, g)[0]
    with segnext_kernels.use_backend("triton"):
        out = segnext_kernels.msca(u, *ws)
    check_close("out", out, ref_out, 1e-2)

"""The MSCAN MLP, ``fc2(gelu(dw3x3(fc1(x))))``, as one fused inference op
(csrc/cpu/mlp_cpu.cpp) against its float64 reference; its depthwise conv + GELU alone:
tests/test_dwconv_gelu.py.

Forward on odd shapes (H or W of 1, 2, primes), both memory formats, 1-3 threads, float32 /
bfloat16 / float16 / float64; the gradient path (fc1 -> dwconv_gelu -> fc2) when autograd needs
it; torch.compile; poisoned outputs and scratch; autocast; bad input; the model's Mlp modules
with the cpu backend against the reference backend; an eval-mode Block folded into the fused
MLP.
"""
import pytest
import torch

import segnext_kernels as sk
from segnext_kernels.mlp import mlp, mlp_ref
from utils import FORMATS, output_and_grads, rel_err, run_poisoned

pytestmark = pytest.mark.skipif(
    "cpu" not in sk.op_backends().get("dwconv_gelu", ()) or "cpu" not in sk.op_backends().get("mlp", ()),
    reason="segnext_kernels._C has no CPU kernels for dwconv_gelu/mlp: "
           + sk.available_backends()["cpu"].reason)


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
    g = torch.randn_like(x)
    y, *got = output_and_grads(lambda *t: mlp(*t, backend="cpu"), [x, *ws], g)
    yr, *want = output_and_grads(mlp_ref, [x, *ws], g, torch.float64)
    assert rel_err(y, yr) <= 1e-4
    for i, (a, r) in enumerate(zip(got, want)):
        assert rel_err(a, r) <= 1e-4, f"gradient {i}"


def test_mlp_compiles_without_graph_breaks():
    x, ws = make_mlp(1, 4, 6, 5, 2, dtype=torch.float32, fmt=torch.channels_last)
    fn = torch.compile(lambda *t: mlp(*t, backend="cpu"), fullgraph=True, backend="eager")
    with torch.no_grad():
        assert rel_err(fn(x, *ws), mlp_ref(x.double(), *[w.double() for w in ws])) <= 1e-4


def test_poisoned_outputs_are_overwritten():
    # SEGNEXT_POISON=1 (in a fresh interpreter): the output and the MLP's scratch start as NaN.
    run_poisoned("""
        from segnext_kernels.mlp import mlp_ref
        for x, dt in poisoned_inputs():
            C = x.shape[1]
            ws = [(torch.randn(s) * 0.3).to(dt) for s in
                  [(3 * C, C, 1, 1), (3 * C,), (3 * C, 1, 3, 3), (3 * C,), (C, 3 * C, 1, 1), (C,)]]
            y = torch.ops.segnext_C.mlp_forward(x, ws)
            assert torch.isfinite(y).all(), (x.shape, dt)
            ref = mlp_ref(x.double(), *[t.double() for t in ws])
            assert rel_err(y, ref) < (1e-2 if dt == torch.bfloat16 else 1e-4), (x.shape, dt)
        print("ok")
    """)


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
    xm, ws = make_mlp(1, 8, 6, 7, 4, dtype=torch.float32, fmt=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ym = mlp(xm, *ws, backend="cpu")
    assert ym.dtype == torch.bfloat16
    bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    assert rel_err(ym, mlp_ref(bf(xm), *[bf(t) for t in ws])) <= 2e-2

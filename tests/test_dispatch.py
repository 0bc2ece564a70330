"""One dispatch path: names, devices, fallbacks, checked-before-trusted, the auto rules, and
which kernel ran.

Every public op goes through segnext_kernels.dispatch.select; these tests hold each op to the
same rules and messages, and prove with ``record_kernels`` which kernel actually ran.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import segnext_kernels as sk
from segnext_kernels import _extension, backends, dispatch, ops, selftest
from segnext_kernels._strip_conv import strip_conv
from segnext_kernels.dispatch import Problem
from segnext_kernels.msca.reference import weight_shapes

HAS_CPU_KERNELS = sk.available_backends()["cpu"].available
needs_cpu = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="segnext_kernels._C is not built")


@pytest.fixture(autouse=True)
def _fresh_checks():
    dispatch.reset_checks()
    yield
    dispatch.reset_checks()


def _msca_inputs(shape=(1, 6, 9, 11), dtype=torch.float32, layout=torch.contiguous_format):
    u = torch.randn(shape, dtype=dtype).contiguous(memory_format=layout)
    ws = [torch.randn(s, dtype=dtype) * 0.3 for s in weight_shapes(shape[1])]
    return u, ws


def _mlp_inputs(C=4, hidden=9, shape=(1, 4, 6, 5)):
    x = torch.randn(shape)
    ws = [torch.randn(s) * 0.3 for s in [(hidden, C, 1, 1), (hidden,), (hidden, 1, 3, 3),
                                          (hidden,), (C, hidden, 1, 1), (C,)]]
    return x, ws


def _call(op, backend, device="cpu"):
    """Call the public functional ``op`` with small inputs on ``device`` and ``backend``."""
    if op == "msca":
        u, ws = _msca_inputs()
        return sk.msca(u.to(device), *[w.to(device) for w in ws], backend=backend)
    if op == "dwconv_gelu":
        return sk.dwconv_gelu(torch.randn(1, 3, 5, 4, device=device),
                              torch.randn(3, 1, 3, 3, device=device), torch.randn(3, device=device),
                              backend=backend)
    if op == "mlp":
        x, ws = _mlp_inputs()
        return sk.mlp(x.to(device), *[w.to(device) for w in ws], backend=backend)
    if op == "nmf2d":
        return sk.nmf2d(torch.rand(1, 8, 3, 3, device=device), R=2, steps=1, backend=backend)
    if op == "conv1x1":
        x = torch.randn(1, 4, 5, 6, device=device)
        return sk.conv1x1(x, torch.randn(7, 4, 1, 1, device=device), torch.randn(7, device=device),
                          act="gelu", backend=backend)
    if op == "strip_conv":
        return strip_conv(torch.randn(1, 3, 5, 9, device=device),
                             torch.randn(3, 1, 1, 7, device=device), torch.randn(3, device=device),
                             backend=backend)
    raise AssertionError(op)


OPS = ("msca", "dwconv_gelu", "mlp", "nmf2d", "conv1x1", "strip_conv")


# ---------------------------------------------------------------------------------- names

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["foo", "", "CPU", " cpu", "auto ", 3])
def test_unknown_backend_name_raises_for_every_op(op, name):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference'"):
        _call(op, name)


@pytest.mark.parametrize("name", ["foo", "", "CPU", " cpu", 3, None])
def test_unknown_backend_name_raises_in_set_and_use_backend(name):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference'"):
        sk.set_backend(name)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference'"):
        with sk.use_backend(name):
            pass
    assert sk.get_backend() == "auto"


def test_unavailable_backend_raises_the_same_everywhere():
    st = sk.available_backends()["cuda"]
    if st.available:
        pytest.skip("the cuda backend is available here")
    msg = "backend 'cuda' is not available: " + st.reason[:30]
    with pytest.raises(RuntimeError, match=msg):
        sk.set_backend("cuda")
    with pytest.raises(RuntimeError, match=msg):
        with sk.use_backend("cuda"):
            pass
    for op in OPS:
        with pytest.raises(RuntimeError, match=msg):
            _call(op, "cuda")


def _run(code, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SEGNEXT_BACKEND")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                          timeout=300)


_EVERY_CALL = """
import torch, segnext_kernels as sk
for i in range(2):
    try:
        sk.msca(torch.randn(1, 2, 3, 3), *[torch.randn(s) for s in
                __import__('segnext_kernels.msca.reference', fromlist=['x']).weight_shapes(2)])
        print('ran')
    except Exception as e:
        print(type(e).__name__, e)
"""


@pytest.mark.parametrize("value,error", [("foo", "ValueError SEGNEXT_BACKEND: backend must be one of"),
                                         ("CPU", "ValueError SEGNEXT_BACKEND: backend must be one of"),
                                         ("cuda", "RuntimeError SEGNEXT_BACKEND: backend 'cuda' is not")])
def test_segnext_backend_env_is_refused_at_every_call(value, error):
    if value == "cuda" and sk.available_backends()["cuda"].available:
        pytest.skip("the cuda backend is available here")
    r = _run(_EVERY_CALL, SEGNEXT_BACKEND=value)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(error) for line in lines), r.stdout


def test_segnext_backend_env_selects():
    r = _run("import segnext_kernels as sk; print(sk.get_backend())", SEGNEXT_BACKEND="reference")
    assert r.returncode == 0 and r.stdout.strip() == "reference", r.stderr


def test_triton_without_gpu_or_interpreter_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: triton is available")
    code = ("import torch, segnext_kernels as sk\n"
            "from segnext_kernels.msca.reference import weight_shapes\n"
            "try:\n"
            "    sk.msca(torch.randn(1, 2, 3, 3), *[torch.randn(s) for s in weight_shapes(2)],"
            " backend='triton')\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "backend 'triton' is not available: no CUDA GPU visible and TRITON_INTERPRET" in r.stdout
    assert "active drivers" not in r.stdout + r.stderr


def test_use_backend_restores_and_set_backend_persists():
    assert sk.get_backend() == "auto"
    with sk.use_backend("reference"):
        assert sk.get_backend() == "reference"
    assert sk.get_backend() == "auto"
    sk.set_backend("reference")
    try:
        assert sk.get_backend() == "reference"
    finally:
        sk.set_backend("auto")


# ---------------------------------------------------------------------------------- devices

@needs_cpu
@pytest.mark.parametrize("op", OPS)
def test_explicit_backend_for_another_device_raises_naming_both(op):
    with pytest.raises(ValueError, match=f"backend 'cpu' cannot run {op} on a tensor on meta"):
        _call(op, "cpu", device="meta")
    with sk.use_backend("cpu"):
        with pytest.raises(ValueError, match=f"backend 'cpu' cannot run {op} on a tensor on meta"):
            _call(op, None, device="meta")


@pytest.mark.parametrize("op", ["msca", "dwconv_gelu", "mlp", "conv1x1", "strip_conv"])
def test_auto_and_reference_run_on_any_device(op):
    for name in ("auto", "reference"):
        out = _call(op, name, device="meta")
        assert out.device.type == "meta"


# ---------------------------------------------------------------------------------- fallbacks

def _available_pairs():
    return [(op, b) for op in OPS for b in ("triton", "cuda", "cpu")
            if sk.available_backends()[b].available]


def test_explicit_backend_without_a_kernel_runs_the_reference_for_every_op():
    exercised = 0
    for op, backend in _available_pairs():
        if dispatch.kernel(op, backend) is not None:
            continue
        with sk.record_kernels() as ran:
            _call(op, backend)
        fused = [k for k in ran if k[1] not in ("reference",)]
        assert not fused and ran, (op, backend, ran)
        exercised += 1
    assert exercised or not _available_pairs()


@pytest.mark.skipif(not sk.available_backends()["triton"].available, reason="no triton here")
def test_kernel_that_does_not_take_the_call_runs_the_reference():
    u, ws = _msca_inputs(dtype=torch.float64)  # no float64 Triton kernel
    with sk.record_kernels() as ran:
        out = sk.msca(u, *ws, backend="triton")
    assert ran == {("msca", "reference"): 1}
    torch.testing.assert_close(out, sk.msca_ref(u, *ws))


@needs_cpu
def test_mlp_with_gradients_runs_fc1_dwconv_gelu_fc2():
    x, ws = _mlp_inputs()
    x.requires_grad_()
    with sk.record_kernels() as ran:
        sk.mlp(x, *ws, backend="cpu").sum().backward()
    assert ran[("dwconv_gelu", "cpu")] == 1 and ran[("dwconv_gelu_backward", "cpu")] == 1
    assert ("mlp", "cpu") not in ran


# ---------------------------------------------------------------------------------- auto rules

@needs_cpu
def test_auto_picks_the_cpu_msca_and_records_it():
    u, ws = _msca_inputs(layout=torch.channels_last)
    u.requires_grad_()
    with sk.record_kernels() as ran:
        sk.msca(u, *ws).sum().backward()
    assert ran == {("msca", "cpu"): 1, ("msca_backward", "cpu"): 1}


@needs_cpu
def test_auto_msca_rule_on_tiny_maps_with_many_channels():
    # channels-last inference at <= 16x16 with >= 512 channels: the reference (kernels.py);
    # NCHW, training, or fewer channels there: fused
    def run(C, H, layout, grad):
        u = torch.randn(1, C, H, H).contiguous(memory_format=layout).requires_grad_(grad)
        ws = [torch.randn(s) * 0.1 for s in weight_shapes(C)]
        with sk.record_kernels() as ran:
            with torch.set_grad_enabled(grad):
                sk.msca(u, *ws)
        return set(ran)
    cl, nchw = torch.channels_last, torch.contiguous_format
    assert run(512, 16, cl, False) == {("msca", "reference")}
    assert run(512, 16, nchw, False) == {("msca", "cpu")}
    assert run(512, 16, cl, True) == {("msca", "cpu")}
    assert run(256, 16, cl, False) == {("msca", "cpu")}
    assert run(512, 17, cl, False) == {("msca", "cpu")}


@needs_cpu
def test_auto_takes_the_fused_mlp_for_inference_and_not_with_a_gradient():
    # The fused MLP is faster than eager at every SegNeXt stage (kernels.py): auto takes it for
    # inference at any size and layout; it has no backward, so a gradient runs fc1 -> dwconv_gelu -> fc2.
    small_x, small_ws = _mlp_inputs()
    big_x, big_ws = _mlp_inputs(32, 256, (1, 32, 64, 64))
    big_x = big_x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for x, ws in ((small_x, small_ws), (big_x, big_ws)):
            with sk.record_kernels() as ran:
                out = sk.mlp(x, *ws)
            assert ran == {("mlp", "cpu"): 1}
            torch.testing.assert_close(out, sk.mlp_ref(x, *ws), rtol=1e-4, atol=1e-4)
    xg = small_x.clone().requires_grad_()
    with sk.record_kernels() as ran:
        sk.mlp(xg, *small_ws).sum().backward()
    assert ("mlp", "cpu") not in ran and ran[("dwconv_gelu", "reference")] + \
        ran[("dwconv_gelu", "cpu")] == 1


@needs_cpu
def test_auto_dwconv_gelu_rule_and_explain():
    w, b = torch.randn(3, 1, 3, 3), torch.randn(3)
    big = torch.randn(1, 3, 64, 64, requires_grad=True)           # NCHW from 64x64: fused
    small = torch.randn(1, 3, 6, 5, requires_grad=True)           # NCHW below: the reference
    cl = torch.randn(1, 3, 6, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    with sk.record_kernels() as ran:
        sk.dwconv_gelu(big, w, b).sum().backward()
        sk.dwconv_gelu(small, w, b).sum().backward()
        sk.dwconv_gelu(cl, w, b).sum().backward()                 # channels-last training
        with torch.no_grad():
            sk.dwconv_gelu(cl, w, b)                              # channels-last inference
    assert ran == {("dwconv_gelu", "cpu"): 2, ("dwconv_gelu_backward", "cpu"): 1,
                   ("dwconv_gelu", "reference"): 2}
    p = Problem("dwconv_gelu", cl.device, cl.dtype, "channels_last", tuple(cl.shape), True)
    text = dispatch.explain(p)
    assert "slower than the reference here" in text and text.endswith("-> reference")


def test_op_backends_lists_the_kernel_table():
    table = sk.op_backends()
    assert set(table) == set(OPS)
    for op, names in table.items():
        assert names[0] == "reference"
        for name in names[1:]:
            assert dispatch.kernel(op, name) is not None


# ---------------------------------------------------------------------------------- checked before trusted

def _broken_msca(kind):
    real = ops._msca_kernels

    def kernels(backend):
        fwd, bwd = real(backend)

        if kind == "off_by_a_little":
            return (lambda u, *w: fwd(u, *w) * 1.001), bwd
        if kind == "tail_unwritten":
            def tail(u, *w):
                out = fwd(u, *w)
                out[..., -1] = float("nan")  # what a poisoned, never-written last column holds
                return out
            return tail, bwd
        if kind == "wrong_gradient":
            def bad_bwd(grad, u, *w):
                grads = list(bwd(grad, u, *w))
                grads[-2] = grads[-2] * 1.01  # the 1x1 conv's weight gradient
                return grads
            return fwd, bad_bwd
        if kind == "raises":
            def boom(u, *w):
                raise RuntimeError("PassManager::run failed")
            return boom, bwd
        raise AssertionError(kind)
    return kernels


@needs_cpu
@pytest.mark.parametrize("kind", ["off_by_a_little", "tail_unwritten", "wrong_gradient", "raises"])
def test_broken_kernel_is_caught_reported_once_and_not_used(monkeypatch, kind):
    monkeypatch.setattr(ops, "_msca_kernels", _broken_msca(kind))
    u, ws = _msca_inputs(layout=torch.channels_last)
    u.requires_grad_()
    with pytest.warns(RuntimeWarning, match="the cpu kernel of msca failed its check") as rec:
        with sk.record_kernels() as ran:
            out = sk.msca(u, *ws)
    msg = str(rec[0].message)
    assert "channels_last" in msg and "torch.float32" in msg
    if kind == "raises":
        assert "PassManager::run failed" in msg
    else:
        assert "max relative error" in msg
    assert ran == {("msca", "reference"): 1}
    torch.testing.assert_close(out, sk.msca_ref(u, *ws))
    st = dispatch.status("msca", "cpu", "cpu", torch.float32, "channels_last")
    assert st is not None and not st.ok
    # reported once; an explicit request for the kernel does not get it either
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sk.record_kernels() as ran:
            sk.msca(u, *ws)
            sk.msca(u, *ws, backend="cpu")
            with sk.use_backend("cpu"):
                sk.msca(u, *ws)
    assert ran == {("msca", "reference"): 3}


@needs_cpu
def test_check_runs_once_per_configuration(monkeypatch):
    calls = []
    real = selftest.check

    def counting(*args):
        calls.append(args[:5])
        return real(*args)
    monkeypatch.setattr(selftest, "check", counting)
    for _ in range(3):
        _call("msca", None)
    u, ws = _msca_inputs(layout=torch.channels_last)
    sk.msca(u, *ws)
    sk.msca(u.double(), *[w.double() for w in ws])
    assert [c[4] for c in calls] == ["contiguous", "channels_last", "channels_last"]
    assert [c[3] for c in calls] == [torch.float32, torch.float32, torch.float64]


@needs_cpu
def test_segnext_verify_0_skips_the_check(monkeypatch):
    monkeypatch.setattr(ops, "_msca_kernels", _broken_msca("off_by_a_little"))
    monkeypatch.setenv("SEGNEXT_VERIFY", "0")
    u, ws = _msca_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sk.record_kernels() as ran:
            out = sk.msca(u, *ws)
    assert ran == {("msca", "cpu"): 1}  # the (broken) kernel ran: nothing checked it
    assert not torch.allclose(out, sk.msca_ref(u, *ws), rtol=1e-5, atol=1e-6)


@needs_cpu
def test_broken_kernel_under_torch_compile_is_not_used(monkeypatch):
    monkeypatch.setattr(ops, "_msca_kernels", _broken_msca("off_by_a_little"))
    u, ws = _msca_inputs()
    f = torch.compile(lambda u, *ws: sk.msca(u, *ws), fullgraph=True)
    with pytest.warns(RuntimeWarning, match="failed its check"):
        with sk.record_kernels() as ran:
            out = f(u, *ws)
    assert ("msca", "cpu") not in ran
    torch.testing.assert_close(out, sk.msca_ref(u, *ws))
    torch._dynamo.reset()


@needs_cpu
def test_compiled_model_runs_the_checked_kernel():
    u, ws = _msca_inputs(layout=torch.channels_last)
    f = torch.compile(lambda u, *ws: sk.msca(u, *ws), fullgraph=True)
    with sk.record_kernels() as ran:
        out = f(u, *ws)
        f(u, *ws)
    assert ran == {("msca", "cpu"): 2}  # counted at run time, inside the graph
    torch.testing.assert_close(out, sk.msca_ref(u, *ws), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_checks_do_not_move_the_global_rng():
    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    for op in OPS:
        for backend in ("cpu",):
            k = dispatch.kernel(op, backend)
            if k is not None and sk.available_backends()[backend].available:
                dispatch.run_check(op, backend, "cpu", torch.float32, k.layouts[0])
    assert torch.equal(torch.rand(3), want)


# ---------------------------------------------------------------------------------- custom ops

@needs_cpu
def test_registered_ops_refuse_mixed_devices():
    u, ws = _msca_inputs()
    ws_meta = list(ws)
    ws_meta[14] = ws_meta[14].to("meta")
    with pytest.raises(ValueError, match=r"weights\[14\] is on meta but u is on cpu"):
        torch.ops.segnext.msca(u, ws_meta, "cpu")
    with pytest.raises(ValueError, match=r"weights\[14\] is on meta but u is on cpu"):
        torch.ops.segnext_C.msca_forward(u, ws_meta)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        torch.ops.segnext.dwconv_gelu(x, torch.randn(3, 1, 3, 3), torch.randn(3, device="meta"), "cpu")
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        torch.ops.segnext_C.dwconv_gelu_forward(x, torch.randn(3, 1, 3, 3, device="meta"), torch.randn(3))
    mx, mws = _mlp_inputs()
    mws[3] = mws[3].to("meta")
    with pytest.raises(ValueError, match=r"weights\[3\] is on meta but x is on cpu"):
        torch.ops.segnext.mlp(mx, mws, "cpu")
    with pytest.raises(ValueError, match=r"weights\[3\] is on meta but x is on cpu"):
        torch.ops.segnext_C.mlp_forward(mx, mws)
    with pytest.raises(ValueError, match="bases is on meta but X is on cpu"):
        torch.ops.segnext.nmf2d(torch.rand(1, 4, 5), torch.rand(1, 4, 2, device="meta"), 1, 1e-6,
                                1.0, "unrolled", False, "triton")


# ---------------------------------------------------------------------------------- selftest

def test_selftest_command_passes_on_the_cpu_backend():
    if not HAS_CPU_KERNELS:
        pytest.skip("segnext_kernels._C is not built")
    r = subprocess.run([sys.executable, "-m", "segnext_kernels.selftest", "--backend", "cpu"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if " cpu " in ln and ("pass" in ln or "FAIL" in ln)]
    n = sum(len(dispatch.kernel(op, "cpu").dtypes) * len(dispatch.kernel(op, "cpu").layouts)
            for op in OPS if dispatch.kernel(op, "cpu") is not None)
    assert len(lines) == n and all(" pass " in ln for ln in lines), r.stdout
    assert f"{n} passed, 0 failed" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter run is for CPU-only machines")
def test_selftest_command_passes_on_triton_in_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = tmp_path / "selftest.json"
    r = subprocess.run([sys.executable, "-m", "segnext_kernels.selftest", "--backend", "triton",
                        "--json", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    import json
    rows = json.loads(out.read_text())["checks"]
    assert {(r["op"], r["dtype"]) for r in rows} == {("msca", "float32"), ("msca", "float16"),
                                                     ("nmf2d", "float32")}
    assert all(r["ok"] for r in rows) and len(rows) == 5


def test_selftest_reports_a_broken_kernel(monkeypatch, capsys):
    if not HAS_CPU_KERNELS:
        pytest.skip("segnext_kernels._C is not built")
    monkeypatch.setattr(ops, "_msca_kernels", _broken_msca("tail_unwritten"))
    rc = selftest.main(["--backend", "cpu", "--op", "msca"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL" in out and "out at (1, 3, 6, 23)" in out

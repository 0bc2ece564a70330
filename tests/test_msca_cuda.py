"""MSCA CUDA C++ kernels (csrc/cuda/msca_cuda*.{cu,cuh,cpp}).

- Compile-only check of every .cu under csrc/cuda with plain nvcc for sm_80 and sm_90, warnings
  clean (runs in CI, no GPU needed; skipped when nvcc is absent).
- GPU tests (marked ``gpu``, skipped without one): forward and every gradient against the float64
  reference and against the Triton op over a shape sweep, both memory formats and all dtypes;
  poisoned outputs; bitwise-deterministic gradients; input checks; compute-sanitizer on a small
  case when the tool is on PATH (also runnable by hand: tests/run_compute_sanitizer.sh).
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def find_tool(name: str) -> str | None:
    nvcc = find_nvcc()
    candidates = [shutil.which(name)]
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(nvcc), name))
    return next((c for c in candidates if c and os.path.exists(c)), None)


# ------------------------------------------------------------------------------------------------
# (a) compile-only check (CI)
# ------------------------------------------------------------------------------------------------
def _nvcc_compile(nvcc: str, src: pathlib.Path, arch: str, outdir: str) -> tuple[str, int, str]:
    cmd = [nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-Xcompiler", "-Wall", "-c", str(src),
           "-o", os.path.join(outdir, f"{src.stem}_{arch}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return arch, proc.returncode, (proc.stdout + proc.stderr).strip()


@pytest.mark.parametrize("src", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_sources_compile_warning_free(src):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH): CUDA sources not compiled")
    with tempfile.TemporaryDirectory() as outdir:
        # both architectures at once: ~40 s each on 2 cores
        with concurrent.futures.ThreadPoolExecutor(len(ARCHS)) as pool:
            results = list(pool.map(lambda a: _nvcc_compile(nvcc, src, a, outdir), ARCHS))
    problems = [f"[{arch}] exit {rc}\n{log}" for arch, rc, log in results
                if rc != 0 or "warning" in log.lower()]
    assert not problems, f"{src.name} does not compile warning-free:\n" + "\n".join(problems)


def test_cuda_sources_present():
    assert (CUDA_DIR / "msca_cuda.cu").exists() and (CUDA_DIR / "msca_cuda_glue.cpp").exists()
    # the kernels depend on the CUDA toolkit only; torch stays in the glue
    for src in CU_FILES + sorted(CUDA_DIR.glob("*.cuh")):
        text = src.read_text()
        assert "#include <torch" not in text and "#include <ATen" not in text, src.name


# ------------------------------------------------------------------------------------------------
# (b) GPU tests
# ------------------------------------------------------------------------------------------------
import segnext_kernels as sk  # noqa: E402
from utils import msca_inputs, msca_reference, rel_err  # noqa: E402

NAMES = ("u", "w0", "b0", "w0_1", "b0_1", "w0_2", "b0_2", "w1_1", "b1_1", "w1_2", "b1_2",
         "w2_1", "b2_1", "w2_2", "b2_2", "w3", "b3")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FORMATS = (torch.contiguous_format, torch.channels_last)
SWEEP_HW = (1, 3, 7, 20, 33)
SWEEP_C = (1, 5, 16, 40, 64)


def cuda_kernel_registered() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("segnext_C::msca_forward", "CUDA")
    except RuntimeError:
        return False


def triton_msca_available() -> bool:
    import importlib.util
    st = sk.available_backends().get("triton")
    return bool(st and st.available and "triton" in sk.op_backends().get("msca", ())
                and importlib.util.find_spec("segnext_kernels.msca.triton") is not None)


needs_cuda_kernels = pytest.mark.skipif(
    torch.cuda.is_available() and not cuda_kernel_registered(),
    reason="segnext_kernels._C was built without the CUDA kernels (see test_cuda_kernels_are_built)")


@pytest.mark.gpu
def test_cuda_kernels_are_built():
    """On a GPU machine the CUDA build must have succeeded (setup.py falls back to CPU-only)."""
    from segnext_kernels import _extension
    assert _extension.available(), "segnext_kernels._C did not load"
    info = _extension.require().build_info()
    if not info["with_cuda"] and find_nvcc() is None:
        pytest.skip("no nvcc on this GPU machine (CUDA_HOME, /usr/local/cuda, PATH): the CUDA "
                    "kernels cannot be built here; the triton backend covers the GPU")
    assert info["with_cuda"], f"segnext_kernels._C was built without CUDA although nvcc exists: {info}"
    assert cuda_kernel_registered()
    assert "cuda" in sk.op_backends()["msca"]


make_inputs = functools.partial(msca_inputs, device="cuda")  # (B, C, H, W, dtype, fmt, seed=0)


def run_op(u, ws, grad, backend):
    """Output and the 17 gradients (u first) of the public op on ``backend``."""
    u = u.detach().clone().requires_grad_(True)
    ws = [w.detach().clone().requires_grad_(True) for w in ws]
    out = sk.msca(u, *ws, backend=backend)
    out.backward(grad)
    return out.detach(), [u.grad] + [w.grad for w in ws]


def compare(tag, out, grads, ref_out, ref_grads, tol):
    errs = {"out": rel_err(out, ref_out)}
    errs.update({n: rel_err(a, b) for n, a, b in zip(NAMES, grads, ref_grads)})
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= tol}
    return [f"{tag}: {bad}"] if bad else []


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("fmt", FORMATS, ids=("nchw", "nhwc"))
@pytest.mark.parametrize("dtype", DTYPES, ids=("f32", "f16", "bf16"))
@pytest.mark.parametrize("C", SWEEP_C)
def test_cuda_matches_reference_sweep(C, dtype, fmt):
    failures = []
    for H in SWEEP_HW:
        for W in SWEEP_HW:
            u, ws, grad = make_inputs(2, C, H, W, dtype, fmt, seed=H * 100 + W)
            out, grads = run_op(u, ws, grad, "cuda")
            assert out.dtype == dtype and out.shape == u.shape
            assert out.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
            ref_out, *ref_grads = msca_reference(u, ws, grad)
            failures += compare(f"H{H} W{W}", out, grads, ref_out, ref_grads, TOL[dtype])
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("shape", [(2, 64, 128, 128), (1, 24, 70, 45), (1, 130, 66, 17), (3, 8, 97, 131)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=("f32", "f16", "bf16"))
def test_cuda_matches_reference_large(shape, dtype):
    """Several tiles per image, the 64x32 forward tile (H >= 64), C over one GEMM tile."""
    u, ws, grad = make_inputs(*shape, dtype, torch.channels_last, seed=7)
    out, grads = run_op(u, ws, grad, "cuda")
    ref_out, *ref_grads = msca_reference(u, ws, grad)
    failures = compare("x".join(map(str, shape)), out, grads, ref_out, ref_grads, TOL[dtype])
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.skipif(not triton_msca_available(), reason="the Triton MSCA op is not available")
@pytest.mark.parametrize("dtype", DTYPES, ids=("f32", "f16", "bf16"))
@pytest.mark.parametrize("fmt", FORMATS, ids=("nchw", "nhwc"))
def test_cuda_matches_triton(dtype, fmt):
    # Each backend is within TOL of the float64 truth, so they agree within 2 * TOL.
    failures = []
    for B, C, H, W in [(2, 16, 20, 33), (1, 40, 7, 3), (2, 64, 33, 33), (1, 5, 1, 20), (2, 64, 128, 128)]:
        u, ws, grad = make_inputs(B, C, H, W, dtype, fmt, seed=C + H)
        out, grads = run_op(u, ws, grad, "cuda")
        t_out, t_grads = run_op(u, ws, grad, "triton")
        failures += compare(f"{B}x{C}x{H}x{W}", out, grads, t_out, t_grads, 2 * TOL[dtype])
    assert not failures, "\n".join(failures)


def _poison_cuda_allocator():
    """Leave NaN-filled blocks in the caching allocator so that unwritten outputs show up."""
    for n in (1 << 12, 1 << 16, 1 << 20, 1 << 24):
        t = torch.full((n,), float("nan"), device="cuda")
        del t
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=("f32", "f16", "bf16"))
@pytest.mark.parametrize("shape", [(2, 5, 7, 33), (1, 64, 70, 20), (2, 16, 1, 1)], ids=str)
def test_cuda_outputs_fully_written(shape, dtype):
    for fmt in FORMATS:
        u, ws, grad = make_inputs(*shape, dtype, fmt, seed=3)
        _poison_cuda_allocator()
        out = torch.ops.segnext_C.msca_forward(u, ws)
        _poison_cuda_allocator()
        grads = torch.ops.segnext_C.msca_backward(grad, u, ws)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), "forward left elements unwritten"
        for name, t in zip(NAMES, grads):
            assert torch.isfinite(t).all(), f"grad {name} has unwritten (NaN) elements"


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=("f32", "f16", "bf16"))
def test_cuda_backward_is_deterministic(dtype):
    u, ws, grad = make_inputs(4, 64, 96, 80, dtype, torch.channels_last, seed=11)
    first = torch.ops.segnext_C.msca_backward(grad, u, ws)
    for _ in range(3):
        again = torch.ops.segnext_C.msca_backward(grad, u, ws)
        for name, a, b in zip(NAMES, first, again):
            assert torch.equal(a, b), f"grad {name} differs between identical calls"
    out1 = torch.ops.segnext_C.msca_forward(u, ws)
    assert torch.equal(out1, torch.ops.segnext_C.msca_forward(u, ws))


@pytest.mark.gpu
@needs_cuda_kernels
def test_cuda_op_rejects_bad_input():
    u, ws, grad = make_inputs(1, 8, 9, 9, torch.float32, torch.channels_last)
    with pytest.raises(RuntimeError, match="w0_1"):
        torch.ops.segnext_C.msca_forward(u, [ws[0], ws[1], ws[4], *ws[3:]])  # w0_2 in w0_1's place
    with pytest.raises((RuntimeError, TypeError), match="b3"):
        torch.ops.segnext_C.msca_forward(u, [*ws[:15], ws[15].half()])
    with pytest.raises(RuntimeError, match="grad"):
        torch.ops.segnext_C.msca_backward(grad[:, :, :5], u, ws)
    with pytest.raises((RuntimeError, TypeError), match="float32, float16 or bfloat16"):
        torch.ops.segnext_C.msca_forward(u.double(), [w.double() for w in ws])


# ------------------------------------------------------------------------------------------------
# (c) compute-sanitizer on a small case
# ------------------------------------------------------------------------------------------------
def sanitize_case() -> None:
    """Forward and backward of small odd shapes, every dtype and both formats (for the sanitizer)."""
    for dtype in DTYPES:
        for fmt in FORMATS:
            for B, C, H, W in [(1, 5, 7, 33), (2, 16, 20, 3), (1, 8, 66, 9)]:
                u, ws, grad = make_inputs(B, C, H, W, dtype, fmt)
                out = torch.ops.segnext_C.msca_forward(u, ws)
                grads = torch.ops.segnext_C.msca_backward(grad, u, ws)
                torch.cuda.synchronize()
                assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    print("sanitize case done")


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("tool", ("memcheck", "racecheck", "synccheck"))
def test_compute_sanitizer(tool):
    sanitizer = find_tool("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sanitizer, f"--tool={tool}", "--error-exitcode=3", sys.executable, str(pathlib.Path(__file__).resolve()), "sanitize-case"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=str(ROOT))
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0 and "sanitize case done" in proc.stdout, log


if __name__ == "__main__":
    if sys.argv[1:] == ["sanitize-case"]:
        sanitize_case()
    else:
        sys.exit(pytest.main([__file__, "-q"] + sys.argv[1:]))

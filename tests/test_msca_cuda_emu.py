"""The MSCA CUDA kernels (csrc/cuda/msca_cuda.cu) executed on the CPU emulator (tests/cuda_emu/,
docs/cuda_emulation.md), forward and every gradient against the float64 reference.

The .cu is compiled unchanged as host C++; every shared and device memory access is
bounds-checked and race-checked, outputs and workspace start as NaN and must be fully written.
The emulator plays msca_cuda_glue.cpp's part (device buffers, workspace, the shared-memory check,
channels-last hand-over); the glue itself needs a CUDA build of torch and runs only on a GPU.
The planted-bug tests mutate a copy of the source and assert that the harness fails.
"""
from __future__ import annotations

import re

import pytest
import torch

from cuda_emu import harness
from utils import msca_inputs, msca_reference, rel_err

pytestmark = pytest.mark.skipif(harness.find_cxx() is None, reason="g++ not found (the harness needs GCC)")

NAMES = ("u",) + harness.WEIGHT_NAMES
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# (B, C, H, W) and what each shape exercises (kVec = 4 channels for fp32, 8 for fp16/bf16).
SHAPES = {
    "2x5x7x33": (2, 5, 7, 33),    # C % kVec != 0 (scalar path), a 32-wide tile + a 1-pixel tail
    "1x8x1x1": (1, 8, 1, 1),      # a 1x1 image, vector path
    "2x16x20x3": (2, 16, 20, 3),  # H below the 21-tap strips, W below the 5x5 conv
    "1x40x1x20": (1, 40, 1, 20),  # H = 1; C > 32: two K slabs of the 1x1 GEMM
    "1x70x9x9": (1, 70, 9, 9),    # C > 64: two GEMM column tiles, three K slabs, channel tails
    "1x8x66x9": (1, 8, 66, 9),    # H >= 64: the 64x32 forward tile, two row tiles backward
    "1x3x23x1": (1, 3, 23, 1),    # W = 1, prime H > 21
}


@pytest.fixture(scope="module")
def msca_emu():
    return harness.build_msca()


def errors_vs_reference(fwd: harness.EmuResult, bwd: harness.EmuResult, u, ws, grad) -> dict:
    ref_out, *ref_grads = msca_reference(u, ws, grad)
    errs = {}
    if "out" in fwd.outputs:
        errs["out"] = rel_err(fwd.outputs["out"], ref_out)
    if "grad_u" in bwd.outputs:
        errs["u"] = rel_err(bwd.outputs["grad_u"], ref_grads[0])
        for name, r in zip(harness.WEIGHT_NAMES, ref_grads[1:]):
            errs[name] = rel_err(bwd.outputs[name], r)
    return errs


class AboveTolerance(AssertionError):
    """A numerical difference from the reference (as opposed to a checker report)."""


def check_case(exe, u, ws, grad, **kw):
    fwd = harness.run_msca(exe, "fwd", u, ws, **kw)
    assert fwd.clean, f"forward:\n{fwd.report}"
    bwd = harness.run_msca(exe, "bwd", u, ws, grad, **kw)
    assert bwd.clean, f"backward:\n{bwd.report}"
    fmt = torch.channels_last if not u.is_contiguous() else torch.contiguous_format
    assert fwd.outputs["out"].is_contiguous(memory_format=fmt)
    assert bwd.outputs["grad_u"].is_contiguous(memory_format=fmt)
    errs = errors_vs_reference(fwd, bwd, u, ws, grad)
    assert len(errs) == 1 + len(NAMES), errs
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= TOL[u.dtype]}
    if bad:
        raise AboveTolerance(f"relative errors above {TOL[u.dtype]}: {bad}")
    return fwd, bwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_msca_cuda_kernels_match_reference(msca_emu, shape, dtype):
    # alternate the caller's memory format over the shapes (the kernels always see NHWC)
    fmt = torch.channels_last if list(SHAPES).index(shape) % 2 else torch.contiguous_format
    check_case(msca_emu, *msca_inputs(*SHAPES[shape], dtype, fmt))


BF16_PRECISION_GAP = pytest.mark.xfail(
    raises=AboveTolerance, strict=True,
    reason="bf16: the bias gradients b0/b0_1 reach 1.1-1.8e-2 (> 1e-2) because the backward keeps g*u, "
           "grad_s and grad_a in bf16; a float64 model with the same bf16 rounding points gives the same "
           "error (docs/cuda_emulation.md). Memory/race checks still apply: only the tolerance may fail.")


@pytest.mark.parametrize("shape", [pytest.param("2x5x7x33", marks=BF16_PRECISION_GAP), "1x40x1x20"])
def test_msca_cuda_kernels_bfloat16(msca_emu, shape):
    check_case(msca_emu, *msca_inputs(*SHAPES[shape], torch.bfloat16, torch.channels_last))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_msca_cuda_kernels_unaligned_buffers(msca_emu, dtype):
    """Activations one element past a 16-byte boundary: C % kVec == 0 but the kernels must take
    their scalar path (a vector access there is reported as misaligned)."""
    check_case(msca_emu, *msca_inputs(2, 16, 20, 3, dtype), misalign=True)


def test_msca_cuda_fiber_order_does_not_matter(msca_emu):
    """Threads run in reverse order: same bits (no result depends on the schedule)."""
    u, ws, grad = msca_inputs(1, 70, 9, 9, torch.float16)
    fwd, bwd = check_case(msca_emu, u, ws, grad, order="reverse")
    fwd0 = harness.run_msca(msca_emu, "fwd", u, ws)
    bwd0 = harness.run_msca(msca_emu, "bwd", u, ws, grad)
    assert torch.equal(fwd.outputs["out"], fwd0.outputs["out"])
    for k in bwd0.outputs:
        assert torch.equal(bwd.outputs[k], bwd0.outputs[k]), k


def test_msca_cuda_on_an_a100_shared_memory_budget(msca_emu):
    """sm_80 offers 163 KB of shared memory per block (sm_90: 227 KB): the kernels fit both."""
    check_case(msca_emu, *msca_inputs(1, 8, 66, 9, torch.float32), device="sm_80")


def test_msca_cuda_glue_refuses_a_small_shared_memory_device(msca_emu):
    """sm_86 (101 KB per block) cannot hold the 64x32 forward tile: the glue's check refuses."""
    u, ws, _ = msca_inputs(1, 8, 9, 9, torch.float32)
    r = harness.run_msca(msca_emu, "fwd", u, ws, device="sm_86")
    assert r.returncode == 5 and "bytes of shared memory per block" in r.report, r.report


def test_msca_cuda_without_tensor_cores():
    """The SIMT GEMM tile that half types take below sm_80 (SEGNEXT_MSCA_NO_TENSOR_CORES)."""
    exe = harness.build_msca(tag="simt", defines=("SEGNEXT_MSCA_NO_TENSOR_CORES",))
    check_case(exe, *msca_inputs(1, 40, 9, 7, torch.float16))


# ------------------------------------------------------------------------------------------------
# The harness catches bugs: planted in a copy of the source
# ------------------------------------------------------------------------------------------------
def replace_once(pattern: str, repl: str):
    """A mutation: ``pattern`` (a regex) must occur exactly once in the source."""
    def mutate(src: str) -> str:
        hits = list(re.finditer(pattern, src))
        assert len(hits) == 1, (f"mutation site {pattern!r} found {len(hits)} times in msca_cuda.cu: "
                                "update the planted-bug test to the new source")
        m = hits[0]
        return src[:m.start()] + m.expand(repl) + src[m.end():]
    return mutate


OFF_BY_ONE = {
    # stage_region loads one pixel past the right edge of the image on every row
    "stage-column": (replace_once(r"(gx >= 0 && )gx < a\.W(\) \{\n\s+load_pixel)", r"\1gx <= a.W\2"), "fwd"),
    # the forward stores one row too many: into the next image's first row, or past the buffer
    "store-row": (replace_once(r"(const int gy = t\.y0 \+ vr0 \+ o;\n\s+if \()gy >= a\.H", r"\1gy > a.H"), "fwd"),
    # the 5x5 backward's grad_w0 correlation reads one column too far right
    "bwd5-column": (replace_once(r"corr_run<5, NRUN>\(su \+ \(\(hr \+ i\) \* QP \+ hc0\)",
                                 r"corr_run<5, NRUN>(su + ((hr + i) * QP + hc0 + 1)"), "bwd"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("mutation", list(OFF_BY_ONE))
def test_planted_off_by_one_fails_the_harness(mutation, dtype):
    mutate, op = OFF_BY_ONE[mutation]
    exe = harness.build_msca(mutate, tag=f"obo-{mutation}")
    u, ws, grad = msca_inputs(2, 5, 7, 33, dtype)
    r = harness.run_msca(exe, op, u, ws, grad if op == "bwd" else None)
    clean = harness.EmuResult(0, "", {})
    errs = errors_vs_reference(r if op == "fwd" else clean, r if op == "bwd" else clean, u, ws, grad)
    wrong = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
    assert not r.clean or wrong, f"the planted off-by-one ({mutation}) went unnoticed:\n{r.report}"
    print(f"{mutation} {dtype}: exit {r.returncode}, {r.error_counts()}, wrong outputs {sorted(wrong)}")


MISSING_SYNC = {
    # forward: u is staged into shared memory, then read by other threads to compute a
    "fwd-after-staging": (replace_once(r"(t\.c0, a\);\n)  __syncthreads\(\);\n(  compute_a<T, Cfg>\(sa, su, t, a\);\n"
                                       r"  __syncthreads\(\);\n\n  // Vertical strips)", r"\1\2"), "fwd", 5),
    # forward: the next strip overwrites h_k while other threads still read it
    "fwd-strip-end": (replace_once(r"(conv_run<K, NRUN>\(vin, Cfg::HP \* kVec, w, s\);\s*\\\n)\s*__syncthreads\(\);",
                                   r"\1"), "fwd", 5),
    # the 1x1 GEMM's K loop: the next slab is staged while other warps still multiply this one
    "gemm-k-loop": (replace_once(r"(Bs\[kk \* kBLd \+ nn\] = v;\n    \}\n    __syncthreads\(\);\n    "
                                 r"mma\.step\(As, Bs\);\n)    __syncthreads\(\);\n", r"\1"), "fwd", 40),
    # backward 5x5: grad_a and u are staged, then read by neighbours
    "bwd5-after-staging": (replace_once(r"(stage_region<T, Cfg::QH, Cfg::QW, QP, Cfg::NT>\(su, a\.u.*\n)  __syncthreads\(\);\n",
                                        r"\1"), "bwd", 5),
}


@pytest.mark.parametrize("mutation", list(MISSING_SYNC))
def test_missing_syncthreads_is_reported_as_a_race(mutation):
    mutate, op, C = MISSING_SYNC[mutation]
    exe = harness.build_msca(mutate, tag=f"sync-{mutation}")
    u, ws, grad = msca_inputs(1, C, 7, 9, torch.float16)
    r = harness.run_msca(exe, op, u, ws, grad if op == "bwd" else None)
    assert r.error_counts().get("shared-race", 0) > 0, f"no race reported:\n{r.report}"
    assert r.returncode == 3

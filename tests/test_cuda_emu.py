"""The CUDA emulation harness itself (tests/cuda_emu/, docs/cuda_emulation.md).

Each scenario of tests/cuda_emu/selftest_kernels.cu either checks a built-in against its CUDA
semantics (block barriers, shuffles and votes, WMMA, atomics, launch limits) or plants one kind of
bug that the checker must report (races, out-of-bounds shared and global accesses, uninitialised
shared memory, a divergent barrier, misaligned vector loads). The half/bfloat16 conversions are
compared bit for bit with torch's.
"""
from __future__ import annotations

import subprocess

import pytest
import torch

from cuda_emu import harness

pytestmark = pytest.mark.skipif(harness.find_cxx() is None, reason="g++ not found (the harness needs GCC)")


@pytest.fixture(scope="module")
def selftest():
    return harness.build_selftest()


def run(exe, *args):
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def error_counts(log: str) -> dict:
    return harness.EmuResult(0, log, {}).error_counts()


@pytest.mark.parametrize("scenario", ["block_sum", "shuffles", "wmma", "atomics"])
def test_builtin_semantics(selftest, scenario):
    rc, log = run(selftest, scenario)
    assert rc == 0 and f"PASS {scenario}" in log, log


@pytest.mark.parametrize("scenario, kind", [
    ("block_sum_no_sync", "shared-race"),
    ("global_oob", "global-out-of-bounds"),
    ("shared_oob", "shared-out-of-bounds"),
    ("uninit_shared", "uninitialized-shared-read"),
    ("divergent_barrier", "barrier-deadlock"),
    ("inter_block_race", "global-race"),
    ("misaligned_vector", "misaligned-access"),
])
def test_planted_bug_is_reported(selftest, scenario, kind):
    rc, log = run(selftest, scenario)
    assert rc == 3, f"expected the emulator to report {kind}:\n{log}"
    counts = error_counts(log)
    assert counts.get(kind, 0) > 0 and set(counts) == {kind}, log


def test_launch_configuration_errors(selftest):
    """> 48 KB of dynamic shared memory needs the opt-in attribute, which the emulated device
    caps; more than 1024 threads per block fail: each as cudaGetLastError reports it on a GPU."""
    rc, log = run(selftest, "launch_config")
    assert "PASS launch_config" in log, log
    assert rc == 3 and error_counts(log) == {"launch-error": 3}, log


def test_race_report_does_not_depend_on_fiber_order(selftest):
    """The race checker compares barrier intervals, not the order the fibers happened to run in."""
    import os
    counts = []
    for order in ("forward", "reverse"):
        proc = subprocess.run([str(selftest), "block_sum_no_sync"], capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, CUDA_EMU_ORDER=order))
        counts.append(error_counts(proc.stdout).get("shared-race", 0))
    assert counts[0] > 0 and counts[1] > 0, counts


def test_half_and_bfloat16_conversions_match_torch(selftest, tmp_path):
    """float -> half / bfloat16 (round to nearest even, subnormals, overflow, NaN) and every half
    bit pattern -> float, bit for bit against torch."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e6, -1e6, 6.1e-5, 5.96e-8,
                            2.98e-8, 2.99e-8, 1e-10, 3.0e38, float("inf"), float("-inf"),
                            1.0009765625, 1.00048828125, 1.000732421875, 2049.0, 2051.0])
    bits = torch.randint(0, 2**31 - 1, (60000,), generator=g, dtype=torch.int64)
    random_bits = (bits * torch.where(torch.rand(60000, generator=g) < 0.5, 1, -1)).to(torch.int32)
    randoms = torch.cat([random_bits.view(torch.float32), torch.randn(20000, generator=g) * 1e3,
                         torch.randn(20000, generator=g) * 1e-5])
    x = torch.cat([special, randoms])
    x = x[~torch.isnan(x)]  # NaN payloads differ between conversions; NaN-ness is checked below
    (tmp_path / "in.bin").write_bytes(x.numpy().tobytes())
    rc, log = run(selftest, "convert", str(tmp_path / "in.bin"), str(tmp_path / "out.bin"))
    assert rc == 0, log
    out = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.int16)
    n = x.numel()
    pairs = out[: 2 * n].view(n, 2)
    assert torch.equal(pairs[:, 0], x.half().view(torch.int16)), "float -> half differs from torch"
    assert torch.equal(pairs[:, 1], x.bfloat16().view(torch.int16)), "float -> bfloat16 differs from torch"
    back = out[2 * n:].view(torch.int32).view(torch.float32)
    all_halves = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    finite = ~torch.isnan(all_halves)
    assert torch.equal(back[finite], all_halves[finite]), "half -> float differs from torch"
    assert torch.isnan(back[~finite]).all()


def test_selftest_kernels_are_real_cuda(tmp_path):
    """The scenarios compile with nvcc too, warning-free (compile-only; skipped without nvcc)."""
    from test_msca_cuda import find_nvcc
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    proc = subprocess.run([nvcc, "-std=c++17", "-O2", "-arch=sm_80", "-Xcompiler", "-Wall", "-c",
                           str(harness.HERE / "selftest_kernels.cu"), "-o", str(tmp_path / "s.o")],
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "warning" not in log.lower(), log

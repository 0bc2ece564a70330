"""CUDA architectures: what a build targets (setup.py) and whether the visible GPU can run what
``_C`` holds (``python -m segnext_kernels.info``), on the comparison logic alone (no GPU here)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from segnext_kernels import _cuda_archs, info


@pytest.mark.parametrize("arch_list, cmake", [
    ("9.0", "90-real"),
    ("8.0;9.0+PTX", "80-real;90"),
    ("8.6 9.0a", "86-real;90a-real"),
    ("7.5,8.0+PTX,8.0+PTX", "75-real;80"),
])
def test_torch_arch_list_to_cmake(arch_list, cmake):
    assert _cuda_archs.from_torch_arch_list(arch_list) == cmake


def test_describe():
    assert _cuda_archs.describe("80-real,90") == "binaries for sm_80, sm_90; PTX for compute_90"
    assert _cuda_archs.describe("") == "binaries for none; PTX for none"


@pytest.mark.parametrize("archs, capability, verdict", [
    ("90", (9, 0), "sass"),
    ("80-real,90-real", (9, 0), "sass"),
    ("80", (8, 6), "sass"),          # a binary runs on later minors of its major
    ("86-real", (8, 0), "none"),      # ... not on earlier ones
    ("86", (8, 0), "none"),           # and PTX is not JIT-compiled backwards either
    ("80", (9, 0), "ptx"),            # another major: only the PTX
    ("80-real", (9, 0), "none"),
    ("90a-real", (9, 0), "sass"),     # arch-specific: exactly its GPU
    ("90a-real", (10, 0), "none"),
    ("90", (10, 0), "ptx"),
    ("90-real", (12, 0), "none"),
    ("100", (10, 3), "sass"),
    ("", (9, 0), "none"),
])
def test_coverage(archs, capability, verdict):
    got, why = _cuda_archs.coverage(archs, capability)
    assert got == verdict, why
    if verdict != "sass":
        assert f"TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]}" in why


def test_info_warns_when_the_gpu_is_not_covered(monkeypatch, capsys):
    fake = info.collect()
    fake["extension"] = {"with_cuda": True, "cuda_archs": "80-real"}
    fake["cuda_arch_check"] = _cuda_archs.coverage("80-real", (9, 0))
    monkeypatch.setattr(info, "collect", lambda: fake)
    info.main()
    out = capsys.readouterr().out
    assert "binaries for sm_80; PTX for none" in out
    assert "WARNING: this GPU is sm_90 but _C holds CUDA code for" in out


def test_setup_py_loads_the_arch_helpers():
    """setup.py reads segnext_kernels/_cuda_archs.py by path (without importing torch)."""
    r = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.argv = ['setup.py', '--name']; "
                        "g = runpy.run_path('setup.py'); print(g['cuda_archs'].describe('90'))"],
                       capture_output=True, text=True, cwd=info.__file__.rsplit("/segnext_kernels/", 1)[0])
    assert r.returncode == 0 and "binaries for sm_90; PTX for compute_90" in r.stdout, r.stdout + r.stderr

"""Backend availability, the compiled-extension loader and its fallback, and `segnext_kernels.info`
(selection itself: tests/test_dispatch.py)."""
import os
import subprocess
import sys

import pytest
import torch

import segnext_kernels as sk
from segnext_kernels import _extension, backends


def test_available_backends_reports_every_backend_with_reason():
    st = sk.available_backends()
    assert set(st) == {"reference", "triton", "cuda", "cpu"}
    for name, s in st.items():
        assert isinstance(s.available, bool) and s.reason, name
    assert st["reference"].available
    assert st["cpu"].available == _extension.available()


def _run(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                          timeout=300)


def test_import_works_without_extension_and_says_why_once():
    code = ("import warnings; warnings.simplefilter('always');"
            "import segnext_kernels as sk, torch;"
            "print(sk.available_backends()['cpu'].reason);"
            "m = sk.MSCA(4); print(tuple(m(torch.randn(1, 4, 5, 5)).shape))")
    r = _run(code, SEGNEXT_DISABLE_C="1")
    assert r.returncode == 0, r.stderr
    assert "disabled by SEGNEXT_DISABLE_C=1" in r.stdout
    assert "pip install --no-build-isolation -e ." in r.stdout
    assert "(1, 4, 5, 5)" in r.stdout


def test_broken_extension_warns_once_with_fix(tmp_path):
    """An _C that fails to load (here: not importable) is reported once, naming the fix."""
    code = ("import sys, warnings; warnings.simplefilter('always');"
            "sys.modules['segnext_kernels._C'] = None;"  # import of _C raises ImportError
            "import segnext_kernels, segnext_kernels.msca, importlib;"
            "importlib.import_module('segnext_kernels.nmf2d')")
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("segnext_kernels._C is not loaded") == 1
    assert "pip install --no-build-isolation -e ." in r.stderr


def test_info_command_prints_versions_and_backends():
    r = subprocess.run([sys.executable, "-m", "segnext_kernels.info"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for word in ("torch", "triton", "compiled extension", "reference", "cpu", "cuda", "msca", "nmf2d"):
        assert word in r.stdout

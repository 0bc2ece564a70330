"""Backend selection, the compiled-extension loader and its fallback, and `segnext_kernels.info`."""
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


def test_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference'"):
        sk.set_backend("cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        with sk.use_backend(3):
            pass


def test_unavailable_backend_says_why():
    st = sk.available_backends()["cuda"]
    if st.available:
        pytest.skip("cuda backend is available here")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: " + st.reason[:20]):
        sk.set_backend("cuda")


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


def test_auto_resolution_on_cpu():
    expected = "cpu" if "cpu" in sk.op_backends()["msca"] else "reference"
    assert backends.resolve("msca", torch.device("cpu")) == expected
    # an op without a kernel in the chosen backend runs the reference
    if _extension.available():
        with sk.use_backend("cpu"):
            assert backends.resolve("nmf2d", torch.device("cpu")) in sk.op_backends()["nmf2d"]


def test_backend_for_another_device_is_refused():
    if not sk.available_backends()["cpu"].available:
        pytest.skip("_C not built")
    with sk.use_backend("cpu"):
        with pytest.raises(ValueError, match="backend 'cpu' cannot run msca on a tensor on meta"):
            backends.resolve("msca", torch.device("meta"))


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
            "importlib.import_module('segnext_kernels.nmf')")
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


def test_segnext_backend_env_is_validated():
    r = _run("import segnext_kernels as sk; sk.get_backend()", SEGNEXT_BACKEND="bogus")
    assert r.returncode != 0 and "backend must be one of" in r.stderr

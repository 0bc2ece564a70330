"""Build of segnext-kernels: setuptools drives CMake (ninja) to build ``segnext_kernels._C``.

The extension is built against the torch installed in the environment that runs it. With
``pip install --no-build-isolation -e .`` that torch is importable here; with build isolation
it is found by asking the target interpreter (sys.executable) with the isolation undone.

Environment switches:
  SEGNEXT_CUDA=0|1          skip / force the CUDA kernels (default: build them when torch is a
                            CUDA build, nvcc is found, and a GPU is visible or an arch list is set)
  TORCH_CUDA_ARCH_LIST      e.g. "8.0;9.0+PTX" (as PyTorch reads it: binaries for 8.0 and 9.0, PTX
                            for 9.0); without it the build targets the visible GPUs (binary + PTX)
  SEGNEXT_NATIVE=0          do not tune the CPU kernels with -march=native
  CMAKE_BUILD_TYPE          Release (default) or Debug
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))

_TORCH_PROBE = r"""
import json, os, torch
info = {
    "version": torch.__version__,
    "root": os.path.dirname(torch.__file__),
    "cxx11_abi": int(torch._C._GLIBCXX_USE_CXX11_ABI),
    "cuda": torch.version.cuda,
    "gpus": [],
}
if torch.version.cuda is not None and torch.cuda.is_available():
    info["gpus"] = ["%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
print("SEGNEXT_TORCH_PROBE" + json.dumps(info))
"""


def log(msg: str) -> None:
    print(f"[segnext build] {msg}", flush=True)


def probe_torch() -> dict | None:
    """Facts about the target environment's torch, or None if it has none."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    for how, cmd, e in (("target interpreter", [sys.executable, "-c", _TORCH_PROBE], env),
                        ("build environment", [sys.executable, "-c", _TORCH_PROBE], None)):
        try:
            out = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300).stdout
        except Exception:
            continue
        for line in out.splitlines():
            if line.startswith("SEGNEXT_TORCH_PROBE"):
                info = json.loads(line[len("SEGNEXT_TORCH_PROBE"):])
                info["found_in"] = how
                return info
    return None


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _load_cuda_archs():
    """segnext_kernels/_cuda_archs.py by path: the package itself imports torch."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "_segnext_cuda_archs", os.path.join(ROOT, "segnext_kernels", "_cuda_archs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cuda_archs = _load_cuda_archs()


def decide_cuda(torch_info: dict) -> tuple[bool, str, str]:
    """(build CUDA?, architectures, why)."""
    switch = os.environ.get("SEGNEXT_CUDA", "").strip()
    if switch == "0":
        return False, "", "skipped (SEGNEXT_CUDA=0)"
    if torch_info["cuda"] is None:
        return False, "", "torch is a CPU build" + (" (SEGNEXT_CUDA=1 ignored)" if switch == "1" else "")
    nvcc = find_nvcc()
    if nvcc is None:
        return False, "", "nvcc not found (set CUDA_HOME)"
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if arch_list:
        return True, cuda_archs.from_torch_arch_list(arch_list), f"TORCH_CUDA_ARCH_LIST={arch_list}, nvcc {nvcc}"
    if torch_info["gpus"]:  # the visible GPUs' own architectures (binary + PTX)
        return True, ";".join(dict.fromkeys(torch_info["gpus"])), \
            f"the visible GPUs (no TORCH_CUDA_ARCH_LIST), nvcc {nvcc}"
    if switch == "1":
        return True, "80;90", f"forced (SEGNEXT_CUDA=1) without a GPU: default archs, nvcc {nvcc}"
    return False, "", "no GPU visible and no TORCH_CUDA_ARCH_LIST (set it, or SEGNEXT_CUDA=1)"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        torch_info = probe_torch()
        if torch_info is None:
            log("torch is not importable in the target environment: skipping segnext_kernels._C. "
                "The package works without it (reference and Triton backends); install torch, then "
                "rebuild with `pip install --no-build-isolation -e .`")
            return
        log(f"torch {torch_info['version']} at {torch_info['root']} (found in the {torch_info['found_in']})")
        with_cuda, archs, why = decide_cuda(torch_info)
        log(f"CUDA kernels: {'yes' if with_cuda else 'no'} — {why}" +
            (f"; {cuda_archs.describe(archs)}" if archs else ""))
        native = os.environ.get("SEGNEXT_NATIVE", "1") != "0"
        log(f"CPU kernels: yes (-O3{' -march=native' if native else ''})")

        extdir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        built = f"CUDA kernels ({cuda_archs.describe(archs)}) and CPU kernels" if with_cuda else "CPU kernels"
        try:
            self._cmake(torch_info, extdir, with_cuda, archs, native)
        except subprocess.CalledProcessError:
            if not with_cuda:
                raise
            # A CUDA toolchain problem must not cost the user the CPU kernels.
            log("the CUDA build failed (see above): building the CPU kernels only; "
                "set SEGNEXT_CUDA=0 to skip CUDA from the start")
            self._cmake(torch_info, extdir, False, "", native)
            built = "CPU kernels only (the CUDA build failed)"
        log(f"built {ext.name} into {extdir}: {built}")

    def _cmake(self, torch_info: dict, extdir: str, with_cuda: bool, archs: str, native: bool) -> None:
        import pybind11

        torch_root = torch_info["root"]
        includes = [os.path.join(torch_root, "include"),
                    os.path.join(torch_root, "include", "torch", "csrc", "api", "include")]
        build_type = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DSEGNEXT_OUTPUT_DIR={extdir}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTORCH_INCLUDE_DIRS={';'.join(includes)}",
            f"-DTORCH_LIBRARY_DIR={os.path.join(torch_root, 'lib')}",
            f"-DTORCH_CXX11_ABI={torch_info['cxx11_abi']}",
            f"-DSEGNEXT_TORCH_VERSION={torch_info['version']}",
            f"-DSEGNEXT_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DSEGNEXT_NATIVE={'ON' if native else 'OFF'}",
        ]
        if with_cuda:
            args += [f"-DSEGNEXT_CUDA_ARCHS={archs}", f"-DCMAKE_CUDA_COMPILER={find_nvcc()}"]
        ninja = shutil.which("ninja") or _ninja_from_pip()
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        tag = f"{'cuda' if with_cuda else 'cpu'}-py{sys.version_info[0]}{sys.version_info[1]}"
        build_dir = os.path.join(ROOT, "build", f"cmake-{tag}")
        os.makedirs(build_dir, exist_ok=True)
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if os.path.exists(cache):  # a cache from another generator/torch would refuse to reconfigure
            os.remove(cache)
        cmake = shutil.which("cmake") or _cmake_from_pip()
        subprocess.run([cmake, ROOT, *args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--config", build_type], cwd=build_dir, check=True)


def _ninja_from_pip() -> str | None:
    try:
        import ninja
        return os.path.join(ninja.BIN_DIR, "ninja")
    except Exception:
        return None


def _cmake_from_pip() -> str:
    try:
        import cmake
        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except Exception as exc:
        raise RuntimeError("cmake >= 3.18 is needed to build segnext_kernels._C: pip install cmake") from exc


setup(
    # bench/ (``python -m bench``, run from the repository root) is not installed: a top-level
    # package of that name would shadow users' own modules.
    packages=find_packages(include=["segnext_kernels*", "segnext*"]),
    ext_modules=[CMakeExtension("segnext_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)

"""CUDA architecture lists: what the build targets and whether a GPU can run what was built.

Torch-free: setup.py loads this file by path at build time, ``segnext_kernels.info`` at run time.
Lists are CMake's CUDA_ARCHITECTURES spelling: ``"90"`` (a binary and PTX), ``"90-real"``
(binary only), ``"90-virtual"`` (PTX only), ``"90a"`` (arch-specific binary).
"""
from __future__ import annotations

import re


def from_torch_arch_list(arch_list: str) -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", as PyTorch reads it) -> CMake's list ("80-real;90":
    a binary for each, PTX only where +PTX asks for it)."""
    archs = []
    for item in re.split(r"[;,\s]+", arch_list.strip()):
        if item:
            ptx = item.endswith("+PTX")
            arch = item.replace("+PTX", "").replace(".", "")
            archs.append(arch if ptx else f"{arch}-real")
    return ";".join(dict.fromkeys(archs))


def parse(archs: str) -> list[tuple[int, str, bool, bool]]:
    """CMake's list -> [(10 * major + minor, suffix "" / "a" / "f", has a binary, has PTX)]."""
    out = []
    for item in re.split(r"[,;\s]+", archs.strip()):
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)([af]?)(?:-(real|virtual))?", item)
        if m:
            out.append((int(m[1]), m[2], m[3] != "virtual", m[3] != "real"))
    return out


def describe(archs: str) -> str:
    """"80-real;90" -> "binaries for sm_80, sm_90; PTX for compute_90"."""
    entries = parse(archs)
    sass = [f"sm_{a}{s}" for a, s, binary, _ in entries if binary]
    ptx = [f"compute_{a}{s}" for a, s, _, has_ptx in entries if has_ptx]
    return f"binaries for {', '.join(sass) or 'none'}; PTX for {', '.join(ptx) or 'none'}"


def coverage(archs: str, capability: tuple[int, int]) -> tuple[str, str]:
    """How a GPU of ``capability`` (major, minor) runs kernels built for ``archs``:
    ("sass", why) when a built binary runs on it (same major, minor not above the GPU's; an "a"
    binary only on exactly its GPU), ("ptx", why) when only PTX of this or an older architecture
    can be JIT-compiled for it, ("none", why) when neither."""
    cc = 10 * capability[0] + capability[1]
    entries = parse(archs)
    for arch, suffix, binary, _ in entries:
        runs = arch == cc if suffix == "a" else (arch // 10 == cc // 10 and arch <= cc)
        if binary and runs:
            return "sass", f"sm_{arch}{suffix} code runs on this sm_{cc} GPU"
    rebuild = (f"rebuild with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]} "
               "pip install --no-build-isolation -e .")
    ptx = [arch for arch, suffix, _, has_ptx in entries if has_ptx and not suffix and arch <= cc]
    if ptx:
        return "ptx", (f"no sm_{cc} binary in _C: its compute_{max(ptx)} PTX is JIT-compiled at first "
                       f"use; {rebuild} for native code")
    return "none", (f"this GPU is sm_{cc} but _C holds CUDA code for {describe(archs)}: the cuda "
                    f"backend cannot launch here; {rebuild}")

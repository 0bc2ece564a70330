"""The Triton versions the kernels support, and every launch setting that differs between them.

The kernels (``msca/triton_kernels.py``, ``nmf2d/triton.py``) are one source for every supported version;
where a version needs another launch configuration, it is chosen here and nowhere else.

Each torch release pins one Triton (torch 2.9 -> 3.5, 2.10 and 2.11 -> 3.6, 2.12 and 2.13 ->
3.7, 2.14 -> 3.8); 3.9 is the newest. The range is declared in pyproject.toml,
requirements-dev.txt and the README too (a test keeps them equal), and CI compiles every kernel
with each version in it (tools/triton_matrix.sh).
"""
from __future__ import annotations

import functools
import re

OLDEST = (3, 5)   # oldest supported (major, minor), inclusive
NEWEST = (3, 9)   # newest supported (major, minor), inclusive


def parse_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as "3.6.0" or "3.7.0+git1234"; None if unreadable."""
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def installed_version() -> str | None:
    """The importable Triton's version string, or None without a usable Triton."""
    try:
        import triton
    except Exception:  # triton is optional; a broken install counts as none
        return None
    return getattr(triton, "__version__", None)


def in_supported_range(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed Triton) is in the supported range."""
    parsed = parse_version(version if version is not None else installed_version() or "")
    return parsed is not None and OLDEST <= parsed <= NEWEST


def range_text() -> str:
    return f"{OLDEST[0]}.{OLDEST[1]} to {NEWEST[0]}.{NEWEST[1]}"


def support_status(version: str | None = None) -> str:
    """Whether the installed Triton (or ``version``) is supported, in words (for ``info``)."""
    version = version if version is not None else installed_version()
    if version is None:
        return f"no Triton installed (supported: {range_text()})"
    if in_supported_range(version):
        return f"in the supported range {range_text()}"
    return (f"outside the supported range {range_text()}: the Triton kernels may fail to compile "
            f"or spill registers")


@functools.lru_cache(maxsize=None)
def nmf_max_registers() -> int:
    """Register budget (``maxnreg``) of the NMF kernels up to padded rank 64, but the persistent
    backward. 128 lets two 8-warp programs share an SM; the code triton 3.7 and 3.8 generate
    for some of them needs up to ~140 on sm_80 and spilled at 128, so they get 168 (one per SM),
    the budget checked with them."""
    return 168 if parse_version(installed_version() or "") in ((3, 7), (3, 8)) else 128

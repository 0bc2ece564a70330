"""``python -m segnext_kernels.info``: versions, how ``_C`` was built, and each backend's status."""
from __future__ import annotations

import platform
import sys


def collect() -> dict:
    import torch

    from . import __version__, _cuda_archs, _extension, _triton_compat
    from .backends import available_backends, get_backend
    from .dispatch import op_backends

    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # triton is optional
        triton_version = f"not importable ({type(exc).__name__})"
    ext = _extension.build_info() if _extension.available() else {}
    arch_check = None
    if ext.get("with_cuda") and torch.cuda.is_available():
        arch_check = _cuda_archs.coverage(ext.get("cuda_archs", ""), torch.cuda.get_device_capability())
    return {
        "segnext_kernels": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_range": _triton_compat.support_status(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "extension": (_extension.build_info() if _extension.available()
                      else {"loaded": False, "why": _extension.load_error(),
                            "fix": _extension.REBUILD_HINT}),
        "cuda_arch_check": arch_check,
        "backends": {k: v._asdict() for k, v in available_backends().items()},
        "selected_backend": get_backend(),
        "op_backends": op_backends(),
    }


def main() -> None:
    from . import _cuda_archs

    info = collect()
    print("segnext-kernels", info["segnext_kernels"])
    for key in ("python", "platform", "torch", "torch_cuda", "triton", "triton_range",
                "cuda_device", "threads"):
        print(f"  {key:<12} {info[key]}")
    print("compiled extension segnext_kernels._C:")
    for k, v in info["extension"].items():
        print(f"  {k:<14} {v}")
    if info["extension"].get("with_cuda"):
        print(f"  {'cuda code':<14} {_cuda_archs.describe(info['extension'].get('cuda_archs', ''))}")
    if info["cuda_arch_check"] is not None:
        verdict, why = info["cuda_arch_check"]
        print(f"  {'this GPU':<14} {'WARNING: ' if verdict != 'sass' else ''}{why}")
    print(f"backends (selected: {info['selected_backend']}):")
    for name, st in info["backends"].items():
        mark = "available  " if st["available"] else "unavailable"
        print(f"  {name:<10} {mark} {st['reason']}")
    print("ops and the backends with a kernel for them:")
    for op, bs in info["op_backends"].items():
        print(f"  {op:<10} {', '.join(bs)}")


if __name__ == "__main__":
    main()

"""One small MSCA forward + backward per GPU backend, for compute-sanitizer (tools/gpu_check.sh).

    compute-sanitizer --tool memcheck --error-exitcode 3 python tools/sanitize_msca.py

Shapes: a vector-path case (C a multiple of 8, channels_last) and a tail case (odd C, H < 21,
W just over a tile), float16 and float32. Prints "sanitize case done" at the end; exits 91
without a GPU, 1 when an output is not finite.
"""
from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="cuda,triton", help="comma-separated (default: cuda,triton)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to sanitize")
        return 91
    import segnext_kernels as sk
    from segnext_kernels.msca.reference import weight_shapes

    status = sk.available_backends()
    ok = True
    for backend in args.backends.split(","):
        if not status[backend].available or backend not in sk.op_backends()["msca"]:
            print(f"{backend}: skipped ({status[backend].reason})")
            continue
        for dtype in (torch.float16, torch.float32):
            for B, C, H, W in ((2, 24, 20, 40), (1, 5, 7, 33)):
                g = torch.Generator().manual_seed(C)
                u = torch.randn(B, C, H, W, generator=g).to("cuda", dtype)
                u = u.contiguous(memory_format=torch.channels_last).requires_grad_(True)
                ws = [(torch.randn(s, generator=g) * 0.2).to("cuda", dtype).requires_grad_(True)
                      for s in weight_shapes(C)]
                out = sk.msca(u, *ws, backend=backend)
                out.backward(torch.randn_like(out))
                torch.cuda.synchronize()
                finite = bool(torch.isfinite(out).all()) and all(
                    bool(torch.isfinite(t.grad).all()) for t in [u] + ws)
                ok &= finite
                print(f"{backend} {str(dtype)[6:]} {B}x{C}x{H}x{W}: {'ok' if finite else 'NOT FINITE'}",
                      flush=True)
    print("sanitize case done")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

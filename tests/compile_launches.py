"""Compile every Triton kernel launch the GPU launchers make, for a GPU architecture, on a
machine without a GPU, and report each compiled kernel's registers, local memory and shared memory.

Run as a script (the compile-only tests start it in a subprocess without TRITON_INTERPRET, which
must not be set when Triton compiles for real)::

    python tests/compile_launches.py {msca,nmf} ARCH [ARCH ...]      # ARCH: 80, 90, ...

prints one JSON line per distinct compiled launch: kernel, arch, launch options, ``regs``,
``stack`` (bytes of local memory per thread: register spills), ``smem``, or ``error``.

How: the launchers are called on CPU tensors with their GPU choices forced on (tiles, warps,
``maxnreg``) and every kernel replaced by a recorder; each recorded launch is compiled as the JIT
would specialise it (pointers 16-byte aligned, integers equal to 1 made constants, integers
divisible by 16 marked so) with ``triton.compile`` and its cubin's resource usage read with the
``cuobjdump`` bundled with Triton's NVIDIA backend (``regs``/``stack`` are None without it).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record(module, kernel_names, run) -> list:
    """The launches ``run()`` makes of ``module``'s kernels ``kernel_names``."""
    launches: list = []
    saved = {name: getattr(module, name) for name in kernel_names}
    try:
        for name, kernel in saved.items():
            setattr(module, name, _Recorder(kernel, launches))
        run()
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)
    return launches


def specialise(kernel, args, kwargs):
    """(signature, constexprs, attrs, options) of one launch, as the JIT specialises it."""
    values = dict(zip(kernel.arg_names, args), **kwargs)
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = _POINTER_TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        elif p.do_not_specialize:
            sig[p.name] = "i32"
        elif v == 1:
            sig[p.name], const[p.name] = "constexpr", 1
        else:
            sig[p.name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    return sig, const, attrs, options


def _resource_usage(cubin: bytes):
    """(registers, stack bytes) of a cubin, or (None, None) without cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    if not os.path.exists(cuobjdump):
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
    return (int(re.search(r"REG:(\d+)", usage).group(1)),
            int(re.search(r"STACK:(\d+)", usage).group(1)))


def compile_launches(launches, arch: int, describe):
    """Compile each distinct launch for sm_``arch``; yields one result dict per compiled kernel,
    as it is compiled."""
    seen = set()
    for kernel, args, kwargs in launches:
        sig, const, attrs, options = specialise(kernel, args, kwargs)
        key = (kernel.__name__, repr(sorted(sig.items())), repr(sorted(const.items())),
               repr(sorted(attrs)), repr(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        res = dict(kernel=kernel.__name__, arch=arch, **describe(const, sig), options=options)
        # a crash inside the compiler kills this process: say first what it was compiling
        print(f"compiling {json.dumps(res)}", file=sys.stderr, flush=True)
        try:
            ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as exc:  # reported, so that one run shows every failing launch
            res["error"] = f"{type(exc).__name__}: {str(exc)[-3000:]}"
        else:
            res["smem"] = ck.metadata.shared
            res["regs"], res["stack"] = _resource_usage(ck.asm["cubin"])
        yield res


# --------------------------------------------------------------------------------------------
# the launches of each op
# --------------------------------------------------------------------------------------------
# MSCA: the SegNeXt channel counts that give distinct tiles (C = 32: 32-wide 1x1-conv tiles,
# C >= 64: 64-wide), every dtype and both memory formats, batch 1 and 2 (batch 1 is a constant).
MSCA_SHAPES = [(2, 32, 64, 64), (1, 64, 48, 40), (2, 160, 32, 32)]
MSCA_KERNELS = ("msca_dw_forward_kernel", "msca_pointwise_kernel",
                "msca_pointwise_backward_kernel", "msca_pointwise_wgrad_kernel",
                "msca_strip_backward_kernel", "msca_dw5_backward_kernel")

# NMF (b, D, N, R, steps, N chunks): the SegNeXt-T/S (R = 16) and -B/L (R = 64) heads at 512²
# crops, and the other padded ranks the launchers configure differently (R = 1, a constant;
# BR = 32 and 128).
NMF_SHAPES = [(1, 256, 4096, 16, 6, 16), (1, 512, 4096, 64, 6, 8), (1, 256, 1024, 1, 6, 4),
              (1, 256, 1024, 32, 6, 4), (1, 256, 1024, 128, 6, 4)]
NMF_KERNELS = ("nmf_forward_kernel", "nmf_coef_kernel", "nmf_bases_kernel",
               "nmf_backward_kernel", "nmf_coef_grad_kernel", "nmf_bases_grad_kernel",
               "nmf_dx_kernel")


def msca_launches() -> list:
    from segnext_kernels.msca import reference, triton as T

    T._on_gpu = lambda t: True  # the launchers' GPU tiles and warps, on CPU tensors

    def run():
        for B, C, H, W in MSCA_SHAPES:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for fmt in (torch.contiguous_format, torch.channels_last):
                    u = torch.rand(B, C, H, W, dtype=dtype).contiguous(memory_format=fmt)
                    ws = [torch.rand(s, dtype=dtype) for s in reference.weight_shapes(C)]
                    T.msca_forward(u, *ws)
                    T.msca_backward(torch.rand_like(u), u, *ws)

    return record(T, MSCA_KERNELS, run)


def nmf_launches() -> list:
    from segnext_kernels.nmf2d import triton as T

    def run():
        for b, D, N, R, steps, n_chunks in NMF_SHAPES:
            X, dY, bases = torch.rand(b, D, N), torch.rand(b, D, N), torch.rand(b, D, R)
            for grad in ("unrolled", "one_step"):
                for chunks in (1, n_chunks):  # persistent and split kernels
                    _, *saved = T.nmf_forward(X, bases, steps, 1e-6, 1.0, grad == "unrolled",
                                              chunks)
                    T.nmf_backward(dY, X, *saved, steps, 1e-6, 1.0, grad, chunks)

    return record(T, NMF_KERNELS, run)


def _describe_msca(const, sig) -> dict:
    ptr = sig.get("u_ptr", sig.get("s_ptr"))
    return dict(dtype=ptr.lstrip("*"), **{k: v for k, v in const.items() if k != "DOT_PRECISION"})


def _describe_nmf(const, sig) -> dict:
    return dict(BR=const["BR"], R=const.get("R", "R"), UNROLLED=const.get("UNROLLED"))


def main(argv) -> int:
    op, archs = argv[0], [int(a) for a in argv[1:]]
    launches, describe = {"msca": (msca_launches, _describe_msca),
                          "nmf": (nmf_launches, _describe_nmf)}[op]
    recorded = launches()
    for arch in archs:
        for res in compile_launches(recorded, arch, describe):
            print(json.dumps(res, default=str), flush=True)
    return 0


def compile_in_subprocesses(op: str, archs=(80, 90), timeout: float = 1800) -> list:
    """Run this script for ``op``, one process per architecture (in parallel), without
    TRITON_INTERPRET; the results of every process. A process that fails (a crash inside the
    compiler) raises AssertionError with the end of its stderr, which names the launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [(arch, subprocess.Popen([sys.executable, os.path.abspath(__file__), op, str(arch)],
                                     env=env, cwd=root, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True))
             for arch in archs]
    results = []
    for arch, proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{op}, sm_{arch}: the compile process failed:\n{err[-6000:]}"
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results


# an A100 gives one block at most 163 KB of shared memory (an H100: 227 KB)
SMEM_LIMIT = 160 * 1024


def check_results(results: list, kernels, archs=(80, 90)) -> None:
    """Every kernel compiled for every architecture, without error, within SMEM_LIMIT, and
    without local memory (register spills); skips the spill check without cuobjdump."""
    import pytest

    failed = [r for r in results if "error" in r]
    assert not failed, "failed to compile:\n" + "\n".join(map(str, failed))
    for arch in archs:
        compiled = {r["kernel"] for r in results if r["arch"] == arch}
        assert compiled == set(kernels), f"sm_{arch}: compiled {sorted(compiled)}"
    too_big = [r for r in results if r["smem"] > SMEM_LIMIT]
    assert not too_big, "shared memory above an A100's:\n" + "\n".join(map(str, too_big))
    if any(r["stack"] is None for r in results):
        pytest.skip("cuobjdump (bundled with triton's NVIDIA backend) not found: every kernel "
                    "compiled, register spills not checked")
    spilled = [r for r in results if r["stack"] != 0]
    assert not spilled, "local memory (register spills) in:\n" + "\n".join(map(str, spilled))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

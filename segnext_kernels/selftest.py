"""Each fused kernel checked against the reference on this machine.

``check(op, backend, device, dtype, layout)`` runs one kernel configuration on a few small
shapes chosen to hit edge cases (H or W below the largest kernel, 1, primes, channel tails),
forward and every gradient the kernel has, against the reference computed in float64 from the
same (rounded) inputs. Dispatch calls it once per configuration before a kernel's first use
(segnext_kernels/dispatch.py); ``python -m segnext_kernels.selftest`` runs every configuration
of every available backend and prints a table.

The inputs come from a private generator, so a check never moves the global RNG.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import backends, dispatch
from .dispatch import CheckResult

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

# Largest error allowed, relative to the largest magnitude of the reference tensor.
TOL = {F32: 1e-4, F16: 1e-2, BF16: 2e-2, F64: 1e-9}

# (what, the kernel's tensor, the float64 reference's[, the reference's in the kernel's dtype])
Compared = List[tuple]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (inf when got has NaN/inf where ref is finite)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.shape != ref.shape:
        return math.inf
    diff = (got - ref).abs()
    if not bool(torch.isfinite(diff).all()):
        return math.inf
    scale = ref.abs().max().item() if ref.numel() else 0.0
    d = diff.max().item() if diff.numel() else 0.0
    return d / scale if scale > 0 else d


def _memory_format(layout: str):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


class _Inputs:
    """Random inputs from a private generator (float64 on the CPU, then cast and moved)."""

    def __init__(self, device, dtype, layout, seed=20221123):
        self.gen = torch.Generator().manual_seed(seed)
        self.device, self.dtype, self.layout = device, dtype, layout

    def randn(self, shape, scale=1.0):
        return torch.randn(shape, generator=self.gen, dtype=F64) * scale

    def rand(self, shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(shape, generator=self.gen, dtype=F64)

    def cast(self, t: torch.Tensor, grad=True, image=False) -> torch.Tensor:
        t = t.to(self.device, self.dtype)
        if image:
            t = t.contiguous(memory_format=_memory_format(self.layout))
        return t.requires_grad_(grad)


def _leaf64(t: torch.Tensor) -> torch.Tensor:
    """The reference's input: the kernel's (rounded) input in float64 on the CPU."""
    return t.detach().to("cpu", F64).requires_grad_(t.requires_grad)


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def _layout_problem(out: torch.Tensor, like: torch.Tensor, layout: str) -> Optional[str]:
    if out.dtype != like.dtype:
        return f"output dtype {out.dtype}, expected {like.dtype}"
    if out.shape != like.shape:
        return f"output shape {tuple(out.shape)}, expected {tuple(like.shape)}"
    if layout == "channels_last" and out.dim() == 4 and out.shape[1] > 1 and \
            not out.is_contiguous(memory_format=torch.channels_last):
        return "output is not channels_last"
    return None


# ---- per-op cases ---------------------------------------------------------------------------
# Each returns the tensors to compare for one shape; a string instead means a contract breach.

MSCA_SHAPES = ((1, 3, 6, 23), (2, 17, 9, 1), (1, 5, 1, 2))


def _msca_case(backend, inp: _Inputs, shape) -> Compared | str:
    from .msca.reference import msca_ref, weight_shapes
    from .ops import msca_fused

    C = shape[1]
    u = inp.cast(inp.randn(shape), image=True)
    ws = [inp.cast(inp.randn(s, 0.3)) for s in weight_shapes(C)]
    out = msca_fused(u, ws, backend)
    bad = _layout_problem(out, u, inp.layout)
    if bad:
        return bad
    g = inp.randn(shape)
    grads = _grads(out, [u] + ws, inp.cast(g, grad=False, image=True))
    u64, ws64 = _leaf64(u), [_leaf64(w) for w in ws]
    ref = msca_ref(u64, *ws64)
    rgrads = _grads(ref, [u64] + ws64, g)
    names = ["grad u"] + [f"grad {n}" for n in _msca_weight_names()]
    return [("out", out, ref)] + list(zip(names, grads, rgrads))


def _msca_weight_names():
    from .msca.reference import MSCAWeights
    return MSCAWeights._fields


DWCONV_GELU_SHAPES = ((1, 3, 1, 5), (2, 11, 7, 2), (1, 17, 5, 13))


def _dwconv_gelu_case(backend, inp: _Inputs, shape) -> Compared | str:
    from .dwconv_gelu.reference import dwconv_gelu_ref
    from .ops import dwconv_gelu_fused

    C = shape[1]
    x = inp.cast(inp.randn(shape), image=True)
    w, b = inp.cast(inp.randn((C, 1, 3, 3), 0.5)), inp.cast(inp.randn((C,), 0.5))
    out = dwconv_gelu_fused(x, w, b, backend)
    bad = _layout_problem(out, x, inp.layout)
    if bad:
        return bad
    g = inp.randn(shape)
    grads = _grads(out, [x, w, b], inp.cast(g, grad=False, image=True))
    x64, w64, b64 = _leaf64(x), _leaf64(w), _leaf64(b)
    ref = dwconv_gelu_ref(x64, w64, b64)
    rgrads = _grads(ref, [x64, w64, b64], g)
    return [("out", out, ref)] + list(zip(("grad x", "grad weight", "grad bias"), grads, rgrads))


MLP_SHAPES = ((1, 5, 7, 3), (2, 3, 1, 9), (1, 8, 4, 4))


def _mlp_case(backend, inp: _Inputs, shape) -> Compared | str:
    from .mlp.reference import mlp_ref
    from .ops import mlp_fused

    C = shape[1]
    hidden = 4 * C + 1
    x = inp.cast(inp.randn(shape), grad=False, image=True)
    shapes = [(hidden, C, 1, 1), (hidden,), (hidden, 1, 3, 3), (hidden,), (C, hidden, 1, 1), (C,)]
    ws = [inp.cast(inp.randn(s, 0.4), grad=False) for s in shapes]
    with torch.no_grad():
        out = mlp_fused(x, ws, backend)
    bad = _layout_problem(out, x, inp.layout)
    if bad:
        return bad
    ref = mlp_ref(_leaf64(x), *[_leaf64(w) for w in ws])
    return [("out", out, ref)]


STRIP_CONV_CASES = (((1, 3, 6, 23), (1, 21)), ((2, 9, 5, 1), (7, 1)), ((1, 4, 1, 3), (1, 11)))


def _strip_conv_case(backend, inp: _Inputs, case) -> Compared | str:
    import torch.nn.functional as F

    shape, (kh, kw) = case
    C = shape[1]
    x = inp.cast(inp.randn(shape), grad=False, image=True)
    w, b = inp.cast(inp.randn((C, 1, kh, kw), 0.3), grad=False), inp.cast(inp.randn((C,)), grad=False)
    out = torch.ops.segnext_C.strip_conv_forward(x, w, b)
    bad = _layout_problem(out, x, inp.layout)
    if bad:
        return bad
    ref = F.conv2d(_leaf64(x), _leaf64(w), _leaf64(b), padding=(kh // 2, kw // 2), groups=C)
    return [("out", out, ref)]


# (b, D, N, R, steps): R > N, N = 1, D and N not multiples of the tiles
NMF_CASES = ((2, 5, 7, 3, 2), (1, 17, 3, 4, 1), (1, 9, 1, 2, 3))


def _nmf2d_case(backend, inp: _Inputs, case) -> Compared | str:
    from .nmf2d.reference import nmf_decompose_ref
    from .ops import nmf2d_fused

    b, D, N, R, steps = case
    if not dispatch.kernel("nmf2d", backend).backward:
        return _nmf2d_inference_case(backend, inp, case)
    out: Compared = []
    for grad in ("unrolled", "one_step"):
        X = inp.cast(inp.rand((b, D, N), 0.1, 1.0))
        B0 = inp.rand((b, D, R), 0.05, 1.0)
        B0 = inp.cast(B0 / B0.norm(dim=1, keepdim=True), grad=(grad == "unrolled"))
        Y = nmf2d_fused(X, B0, steps, 1e-6, 1.0, grad, backend)
        g = inp.randn((b, D, N))
        leaves = [X, B0] if grad == "unrolled" else [X]
        grads = _grads(Y, leaves, inp.cast(g, grad=False))
        refs = []
        for dt in (F64, X.dtype):  # float64, and the kernel's dtype: the rounding noise
            Xr, Br = X.detach().to("cpu", dt).requires_grad_(), B0.detach().to("cpu", dt)
            Br.requires_grad_(grad == "unrolled")
            Yr = nmf_decompose_ref(Xr, Br, steps, 1e-6, 1.0, grad)
            refs.append([Yr] + list(_grads(Yr, [Xr, Br] if grad == "unrolled" else [Xr],
                                           g.to(dt))))
        names = [f"{grad} Y", f"{grad} grad X", f"{grad} grad bases"]
        out += list(zip(names, [Y] + list(grads), refs[0], refs[1]))
    return out


def _nmf2d_inference_case(backend, inp: _Inputs, case) -> Compared | str:
    """An inference-only NMF kernel (cpu): the forward on the (b, D, H, W) map, in the layout,
    with S = 1 and, for D even, S = 2 groups."""
    from .nmf2d.reference import nmf_decompose_ref
    from .ops import nmf2d_inference

    b, D, N, R, steps = case
    H, W = (N, 1) if N % 2 else (N // 2, 2)
    out: Compared = []
    for S in (1, 2) if D % 2 == 0 else (1,):
        x = inp.cast(inp.rand((b, D, H, W), 0.1, 1.0), grad=False, image=True)
        B0 = inp.rand((b * S, D // S, R), 0.05, 1.0)
        B0 = inp.cast(B0 / B0.norm(dim=1, keepdim=True), grad=False)
        with torch.no_grad():
            Y = nmf2d_inference(x, B0, S, steps, 1e-6, 1.0)
        bad = _layout_problem(Y, x, inp.layout)
        if bad:
            return bad
        refs = []
        for dt in (F64, x.dtype):  # float64, and the kernel's dtype: the rounding noise
            Xr = x.detach().to("cpu", dt).reshape(b * S, D // S, N)
            Yr = nmf_decompose_ref(Xr, B0.detach().to("cpu", dt), steps, 1e-6, 1.0)
            refs.append(Yr.reshape(b, D, H, W))
        out.append((f"S={S} Y", Y, refs[0], refs[1]))
    return out


# (x shape, out channels): a channel tail on both sides, 1-pixel and prime-sized maps
CONV1X1_CASES = (((2, 17, 5, 7), 33), ((1, 32, 3, 1), 16), ((1, 3, 1, 1), 1))


def _conv1x1_case(backend, inp: _Inputs, case) -> Compared | str:
    from .conv1x1 import conv1x1_ref
    from .ops import conv1x1_fused

    shape, N = case
    B, K, H, W = shape
    x = inp.cast(inp.randn(shape), grad=False, image=True)
    w = inp.cast(inp.randn((N, K, 1, 1), K ** -0.5), grad=False)
    b = inp.cast(inp.randn((N,)), grad=False)
    r = inp.cast(inp.randn((B, N, H, W)), grad=False, image=True)
    s = inp.cast(inp.randn((N,)), grad=False)
    out: Compared = []
    for act, res in (("gelu", False), ("none", True), ("relu", True)):
        with torch.no_grad():
            y = conv1x1_fused(x, w, b, act, r if res else None, s if res else None, backend)
        bad = _layout_problem(y, r, inp.layout)
        if bad:
            return bad
        ref = conv1x1_ref(_leaf64(x), _leaf64(w), _leaf64(b), act, _leaf64(r) if res else None,
                          _leaf64(s) if res else None)
        out.append((f"{act}{' + residual' if res else ''}", y, ref))
    return out


CASES: Dict[str, Tuple[Callable, Sequence]] = {
    "conv1x1": (_conv1x1_case, CONV1X1_CASES),
    "msca": (_msca_case, MSCA_SHAPES),
    "dwconv_gelu": (_dwconv_gelu_case, DWCONV_GELU_SHAPES),
    "mlp": (_mlp_case, MLP_SHAPES),
    "strip_conv": (_strip_conv_case, STRIP_CONV_CASES),
    "nmf2d": (_nmf2d_case, NMF_CASES),
}


def _tolerance(op: str, dtype) -> float:
    return TOL[dtype]


def _bound(tol: float, ref64, ref_same_dtype) -> float:
    """The tolerance, widened to the reference's own rounding noise in the kernel's dtype where
    that is larger: NMF's iterations can forget their start (e.g. the bases gradient with
    R > N after a few steps is pure rounding), and no kernel can do better than that."""
    if ref_same_dtype is None:
        return tol
    noise = rel_err(ref_same_dtype, ref64)
    return max(tol, 2 * noise) if noise <= 1e-2 else 4 * noise


def _context(device: torch.device):
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    if device.type in ("cpu", "cuda"):
        stack.enter_context(torch.autocast(device.type, enabled=False))
    return stack


def _version_note(backend: str) -> str:
    if backend != "triton":
        return ""
    try:
        import triton
        return f" (triton {triton.__version__})"
    except Exception:  # pragma: no cover
        return ""


def check(op: str, backend: str, device: torch.device, dtype: torch.dtype,
          layout: str) -> CheckResult:
    """Run one kernel configuration's check (see the module docstring)."""
    case_fn, cases = CASES[op]
    tol = _tolerance(op, dtype)
    inp = _Inputs(device, dtype, layout)
    worst, detail = 0.0, ""
    t0 = time.perf_counter()
    try:
        with _context(device):
            for case in cases:
                res = case_fn(backend, inp, case)
                if isinstance(res, str):
                    return CheckResult(False, math.inf, tol, time.perf_counter() - t0,
                                       f"{res} at {case}")
                for what, got, ref, *noisy in res:
                    bound = _bound(tol, ref, noisy[0] if noisy else None)
                    err = rel_err(got, ref) * (tol / bound)  # in units of the tolerance
                    if err > worst:
                        worst = err
                        if err > tol:
                            detail = f"{what} at {case}"
                if worst > tol:
                    break
    except Exception as exc:  # a kernel that fails to compile or launch is not used
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return CheckResult(False, math.inf, tol, time.perf_counter() - t0,
                           f"raised {msg[:300]}{_version_note(backend)}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ok = worst <= tol
    return CheckResult(ok, worst, tol, time.perf_counter() - t0, "" if ok else detail)


# ---- the command ----------------------------------------------------------------------------

def configurations(backend_filter=None, op_filter=None, device_filter=None):
    """Every (op, backend, device, dtype, layout) a kernel of an available backend can run here."""
    out = []
    for op in dispatch.ops():
        for backend in backends.BACKENDS:
            if backend == "reference" or (backend_filter and backend not in backend_filter):
                continue
            if op_filter and op not in op_filter:
                continue
            k = dispatch.kernel(op, backend)
            if k is None or not backends.is_available(backend):
                continue
            devices = []
            if torch.cuda.is_available() and backends.runs_on(backend, "cuda"):
                devices.append(torch.device("cuda", torch.cuda.current_device()))
            if backends.runs_on(backend, "cpu"):
                devices.append(torch.device("cpu"))
            for device in devices:
                if device_filter and device.type not in device_filter:
                    continue
                for dtype in k.dtypes:
                    for layout in k.layouts:
                        if k.config_refusal(device.type, dtype, layout) is None:
                            out.append((op, backend, device, dtype, layout))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m segnext_kernels.selftest",
                                 description="Check every fused kernel against the reference here.")
    ap.add_argument("--backend", action="append", choices=[b for b in backends.BACKENDS
                                                            if b != "reference"],
                    help="only this backend (repeatable)")
    ap.add_argument("--op", action="append", choices=list(CASES), help="only this op (repeatable)")
    ap.add_argument("--device", action="append", choices=("cpu", "cuda"),
                    help="only this device type (repeatable)")
    ap.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    args = ap.parse_args(argv)

    rows = []
    configs = configurations(args.backend, args.op, args.device)
    if not configs:
        print("no fused kernel is available here: " + "; ".join(
            f"{n}: {s.reason}" for n, s in backends.available_backends().items() if n != "reference"))
        return 0
    head = f"{'op':<12} {'backend':<8} {'device':<7} {'dtype':<9} {'layout':<14} " \
           f"{'max error':>10} {'tol':>6} {'result':<6} {'time':>8}"
    print(head)
    print("-" * len(head))
    failed = 0
    for op, backend, device, dtype, layout in configs:
        res = dispatch.run_check(op, backend, device, dtype, layout)
        failed += not res.ok
        dt = str(dtype).replace("torch.", "")
        print(f"{op:<12} {backend:<8} {str(device):<7} {dt:<9} {layout:<14} "
              f"{res.max_err:>10.2e} {res.tol:>6.0e} {'pass' if res.ok else 'FAIL':<6} "
              f"{res.seconds * 1e3:>6.0f} ms" + ("" if res.ok else f"  {res.detail}"))
        rows.append(dict(op=op, backend=backend, device=str(device), dtype=dt, layout=layout,
                         max_err=res.max_err, tol=res.tol, ok=res.ok, seconds=res.seconds,
                         detail=res.detail))
    print(f"{len(rows) - failed} passed, {failed} failed")
    if args.json:
        from .info import collect
        with open(args.json, "w") as f:
            json.dump(dict(info=collect(), checks=rows), f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

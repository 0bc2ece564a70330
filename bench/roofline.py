"""Measured ceilings of the device and the floors (minimal time) of each benchmarked op.

Ceilings, measured once at the start of a run (datasheet clocks are not trusted):
- memory bandwidth: a large tensor copy, counting bytes read plus bytes written;
- FMA rate: the fp32 FMA peak of the cores, from a kernel that runs independent chains of FMAs
  in registers: on CUDA a Triton kernel (the CUDA-core rate depthwise arithmetic runs at); on
  CPU a small C kernel with AVX-512 / AVX2 chains on every thread (``cpu_peak``), stated next
  to the peak computed from the ISA and the clock (cores x FMA pipes x lanes x 2 x GHz);
- GEMM rate per dtype: a large matmul (tensor cores on CUDA for fp16/bf16, TF32 for fp32;
  oneDNN's sgemm on CPU), the rate a dense 1x1 conv or a bmm reaches in practice.

A floor is ``max(bytes / bandwidth, fma_flops / fma_rate + gemm_flops / max(gemm_rate,
fma_rate))``: each input read once, each output written once, the nominal arithmetic done once
(no halo recompute), at the hardware's peak (GEMM arithmetic is FMAs too, so it is bounded by
the faster of the two rates; on a CPU the sgemm rate is below the FMA peak). The achieved
fraction of it is ``floor / measured``, at most 100% except where data stays in cache. FLOPs
count an FMA as 2.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import torch

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


@dataclass
class Ceilings:
    device: str
    bandwidth_Bps: Optional[float] = None
    bandwidth_method: str = ""
    fma_flops: Optional[float] = None       # FLOP/s of FMA-bound elementwise/depthwise work
    fma_method: str = ""
    gemm_flops: Dict[str, float] = field(default_factory=dict)   # dtype name -> FLOP/s
    gemm_method: Dict[str, str] = field(default_factory=dict)
    fma_peak_computed: Optional[float] = None    # CPU: cores x pipes x lanes x 2 x clock
    fma_peak_computed_method: str = ""
    fma_flop_per_cycle: Optional[float] = None   # CPU: cores x pipes x lanes x 2
    clock_ghz_measured: Optional[float] = None   # CPU: dependent add chain on one core
    errors: Dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> list:
        lines = []
        if self.bandwidth_Bps:
            lines.append(f"memory bandwidth {self.bandwidth_Bps / 1e9:.1f} GB/s "
                         f"({self.bandwidth_method})")
        if self.fma_flops:
            lines.append(f"FMA rate {self.fma_flops / 1e9:.0f} GFLOP/s ({self.fma_method}); "
                         "the floors' compute ceiling")
        if self.fma_peak_computed_method:
            value = (f"{self.fma_peak_computed / 1e9:.0f} GFLOP/s = " if self.fma_peak_computed
                     else "")
            lines.append(f"FMA peak from ISA and clock: {value}{self.fma_peak_computed_method}")
        if self.clock_ghz_measured:
            at = (f"; at this clock the ISA peak is "
                  f"{self.fma_flop_per_cycle * self.clock_ghz_measured:.0f} GFLOP/s"
                  if self.fma_flop_per_cycle else "")
            lines.append(f"clock measured {self.clock_ghz_measured:.2f} GHz (chain of dependent "
                         f"integer adds on one core, best of short runs){at}")
        for dt, rate in self.gemm_flops.items():
            share = (f", {rate / self.fma_flops:.0%} of the FMA rate"
                     if self.fma_flops and dt == "float32" else "")
            lines.append(f"GEMM rate {dt} {rate / 1e9:.0f} GFLOP/s "
                         f"({self.gemm_method.get(dt, '')}{share})")
        for what, err in self.errors.items():
            lines.append(f"{what}: not measured ({err})")
        return lines


@dataclass
class Cost:
    """The least work an op must do: bytes through memory and FLOPs at the FMA and GEMM rates."""
    bytes: float
    fma_flops: float = 0.0
    gemm_flops: float = 0.0
    gemm_dtype: str = "float32"

    def as_dict(self) -> dict:
        return asdict(self)


def floor(cost: Cost, ceil: Ceilings) -> Optional[dict]:
    """The floor time of ``cost`` on the measured ceilings, or None where a ceiling is missing."""
    if not ceil.bandwidth_Bps:
        return None
    t_mem = cost.bytes / ceil.bandwidth_Bps
    t_fma = cost.fma_flops / ceil.fma_flops if (cost.fma_flops and ceil.fma_flops) else 0.0
    gemm_rate = ceil.gemm_flops.get(cost.gemm_dtype) or ceil.gemm_flops.get("float32")
    gemm_rate = max(gemm_rate or 0.0, ceil.fma_flops or 0.0)  # GEMMs run on the FMA units too
    t_gemm = cost.gemm_flops / gemm_rate if (cost.gemm_flops and gemm_rate) else 0.0
    t_compute = t_fma + t_gemm
    bound = "mem" if t_mem >= t_compute else "compute"
    return dict(seconds=max(t_mem, t_compute), t_mem=t_mem, t_compute=t_compute, bound=bound)


def achieved(cost: Cost, ceil: Ceilings, median_ms: float) -> dict:
    """Floor, fraction of it reached, and the achieved byte and FLOP rates of a measured time."""
    fl = floor(cost, ceil)
    t = median_ms / 1e3
    out = dict(achieved_GBps=cost.bytes / t / 1e9,
               achieved_GFLOPs=(cost.fma_flops + cost.gemm_flops) / t / 1e9)
    if fl is not None:
        out.update(floor_s=fl["seconds"], bound=fl["bound"], fraction_of_floor=fl["seconds"] / t,
                   t_mem_s=fl["t_mem"], t_compute_s=fl["t_compute"])
    return out


# --------------------------------------------------------------------------------------------
# Cost models (docs/kernels.md#floors; the ops: docs/model.md#msca, docs/nmf.md#algorithm)
# --------------------------------------------------------------------------------------------
MSCA_DW_MACS = 25 + 2 * (7 + 11 + 21)  # 5x5, then 1x7+7x1, 1x11+11x1, 1x21+21x1 per element


def elsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def strip_conv_cost(B: int, C: int, H: int, W: int, k: int, dtype: torch.dtype) -> Cost:
    E, s = B * C * H * W, elsize(dtype)
    return Cost(bytes=2 * E * s + C * (k + 1) * s, fma_flops=2 * k * E, gemm_dtype=DTYPE_NAMES[dtype])


def msca_cost(B: int, C: int, H: int, W: int, dtype: torch.dtype, backward: bool) -> Cost:
    """Forward: read u, write out; 103 depthwise MACs and C 1x1 MACs per element.
    Forward+backward: 5 passes (u, out; u, grad_out, grad_u) and 3x the arithmetic (forward,
    grad-input, grad-weight) — recomputation is a design choice, not part of the floor."""
    E, s = B * C * H * W, elsize(dtype)
    params = (C * (MSCA_DW_MACS + 7) + C * C + C) * s
    mult = 3 if backward else 1
    return Cost(bytes=(5 if backward else 2) * E * s + (2 if backward else 1) * params,
                fma_flops=mult * 2 * MSCA_DW_MACS * E, gemm_flops=mult * 2 * C * E,
                gemm_dtype=DTYPE_NAMES[dtype])


def nmf_cost(b: int, D: int, N: int, R: int, steps: int, grad: Optional[str]) -> Cost:
    """The bmm FLOPs of coef init, ``steps`` (coef, bases) updates, the final coef update and the
    reconstruction; bytes: read X and write Y (float32). ``grad``: None (forward only),
    "unrolled" (backward ≈ 2x every product) or "one_step" (backward of the last coef update
    and the reconstruction only)."""
    big = 2 * N * D * R                    # one X-sized product (Xᵀ B, X coef, B coefᵀ)
    coef_upd = big + 2 * D * R * R + 2 * N * R * R
    bases_upd = big + 2 * N * R * R + 2 * D * R * R
    fwd = b * (big + (steps + 1) * coef_upd + steps * bases_upd + big)
    x_pass = b * D * N * 4
    if grad is None:
        return Cost(bytes=2 * x_pass, gemm_flops=fwd)
    bwd = 2 * fwd if grad == "unrolled" else b * 2 * big
    return Cost(bytes=5 * x_pass, gemm_flops=fwd + bwd)


def block_cost(B: int, C: int, H: int, W: int, mlp_ratio: float, dtype: torch.dtype,
               backward: bool) -> Cost:
    """One MSCAN block: 1x1 convs (proj_1, MSCA conv3, proj_2, fc1, fc2) at the GEMM rate,
    depthwise (MSCA, the MLP's 3x3) at the FMA rate; read x, write out (+ the backward passes)."""
    E, s = B * C * H * W, elsize(dtype)
    hidden = int(C * mlp_ratio)
    gemm = 2 * C * E * 3 + 2 * 2 * hidden * E
    fma = 2 * MSCA_DW_MACS * E + 2 * 9 * hidden * H * W * B
    params = (3 * C * C + 2 * C * hidden + C * (MSCA_DW_MACS + 7) + 9 * hidden) * s
    mult = 3 if backward else 1
    return Cost(bytes=(5 if backward else 2) * E * s + (2 if backward else 1) * params,
                fma_flops=mult * fma, gemm_flops=mult * gemm, gemm_dtype=DTYPE_NAMES[dtype])


def dwconv_gelu_cost(B: int, C: int, H: int, W: int, dtype: torch.dtype, backward: bool) -> Cost:
    """Depthwise 3x3 + GELU: 9 FMAs per element (x3 with the backward: z again, grad_x,
    grad_w); read x, write y (backward: read x and grad_y, write grad_x as well)."""
    E, s = B * C * H * W, elsize(dtype)
    mult = 3 if backward else 1
    return Cost(bytes=(5 if backward else 2) * E * s + 10 * C * s, fma_flops=mult * 2 * 9 * E,
                gemm_dtype=DTYPE_NAMES[dtype])


def mlp_cost(B: int, C: int, H: int, W: int, mlp_ratio: float, dtype: torch.dtype) -> Cost:
    """The MSCAN MLP forward: fc1 and fc2 at the GEMM rate, the 3x3 at the FMA rate; read x,
    write the output (the hidden activation need not leave the cache)."""
    E, s = B * C * H * W, elsize(dtype)
    hidden = int(C * mlp_ratio)
    params = (2 * C * hidden + 10 * hidden + C) * s
    return Cost(bytes=2 * E * s + params, fma_flops=2 * 9 * hidden * H * W * B,
                gemm_flops=2 * 2 * hidden * E, gemm_dtype=DTYPE_NAMES[dtype])


# --------------------------------------------------------------------------------------------
# Measuring the ceilings
# --------------------------------------------------------------------------------------------
def _best_time(fn, reps: int, sync=None) -> float:
    fn()
    if sync:
        sync()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - t0)
    return min(samples)  # a ceiling is the best rate reached: other load only slows calls


def _cuda_time(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def _measure_bandwidth(device: torch.device, size: str) -> tuple:
    nbytes = {"smoke": 16 << 20, "quick": 64 << 20, "full": 256 << 20}[size]
    if device.type == "cuda":
        nbytes = {"smoke": 64 << 20, "quick": 512 << 20, "full": 1 << 30}[size]
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst outside the timing
    if device.type == "cuda":
        t = _cuda_time(lambda: dst.copy_(src), reps=20)
    else:
        t = _best_time(lambda: dst.copy_(src), reps=5 if size == "full" else 3)
    how = "median" if device.type == "cuda" else "best"
    return 2 * nbytes / t, f"copy of {nbytes >> 20} MiB, read+write bytes, {how} of repeats"


def _gemm_rate(device: torch.device, dtype: torch.dtype, size: str) -> tuple:
    if device.type == "cuda":
        n = {"smoke": 1024, "quick": 4096, "full": 8192}[size]
        if dtype == torch.float32:
            n = min(n, 4096)
    else:
        n = {"smoke": 256, "quick": 1024, "full": 2048}[size]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    fn = lambda: torch.matmul(a, b, out=c)  # noqa: E731
    if device.type == "cuda":
        prev = torch.backends.cuda.matmul.allow_tf32
        if dtype == torch.float32:
            # the faster rate: a floor must be a lower bound
            torch.backends.cuda.matmul.allow_tf32 = True
        try:
            t = _cuda_time(fn, reps=10)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        how = f"{DTYPE_NAMES[dtype]} matmul {n}^3"
        if dtype == torch.float32:
            how += " (TF32 allowed)"
    else:
        t = _best_time(fn, reps=5 if size == "full" else 3)
        how = f"{DTYPE_NAMES[dtype]} matmul {n}^3, {torch.get_num_threads()} threads"
    return 2 * n ** 3 / t, how


_fma_kernel = None


def _triton_fma_kernel():
    """A Triton kernel of 32 independent-ish fp32 FMA chains per element (4 chains x 8 per loop
    trip), kept in registers: bound by the CUDA-core FMA rate, not by memory."""
    global _fma_kernel
    if _fma_kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def fma_chains(x_ptr, out_ptr, scale, shift, n_iters, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            a = tl.load(x_ptr + offs)
            b = a + 1.0
            c = a + 2.0
            d = a + 3.0
            for _ in range(n_iters):
                for _u in tl.static_range(8):
                    a = tl.fma(a, scale, shift)
                    b = tl.fma(b, scale, shift)
                    c = tl.fma(c, scale, shift)
                    d = tl.fma(d, scale, shift)
            tl.store(out_ptr + offs, a + b + c + d)

        _fma_kernel = fma_chains
    return _fma_kernel


def _measure_fma_cuda(size: str) -> tuple:
    kernel = _triton_fma_kernel()
    props = torch.cuda.get_device_properties(0)
    BLOCK = 1024
    programs = props.multi_processor_count * 16  # enough resident warps to hide FMA latency
    n = programs * BLOCK
    n_iters = {"smoke": 16, "quick": 128, "full": 256}[size]
    x = torch.rand(n, device="cuda")
    out = torch.empty_like(x)
    def fn():
        kernel[(programs,)](x, out, 0.999, 0.001, n_iters, BLOCK=BLOCK, num_warps=4)
    t = _cuda_time(fn, reps=20)
    flops = 2 * n * n_iters * 8 * 4
    return flops / t, "Triton kernel of fp32 FMA chains in registers (CUDA cores)"


def measure_ceilings(device: torch.device, dtypes, size: str, interpret: bool = False) -> Ceilings:
    """Bandwidth, FMA rate and GEMM rate per dtype of ``dtypes`` on ``device``; each
    measurement that fails is noted in ``errors`` and left out (floors are then not reported)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ceil = Ceilings(device=name)
    try:
        ceil.bandwidth_Bps, ceil.bandwidth_method = _measure_bandwidth(device, size)
    except Exception as exc:  # noqa: BLE001 - a failed measurement must not stop the suite
        ceil.errors["bandwidth"] = f"{type(exc).__name__}: {exc}"
    for dt in dict.fromkeys(list(dtypes) + [torch.float32]):
        try:
            rate, how = _gemm_rate(device, dt, size)
            ceil.gemm_flops[DTYPE_NAMES[dt]] = rate
            ceil.gemm_method[DTYPE_NAMES[dt]] = how
        except Exception as exc:  # noqa: BLE001
            ceil.errors[f"gemm {DTYPE_NAMES[dt]}"] = f"{type(exc).__name__}: {exc}"
    if device.type == "cuda":
        if interpret:
            ceil.errors["fma"] = "TRITON_INTERPRET=1: the Triton FMA kernel would run in the interpreter"
        else:
            try:
                ceil.fma_flops, ceil.fma_method = _measure_fma_cuda(size)
            except Exception as exc:  # noqa: BLE001
                ceil.errors["fma (triton)"] = f"{type(exc).__name__}: {exc}"
        if not ceil.fma_flops and "float32" in ceil.gemm_flops:
            # Fall back to the sgemm rate: an upper bound on the FMA rate, so floors stay floors.
            ceil.fma_flops = ceil.gemm_flops["float32"]
            ceil.fma_method = "fallback: " + ceil.gemm_method["float32"]
    else:
        _cpu_fma_peak(ceil, size)
    return ceil


def _cpu_fma_peak(ceil: Ceilings, size: str) -> None:
    """The measured FMA peak on every thread the bench uses, and the peak computed from the ISA
    and the clock; the floors use the measured one (else the computed one, else sgemm)."""
    from . import cpu_peak

    threads = torch.get_num_threads()
    repeats = {"smoke": 50, "quick": 100, "full": 200}[size]
    try:
        peak = cpu_peak.measure_fma_peak(threads, repeats=repeats)
        ceil.fma_flops, ceil.fma_method = peak.flops, peak.describe()
    except Exception as exc:  # noqa: BLE001 - no compiler, a sandbox without ctypes...
        ceil.errors["fma (register-resident loop)"] = f"{type(exc).__name__}: {exc}"
    try:
        ceil.clock_ghz_measured = cpu_peak.measure_clock_ghz(repeats=repeats)
    except Exception as exc:  # noqa: BLE001
        ceil.errors["clock"] = f"{type(exc).__name__}: {exc}"
    computed = cpu_peak.computed_fma_peak(threads)
    ceil.fma_peak_computed = computed.flops
    ceil.fma_peak_computed_method = computed.describe()
    if computed.pipes:
        ceil.fma_flop_per_cycle = float(computed.cores * computed.pipes * computed.lanes * 2)
    if not ceil.fma_flops and computed.flops:
        ceil.fma_flops = computed.flops
        ceil.fma_method = "computed from ISA and clock (the FMA loop could not run)"
    if not ceil.fma_flops and "float32" in ceil.gemm_flops:
        # Last resort, below the true peak: floors then overstate the achieved fraction
        ceil.fma_flops = ceil.gemm_flops["float32"]
        ceil.fma_method = f"fallback: GEMM peak (sgemm, {ceil.gemm_method['float32']})"

"""The CPU's fp32 FMA peak, two ways: measured and computed from the ISA and the clock.

- Measured: a small C kernel (compiled here with the system C compiler, loaded with ctypes)
  runs independent chains of vector FMAs that never leave the registers, on every thread the
  bench uses at once. It picks AVX-512, AVX2+FMA or plain C vectors at run time. Enough chains
  (12) cover the FMA latency (4 cycles) times the pipes (2) of current x86 cores, so the loop
  runs at the issue rate: the core's real FMA peak, which large sgemm calls do not reach.
- Computed: cores x FMA pipes x fp32 lanes x 2 FLOPs x clock. The lanes come from the CPU flags,
  the pipes from a short table of microarchitectures (an assumption, said so), the clock from
  lscpu's "CPU max MHz" or else /proc/cpuinfo's "cpu MHz" (under a hypervisor the nominal clock,
  not the boost clock). The clock the cores actually run at is also measured, with a chain of
  dependent integer adds (one cycle each), to explain a gap between the two peaks.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

CHAINS_PER_THREAD = 12  # independent FMA chains: > FMA latency (4) x pipes (2)

_SOURCE = r"""
#include <stdint.h>
/* 12 named accumulators (an array would be kept in memory, through the stack); CHAINS_WITH
   hands X further arguments */
#define CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define CHAINS_WITH(X, ...) X(0, __VA_ARGS__) X(1, __VA_ARGS__) X(2, __VA_ARGS__)           \
    X(3, __VA_ARGS__) X(4, __VA_ARGS__) X(5, __VA_ARGS__) X(6, __VA_ARGS__) X(7, __VA_ARGS__) \
    X(8, __VA_ARGS__) X(9, __VA_ARGS__) X(10, __VA_ARGS__) X(11, __VA_ARGS__)

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/* NAME(): the 12 chains in registers of the vector type V (intrinsics SET1, FMADD, ADD) on the
   target ISA, their sum reduced to one float by REDUCE */
#define DECL(k, V, SET1) V c##k = SET1(0.5f + 0.01f * k);
#define FMA(k, FMADD) c##k = FMADD(c##k, m, a);
#define SUM(k, ADD) s = ADD(s, c##k);
#define CHAINS_FUNCTION(NAME, ISA, V, SET1, FMADD, ADD, REDUCE)          \
    __attribute__((target(ISA)))                                         \
    static float NAME(int64_t iters, float mul, float add) {             \
        V m = SET1(mul), a = SET1(add), s = SET1(0.f);                   \
        CHAINS_WITH(DECL, V, SET1)                                       \
        for (int64_t i = 0; i < iters; ++i) { CHAINS_WITH(FMA, FMADD) }  \
        CHAINS_WITH(SUM, ADD)                                            \
        return REDUCE(s);                                                \
    }

__attribute__((target("avx2")))
static inline float sum_avx2(__m256 s) {
    float out[8], t = 0.f;
    _mm256_storeu_ps(out, s);
    for (int j = 0; j < 8; ++j) t += out[j];
    return t;
}

CHAINS_FUNCTION(chains_avx512, "avx512f", __m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps,
                _mm512_reduce_add_ps)
CHAINS_FUNCTION(chains_avx2, "avx2,fma", __m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps,
                sum_avx2)
#endif

typedef float v4 __attribute__((vector_size(16)));

#define DECLV(k) v4 c##k = (v4){0.5f, 0.6f, 0.7f, 0.8f} + 0.01f * k;
#define FMAV(k) c##k = c##k * m + a;  /* contracted to FMA (-ffp-contract=fast) */
#define SUMV(k) s += c##k;
static float chains_generic(int64_t iters, float mul, float add) {
    v4 m = {mul, mul, mul, mul}, a = {add, add, add, add}, s = {0.f, 0.f, 0.f, 0.f};
    CHAINS(DECLV)
    for (int64_t i = 0; i < iters; ++i) { CHAINS(FMAV) }
    CHAINS(SUMV)
    return s[0] + s[1] + s[2] + s[3];
}

/* 3: AVX-512 (16 lanes), 2: AVX2+FMA (8 lanes), 1: generic 4-lane vectors */
int fma_isa(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 3;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 2;
#endif
    return 1;
}

float fma_chains(int isa, int64_t iters, float mul, float add) {
#if defined(__x86_64__) || defined(__i386__)
    if (isa == 3) return chains_avx512(iters, mul, add);
    if (isa == 2) return chains_avx2(iters, mul, add);
#endif
    return chains_generic(iters, mul, add);
}

/* 16 dependent integer adds per trip: one cycle each on every current core. -1: no asm. */
int64_t add_chain(int64_t iters, int64_t step) {
    int64_t x = 0;
#if defined(__x86_64__)
    for (int64_t i = 0; i < iters; ++i)
        __asm__ volatile(
            "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\t"
            "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\t"
            "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\t"
            "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\t" : "+r"(x) : "r"(step));
    return x;
#elif defined(__aarch64__)
    for (int64_t i = 0; i < iters; ++i)
        __asm__ volatile(
            "add %0, %0, %1\n\tadd %0, %0, %1\n\tadd %0, %0, %1\n\tadd %0, %0, %1\n\t"
            "add %0, %0, %1\n\tadd %0, %0, %1\n\tadd %0, %0, %1\n\tadd %0, %0, %1\n\t"
            "add %0, %0, %1\n\tadd %0, %0, %1\n\tadd %0, %0, %1\n\tadd %0, %0, %1\n\t"
            "add %0, %0, %1\n\tadd %0, %0, %1\n\tadd %0, %0, %1\n\tadd %0, %0, %1\n\t"
            : "+r"(x) : "r"(step));
    return x;
#else
    (void)iters; (void)step;
    return -1;
#endif
}
"""

ISA_NAMES = {3: "AVX-512", 2: "AVX2+FMA", 1: "generic 4-lane vectors"}
ISA_LANES = {3: 16, 2: 8, 1: 4}


# --------------------------------------------------------------------------------------------
# The compiled kernel
# --------------------------------------------------------------------------------------------
_lib = None


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def load_kernel():
    """The compiled FMA/add-chain library (cached per source in the temp folder)."""
    global _lib
    if _lib is not None:
        return _lib
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang; or set CC)")
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"segnext_bench_{os.getuid() if hasattr(os, 'getuid') else 0}"
    folder.mkdir(parents=True, exist_ok=True)
    so = folder / f"fma_peak_{digest}.so"
    if not so.exists():
        src = folder / f"fma_peak_{digest}.c"
        src.write_text(_SOURCE)
        tmp = folder / f"fma_peak_{digest}.{os.getpid()}.so"
        # -O2 without -ffast-math: the chains stay FMAs; -ffp-contract=fast for the generic path
        out = subprocess.run([cc, "-O2", "-ffp-contract=fast", "-shared", "-fPIC", str(src),
                              "-o", str(tmp)], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(out.stderr or out.stdout).strip()[:300]}")
        os.replace(tmp, so)  # atomic: concurrent benches never load a half-written file
    lib = ctypes.CDLL(str(so))
    lib.fma_isa.restype = ctypes.c_int
    lib.fma_chains.restype = ctypes.c_float
    lib.fma_chains.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_float]
    lib.add_chain.restype = ctypes.c_int64
    lib.add_chain.argtypes = [ctypes.c_int64, ctypes.c_int64]
    _lib = lib
    return lib


def _best_per_thread(fn, threads: int, repeats: int) -> list:
    """Each of ``threads`` threads (started together) times ``fn()`` ``repeats`` times and
    keeps its best; ctypes releases the GIL, so the threads run in parallel. The best of many
    short runs is a run that had its core to itself (the machine may be shared)."""
    barrier = threading.Barrier(threads)
    best = [float("inf")] * threads

    def work(i):
        barrier.wait()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return best


def _calibrate(fn, seconds: float) -> int:
    """Iterations of ``fn(iters)`` that take about ``seconds`` on an idle core."""
    iters = 1 << 10
    while True:
        t0 = time.perf_counter()
        fn(iters)
        dt = time.perf_counter() - t0
        if dt >= seconds or iters >= 1 << 34:
            break
        iters *= 2
    best = dt
    for _ in range(20):  # a calibration run that was preempted would make runs too short
        t0 = time.perf_counter()
        fn(iters)
        best = min(best, time.perf_counter() - t0)
    return max(1, int(iters * seconds / max(best, 1e-9)))


@dataclass
class MeasuredPeak:
    flops: float          # FLOP/s, all threads
    isa: str
    threads: int
    chains: int

    def describe(self) -> str:
        return (f"register-resident FMA loop, {self.isa}, {self.chains} chains, run on each of "
                f"{self.threads} threads at once, sum of each thread's best of short runs")


def measure_fma_peak(threads: int, run_s: float = 0.0005, repeats: int = 200) -> MeasuredPeak:
    """fp32 FMA rate of ``threads`` threads each running the FMA chains: the sum over the
    threads of each one's best rate over ``repeats`` runs of about ``run_s``."""
    lib = load_kernel()
    isa = lib.fma_isa()
    lanes = ISA_LANES[isa]
    iters = _calibrate(lambda n: lib.fma_chains(isa, n, 0.9999999, 1e-7), run_s)
    best = _best_per_thread(lambda: lib.fma_chains(isa, iters, 0.9999999, 1e-7), threads,
                            repeats)
    flops = sum(2.0 * lanes * CHAINS_PER_THREAD * iters / t for t in best)
    return MeasuredPeak(flops, ISA_NAMES[isa], threads, CHAINS_PER_THREAD)


def measure_clock_ghz(run_s: float = 0.0005, repeats: int = 200) -> Optional[float]:
    """The clock one core runs at, from a chain of dependent integer adds (one per cycle),
    best of ``repeats`` short runs; None where the kernel has no add chain for this CPU."""
    lib = load_kernel()
    if lib.add_chain(1, 1) < 0:
        return None
    iters = _calibrate(lambda n: lib.add_chain(n, 1), run_s)
    (best,) = _best_per_thread(lambda: lib.add_chain(iters, 1), 1, repeats)
    return 16 * iters / best / 1e9


# --------------------------------------------------------------------------------------------
# Computed from the ISA and the clock
# --------------------------------------------------------------------------------------------
def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                if ":" in line:
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
    except OSError:
        pass
    return fields


def _lscpu_max_mhz() -> Optional[float]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10)
    except Exception:  # noqa: BLE001 - lscpu missing
        return None
    m = re.search(r"^CPU max MHz:\s*([0-9.]+)", out.stdout, re.MULTILINE)
    return float(m.group(1)) if m else None


def clock_ghz() -> Tuple[Optional[float], str]:
    """(GHz, where it came from): lscpu's max clock, else /proc/cpuinfo's cpu MHz, else the
    "@ x.xxGHz" of the model name."""
    mhz = _lscpu_max_mhz()
    if mhz:
        return mhz / 1e3, "lscpu 'CPU max MHz'"
    info = _cpuinfo()
    if info.get("cpu mhz"):
        try:
            return float(info["cpu mhz"]) / 1e3, "/proc/cpuinfo 'cpu MHz' (nominal under a VM)"
        except ValueError:
            pass
    m = re.search(r"@\s*([0-9.]+)\s*GHz", info.get("model name", ""))
    if m:
        return float(m.group(1)), "model name"
    return None, "no clock in lscpu or /proc/cpuinfo"


def fma_pipes(info: dict) -> Tuple[Optional[int], int, str]:
    """(FMA pipes per core, fp32 lanes per pipe, why) for the widest vector FMA of this CPU."""
    flags = set(info.get("flags", "").split())
    vendor = info.get("vendor_id", "")
    try:
        family = int(info.get("cpu family", "0"))
    except ValueError:
        family = 0
    avx512, avx2 = "avx512f" in flags, "avx2" in flags and "fma" in flags
    if vendor == "AuthenticAMD":
        if family >= 26 and avx512:
            return 2, 16, "AMD Zen 5 (family 26): 2 FMA pipes of 512 bits (256 bits on mobile parts)"
        if family == 25:
            return 2, 8, "AMD Zen 3/4 (family 25): 2 FMA pipes of 256 bits (AVX-512 double-pumped)"
        if family == 23 and avx2:
            return 2, 8, "AMD Zen 2 (family 23): 2 FMA pipes of 256 bits (assumed; Zen 1: 128)"
    if vendor == "GenuineIntel":
        if avx512:
            return 2, 16, "Intel with AVX-512: 2 FMA pipes of 512 bits assumed (1 on some SKUs)"
        if avx2:
            return 2, 8, "Intel with AVX2: 2 FMA pipes of 256 bits (Haswell and later)"
    return None, 0, f"no FMA-pipe entry for {vendor or 'this CPU'} family {family}"


@dataclass
class ComputedPeak:
    flops: Optional[float]
    cores: int
    pipes: Optional[int]
    lanes: int
    ghz: Optional[float]
    clock_source: str
    pipes_source: str

    def describe(self) -> str:
        if self.flops is None:
            return f"not computed ({self.pipes_source if self.pipes is None else self.clock_source})"
        return (f"{self.cores} cores x {self.pipes} FMA pipes x {self.lanes} fp32 lanes x 2 x "
                f"{self.ghz:.2f} GHz; clock from {self.clock_source}; pipes: {self.pipes_source}")


def computed_fma_peak(cores: int) -> ComputedPeak:
    """cores x FMA pipes x lanes x 2 x clock for ``cores`` cores (the threads the bench uses)."""
    info = _cpuinfo()
    pipes, lanes, why = fma_pipes(info)
    ghz, source = clock_ghz()
    flops = cores * pipes * lanes * 2 * ghz * 1e9 if (pipes and ghz) else None
    return ComputedPeak(flops, cores, pipes, lanes, ghz, source, why)

"""The CPU's fp32 FMA peak behind the bench's floors (``bench/cpu_peak.py``): measured with a
register-resident FMA loop, and computed from the ISA and the clock."""
import pytest

from bench import cpu_peak, roofline


def test_measured_fma_peak_is_a_real_vector_rate():
    peak = cpu_peak.measure_fma_peak(1, repeats=20)
    lanes = {"AVX-512": 16, "AVX2+FMA": 8}.get(peak.isa, 4)
    # at least one vector FMA per cycle at 1 GHz: a scalar or memory-bound loop would not be
    assert peak.flops > 2 * lanes * 1e9
    assert "register-resident FMA loop" in peak.describe()
    ghz = cpu_peak.measure_clock_ghz(repeats=20)
    assert ghz is None or 0.5 < ghz < 7.0


def test_fma_pipes_and_clock_sources(monkeypatch):
    zen5 = {"vendor_id": "AuthenticAMD", "cpu family": "26", "flags": "fma avx2 avx512f"}
    assert cpu_peak.fma_pipes(zen5)[:2] == (2, 16)
    zen4 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "flags": "fma avx2 avx512f"}
    assert cpu_peak.fma_pipes(zen4)[:2] == (2, 8)
    assert cpu_peak.fma_pipes({"vendor_id": "Other", "flags": ""})[0] is None

    monkeypatch.setattr(cpu_peak, "_lscpu_max_mhz", lambda: None)
    monkeypatch.setattr(cpu_peak, "_cpuinfo", lambda: dict(zen5, **{"cpu mhz": "2596.1"}))
    ghz, source = cpu_peak.clock_ghz()
    assert ghz == pytest.approx(2.5961) and "/proc/cpuinfo" in source
    peak = cpu_peak.computed_fma_peak(2)
    assert peak.flops == pytest.approx(2 * 2 * 16 * 2 * 2.5961e9)
    assert "2 cores x 2 FMA pipes x 16 fp32 lanes" in peak.describe()
    monkeypatch.setattr(cpu_peak, "_lscpu_max_mhz", lambda: 4100.0)
    assert cpu_peak.clock_ghz() == (4.1, "lscpu 'CPU max MHz'")


def test_floor_runs_gemm_flops_at_the_faster_of_gemm_and_fma_rates():
    cost = roofline.Cost(bytes=1.0, fma_flops=1e9, gemm_flops=2e9)
    slow_sgemm = roofline.Ceilings(device="cpu", bandwidth_Bps=1e12, fma_flops=500e9,
                                   gemm_flops={"float32": 300e9})
    assert roofline.floor(cost, slow_sgemm)["seconds"] == pytest.approx(3e9 / 500e9)
    tensor_cores = roofline.Ceilings(device="gpu", bandwidth_Bps=1e12, fma_flops=50e12,
                                     gemm_flops={"float32": 400e12})
    assert roofline.floor(cost, tensor_cores)["seconds"] == pytest.approx(1e9 / 50e12 + 2e9 / 400e12)

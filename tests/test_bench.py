"""The benchmark suite: a fast smoke test of the CLI (unmarked: runs in the default test run),
unit tests of its pieces, and pytest-benchmark timings of the same kernels (marked
``benchmark_suite``: run with ``python -m pytest --run-benchmarks tests/test_bench.py``)."""
import json
import re

import pytest
import torch

from bench import (bench_block, bench_dwconv_gelu, bench_mlp, bench_model, bench_msca,
                   bench_nmf2d, bench_strip_conv, roofline)
from bench.__main__ import main
from bench.runner import LEVELS, Case, Config, Progress, Runner, Variant
from utils import ignore_mmseg_warnings, one_line_error

HAS_CUDA = torch.cuda.is_available()
RESULT_KEYS = {"level", "pass", "shape", "params", "dtype", "variant", "layout", "backend",
               "metric", "status", "reason", "timing", "graph_timing", "bytes", "vs_eager",
               "vs_best_baseline", "roofline", "first_call_s"}


def _one_json(tmp_path):
    files = sorted(tmp_path.glob("bench_*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".txt").exists()
    return json.loads(files[0].read_text())


def test_cli_smoke_all_levels_writes_json(tmp_path, capsys):
    # (No wall-time assertion: speed lives in the bench, not in unit tests; under a loaded
    # machine this ran 30-230 s.)
    rc = main(["--smoke", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    for level in LEVELS:
        assert f"== {level}:" in out
    assert "measured ceilings:" in out

    data = _one_json(tmp_path)
    env = data["environment"]
    for key in ("device_name", "device_type", "torch", "triton", "cpu_model", "threads",
                "git_commit", "torch_cuda", "segnext_kernels"):
        assert key in env, key
    assert env["device_type"] == "cpu"
    ceil = data["ceilings"]
    assert ceil["bandwidth_Bps"] > 0 and ceil["fma_flops"] > 0
    # the compute ceiling is the cores' FMA peak (register-resident loop), not sgemm's rate
    assert ceil["gemm_flops"]["float32"] > 0 and "FMA loop" in ceil["fma_method"]
    assert ceil["fma_flops"] >= ceil["gemm_flops"]["float32"] and ceil["fma_peak_computed_method"]
    assert data["config"]["size"] == "smoke"

    results = data["results"]
    assert {r["level"] for r in results} == set(LEVELS)
    for r in results:
        assert RESULT_KEYS <= set(r), set(RESULT_KEYS) - set(r)
        assert r["status"] in ("ok", "failed", "skipped")
        if r["status"] != "ok":
            assert r["reason"]
        elif r["metric"] == "time":
            t = r["timing"]
            assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"]
            assert r["vs_eager"] is not None
        else:
            assert r["bytes"] > 0
    # every case has its eager baseline measured
    baselines = [r for r in results if r["variant"] in ("eager", "conv2d") and r["layout"] == "nchw"]
    assert baselines and all(r["status"] == "ok" for r in baselines)
    # Triton under TRITON_INTERPRET=1 (set by conftest) is skipped, not timed
    for r in results:
        if r["backend"] == "triton":
            assert r["status"] == "skipped" and "TRITON_INTERPRET" in r["reason"]
    # the strip-conv CPU op, when built, is timed next to conv2d
    import segnext_kernels as sk
    if sk.available_backends()["cpu"].available:
        ours = [r for r in results if r["level"] == "strip" and r["variant"] == "fused:cpu"]
        assert len(ours) == 6 and all(r["status"] == "ok" for r in ours)
    # roofline numbers of the kernel levels
    msca_ok = [r for r in results if r["level"] == "msca" and r["status"] == "ok"]
    assert msca_ok and all(0 < r["roofline"]["fraction_of_floor"] for r in msca_ok)


def test_cli_quick_filter_strip(tmp_path, capsys):
    rc = main(["--quick", "--device", "cpu", "--filter", "strip", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "== strip:" in out and "== msca:" not in out
    data = _one_json(tmp_path)
    assert {r["level"] for r in data["results"]} == {"strip"}
    kernels = {(r["params"]["kh"], r["params"]["kw"]) for r in data["results"]}
    assert kernels == {(1, 7), (1, 21), (21, 1)}
    assert {r["variant"] for r in data["results"]} >= {"conv2d"}


def test_cli_list_and_bad_filter(capsys):
    assert main(["--smoke", "--device", "cpu", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "msca/fwd+bwd/eager/cl" in listing
    assert main(["--smoke", "--device", "cpu", "--filter", "no-such-variant-xyz"]) == 1
    with pytest.raises(SystemExit):
        main(["--levels", "nonsense"])


def test_cli_levels_dwconv_gelu_and_mlp(capsys):
    # One level per op: dwconv_gelu forward and forward+backward, the whole mlp forward; the
    # level name "mlp" keeps working, its note names the dwconv_gelu level.
    assert main(["--smoke", "--device", "cpu", "--list", "--levels", "mlp"]) == 0
    listing = capsys.readouterr().out
    assert "== mlp ==" in listing and "mlp/fwd/eager/cl  mlp B1 C8->32" in listing
    assert "dwconv_gelu/" not in listing and "--levels dwconv_gelu,mlp" in listing
    assert main(["--smoke", "--device", "cpu", "--list", "--levels", "dwconv_gelu"]) == 0
    listing = capsys.readouterr().out
    assert "== dwconv_gelu ==" in listing and "== mlp ==" not in listing
    for pass_ in ("fwd", "fwd+bwd"):
        assert f"dwconv_gelu/{pass_}/eager/nchw  dwconv_gelu B1 C32 16x16" in listing


@pytest.mark.parametrize("argv,fragment", [
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--device", "foo"], "--device must be cpu, cuda or cuda:N, got 'foo'"),
    (["--device", "meta"], "--device must be cpu, cuda or cuda:N, got 'meta'"),
    (["--compile-budget", "nan"], "--compile-budget must be a finite number"),
    (["--levels", ","], "--levels: unknown level"),
    (["--levels", "msca,nonsense"], "'nonsense'"),
    (["--out", "A_FILE"], "--out must be a folder"),
])
def test_bench_refuses_bad_arguments_in_one_line(argv, fragment, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as exit_info:
        main(["--smoke", "--list", *[str(a_file) if a == "A_FILE" else a for a in argv]])
    assert exit_info.value.code == 2
    one_line_error(capsys, "bench", fragment)
    assert torch.get_num_threads() == threads


def _cfg(**kw):
    return Config(device=torch.device("cpu"), dtype=torch.float32, size="smoke", **kw)


def test_failing_variant_is_reported_and_the_case_goes_on():
    def boom():
        raise RuntimeError("kernel missing\nsecond line")

    def fine():
        x = torch.randn(64)
        return lambda: x * 2

    case = Case(level="msca", pass_="fwd", shape="s", params={}, dtype="float32",
                variants=[Variant("eager", "nchw", "reference", make=fine, baseline=True),
                          Variant("fused:x", "nchw", "x", make=boom),
                          Variant("fused:y", "nchw", "y", skip="unavailable: not built"),
                          Variant("fused:z", "nchw", "z", make=lambda: (lambda: 1 / 0))],
                cost=roofline.Cost(bytes=512, fma_flops=64))
    ceil = roofline.Ceilings(device="cpu", bandwidth_Bps=1e10, fma_flops=1e11)
    results = Runner(_cfg(), ceil, Progress(4, stream=open("/dev/null", "w"))).run_case(case)
    status = [(r.variant, r.status) for r in results]
    assert status == [("eager", "ok"), ("fused:x", "failed"), ("fused:y", "skipped"),
                      ("fused:z", "failed")]
    assert results[1].reason == "RuntimeError: kernel missing"
    assert results[3].reason.startswith("ZeroDivisionError")
    assert results[0].vs_eager == 1.0 and results[0].roofline["bound"] in ("mem", "compute")


def test_compile_budget_skips_further_compile_variants():
    calls = []
    case = Case(level="msca", pass_="fwd", shape="s", params={}, dtype="float32",
                variants=[Variant("compile", "cl", "reference", compiles=True,
                                  make=lambda: (lambda: calls.append(1)))])
    runner = Runner(_cfg(compile=True, compile_budget_s=0.0),
                    roofline.Ceilings(device="cpu"), Progress(1, stream=open("/dev/null", "w")))
    [r] = runner.run_case(case)
    assert r.status == "skipped" and "compile budget" in r.reason and not calls


def test_cost_models_match_the_performance_notes():
    # docs/kernels.md#msca-cost: MSCA fwd, B16 C64 128², fp16: 67.1 MB, 3.46 GFLOP depthwise, 2.15 GFLOP 1x1
    c = roofline.msca_cost(16, 64, 128, 128, torch.float16, backward=False)
    assert abs(c.bytes / 1e6 - 67.1) < 0.5
    assert abs(c.fma_flops / 1e9 - 3.46) < 0.01 and abs(c.gemm_flops / 1e9 - 2.15) < 0.01
    # docs/nmf.md#algorithm (cost): NMF of the SegNeXt-T head, B16 D256 R16 64², 7 steps: ≈9.7 GFLOP
    n = roofline.nmf_cost(16, 256, 64 * 64, 16, 7, None)
    assert 9.0 < n.gemm_flops / 1e9 < 10.5
    assert roofline.nmf_cost(16, 256, 4096, 16, 6, "unrolled").gemm_flops > \
        roofline.nmf_cost(16, 256, 4096, 16, 6, "one_step").gemm_flops
    ceil = roofline.Ceilings(device="x", bandwidth_Bps=3.35e12, fma_flops=66.9e12,
                             gemm_flops={"float16": 989e12})
    fl = roofline.floor(c, ceil)
    assert fl["bound"] == "compute" and 50e-6 < fl["seconds"] < 56e-6  # ≈54 µs


def test_saved_bytes_counts_distinct_storages():
    from bench.common import SavedBytes
    w = torch.randn(8, requires_grad=True)
    x = torch.randn(1000, requires_grad=True)
    counter = SavedBytes(exclude=[w])
    with counter.hooks():
        y = (x * w.sum()) * x  # saves x (twice: counted once), the 0-d sum and x * sum
    assert counter.total == 2 * x.untyped_storage().nbytes() + 4
    del y


# --------------------------------------------------------------------------------------------
# pytest-benchmark: the suite's quick cases, one test per variant
# --------------------------------------------------------------------------------------------
def _bench_params():
    import os
    cfg = Config(device=torch.device("cuda" if HAS_CUDA else "cpu"),
                 dtype=torch.float16 if HAS_CUDA else torch.float32, size="quick",
                 interpret=os.environ.get("TRITON_INTERPRET") == "1")
    params = []
    for module in (bench_strip_conv, bench_msca, bench_dwconv_gelu, bench_mlp, bench_nmf2d,
                   bench_block, bench_model):
        try:
            cases, _ = module.cases(cfg)
        except Exception:  # noqa: BLE001 - a level that cannot be built is not collected
            continue
        for case in cases:
            for v in case.variants:
                tid = re.sub(r"[^A-Za-z0-9+_.x-]+", "_",
                             f"{case.level}-{case.pass_}-{case.shape}-{v.name}-{v.layout}")
                params.append(pytest.param(case, v, id=tid))
    return params


@pytest.mark.benchmark_suite
@pytest.mark.parametrize("case,variant", _bench_params())
def test_benchmark(benchmark, case, variant):
    if variant.skip:
        pytest.skip(variant.skip)
    fn = variant.make()
    fn()  # compile / autotune / first-touch outside the timing
    if HAS_CUDA:
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    benchmark.group = f"{case.level} {case.pass_} {case.shape} {case.dtype}"
    benchmark.extra_info.update(level=case.level, pass_=case.pass_, shape=case.params,
                                dtype=case.dtype, variant=variant.name, layout=variant.layout,
                                backend=variant.backend)
    if case.timer == "step":
        benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark(timed)


@ignore_mmseg_warnings
def test_bench_patch_level_times_mmseg_segnext():
    """``python -m bench --levels patch`` has mmseg's SegNeXt-T rows, as is and hooked (built
    here at the smoke size, where the bench itself leaves them out to stay quick)."""
    pytest.importorskip("mmengine", reason="mmsegmentation not installed "
                        "(pip install -r requirements-mmseg.txt)")
    pytest.importorskip("mmseg", reason="mmsegmentation not installed "
                        "(pip install -r requirements-mmseg.txt)")
    import segnext_kernels as sk
    from bench import bench_patch
    from bench.common import model_fused_backends
    cfg = Config(device=torch.device("cpu"), dtype=torch.float32, size="quick")
    cases, notes = bench_patch.cases(cfg)
    assert [c.pass_ for c in cases if c.shape.startswith("mmseg SegNeXt-T")] == ["infer", "train"]
    assert any("SegNeXtKernelsHook" in n for n in notes)
    cfg.size = "smoke"
    assert not any(c.shape.startswith("mmseg") for c in bench_patch.cases(cfg)[0])
    mm, _ = bench_patch._mmseg_cases(cfg, model_fused_backends(cfg)[0])
    assert [c.pass_ for c in mm] == ["infer", "train"]
    for case in mm:
        names = [v.name for v in case.variants]
        assert names[0] == "eager" and case.variants[0].baseline
        if sk.available_backends()["cpu"].available:
            assert "fused:cpu" in names
        for v in case.variants:
            if v.skip is None:
                out = v.make()()
                assert torch.isfinite(out).all()
    model, _ = bench_patch._mmseg_model("t", 64, cfg, train=False, patched=True)
    assert sum(isinstance(m, (sk.MSCA, sk.FusedMlp, sk.NMF2D)) for m in model.modules()) == 27


def test_cuda_table_columns_render_without_a_gpu():
    from bench import report
    from bench.runner import Result, compare
    from bench.timing import Timing

    def res(variant, layout, med, graph=None, err=""):
        return Result(level="msca", pass_="fwd", shape="B16 C64 128x128", params={}, dtype="float16",
                      variant=variant, layout=layout, backend="x", metric="time", status="ok",
                      timing=Timing(med, med * 0.9, med * 1.2, 50, "do_bench (cold L2, per call)"),
                      graph_timing=None if graph is None else Timing(graph, graph, graph, 10, "graph"),
                      graph_error=err)
    case = Case(level="msca", pass_="fwd", shape="B16 C64 128x128", params={}, dtype="float16",
                variants=[Variant("eager", "cl", "reference", baseline=True),
                          Variant("fused:triton", "cl", "triton")],
                cost=roofline.msca_cost(16, 64, 128, 128, torch.float16, False))
    results = [res("eager", "cl", 0.8, graph=0.5), res("fused:triton", "cl", 0.1, graph=0.08),
               res("fused:cuda", "cl", 0.09, err="RuntimeError: capture failed")]
    ceil = roofline.Ceilings(device="H100", bandwidth_Bps=3e12, fma_flops=60e12,
                             gemm_flops={"float16": 700e12})
    compare(case, results, ceil)
    assert results[1].vs_eager == pytest.approx(8.0)
    assert results[1].graph_vs_eager == pytest.approx(6.25)
    text = report.format_table("msca", results, cuda=True, notes=["n"])
    assert "graph vs eager" in text and "capture failed" in text and "% compute" in text

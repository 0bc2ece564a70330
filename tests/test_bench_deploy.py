"""The bench's "deploy" level (SegNeXt CPU inference against deployment runtimes) and its
interleaved timer."""
import json

import torch

from bench import bench_deploy
from bench.__main__ import main
from bench.runner import LEVELS, OPT_IN_LEVELS, Config, Result, Variant
from bench.timing import Timing, time_interleaved

import segnext_kernels as sk

HAS_CPU = sk.available_backends()["cpu"].available


def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def test_deploy_is_opt_in():
    assert "deploy" in OPT_IN_LEVELS and "deploy" not in LEVELS


def test_cli_deploy_smoke_one_allocator_state(tmp_path, capsys):
    # one worker (one allocator state), the variants that need no compile
    pattern = "deploy/infer glibc-1GiB/(eager|fused:cpu|onnxruntime|openvino:f32)/"
    rc = main(["--smoke", "--levels", "deploy", "--threads", "1", "--filter", pattern,
               "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "== deploy: SegNeXt CPU inference against deployment runtimes ==" in out
    assert "glibc-1GiB = MALLOC_MMAP/TRIM_THRESHOLD_=1 GiB" in out

    (path,) = tmp_path.glob("bench_*.json")
    results = {(r["variant"], r["layout"]): r for r in json.loads(path.read_text())["results"]}
    expected = {("eager", "nchw"), ("eager", "cl"), ("fused:cpu", "cl"), ("onnxruntime", "nchw"),
                ("openvino:f32", "nchw")}
    assert set(results) == expected
    must_run = [("eager", "nchw"), ("eager", "cl")] + [("fused:cpu", "cl")] * HAS_CPU
    if _has("onnx") and _has("onnxruntime"):
        must_run.append(("onnxruntime", "nchw"))
    if _has("onnx") and _has("openvino"):
        must_run.append(("openvino:f32", "nchw"))
    for key in must_run:
        r = results[key]
        assert r["status"] == "ok", (key, r["reason"])
        assert r["params"]["allocator"] == "glibc-1GiB"
        # the worker really ran with the thresholds set
        assert r["extra"]["worker_env"] == {"MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                                            "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
        assert r["extra"]["rel_err"] <= 1e-3 and r["extra"]["labels_agree"] > 0.99
        assert r["extra"]["faults_per_call"] >= 0
        t = r["timing"]
        assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"] and t["reps"] >= 2
    assert results[("eager", "nchw")]["extra"]["rel_err"] == 0.0  # it is the reference
    for key, r in results.items():
        if key not in must_run:
            assert r["status"] == "skipped" and "not installed" in r["reason"]


def test_deploy_cases_cover_sizes_states_and_skip_compile_without_flag():
    cfg = Config(device=torch.device("cpu"), dtype=torch.float32, size="full", compile=False)
    cases, notes = bench_deploy.cases(cfg)
    assert {(c.params["model"], c.params["H"]) for c in cases} == {
        ("segnext_t", 512), ("segnext_t", 1024), ("segnext_b", 512), ("segnext_b", 1024)}
    assert {c.params["allocator"] for c in cases} == {"glibc-default", "glibc-1GiB"}
    for c in cases:
        assert c.measure is not None and len(c.variants) == len(bench_deploy.VARIANTS)
        compiled = [v for v in c.variants if v.name in ("compile", "compile:cpu")]
        assert compiled and all("--compile" in v.skip for v in compiled)
    assert any("NMF bases fixed" in n for n in notes)


def test_worker_env_sets_or_clears_the_malloc_thresholds(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "123")
    assert "MALLOC_MMAP_THRESHOLD_" not in bench_deploy._worker_env("glibc-default")
    env = bench_deploy._worker_env("glibc-1GiB")
    assert env["MALLOC_MMAP_THRESHOLD_"] == env["MALLOC_TRIM_THRESHOLD_"] == str(1 << 30)


def test_a_timed_out_worker_is_rerun_without_the_compile_variants(monkeypatch):
    calls = []

    def fake_spawn(cfg, names, size, side, allocator):
        calls.append(list(names))
        if len(calls) == 1:
            return None, "worker did not finish within 300 s"
        timing = dict(median_ms=2.0, min_ms=1.0, max_ms=3.0, reps=3, method="m")
        return dict(malloc_env={}, variants=[
            dict(name=n, layout=lay, status="ok", timing=timing, first_call_s=0.5,
                 extra=dict(rel_err=1e-6)) for n, lay in names]), ""
    monkeypatch.setattr(bench_deploy, "_spawn", fake_spawn)
    cfg = Config(device=torch.device("cpu"), dtype=torch.float32, size="smoke", compile=True)
    variants = [Variant("eager", "nchw", "reference"), Variant("compile", "cl", "reference"),
                Variant("onnxruntime", "nchw", "-")]
    got = bench_deploy.run_worker(cfg, variants, "t", 64, "glibc-default")
    assert calls[1] == [("eager", "nchw"), ("onnxruntime", "nchw")]
    assert [m.status for m in got] == ["ok", "failed", "ok"]
    assert "did not finish within 300 s" in got[1].reason
    assert got[0].timing.median_ms == 2.0 and got[0].extra["rel_err"] == 1e-6


def test_deploy_table_puts_allocator_states_side_by_side():
    def res(variant, layout, allocator, ms=None, status="ok", reason="", **extra):
        timing = Timing(ms, ms * 0.9, ms * 1.2, 5, "m") if ms else None
        return Result(level="deploy", pass_=f"infer {allocator}", shape="SegNeXt-T B1 512x512",
                      params=dict(allocator=allocator), dtype="float32", variant=variant,
                      layout=layout, backend="-", metric="time", status=status, reason=reason,
                      timing=timing, first_call_s=1.0, extra=extra)
    results = [res("fused:cpu", "cl", "glibc-default", 50.0, rel_err=1e-6, faults_per_call=3),
               res("eager", "cl", "glibc-default", 100.0, rel_err=1e-6),
               res("openvino:default", "nchw", "glibc-default", 25.0, rel_err=0.2,
                   precision="bf16"),
               res("fused:cpu", "cl", "glibc-1GiB", 40.0, rel_err=1e-6),
               res("eager", "cl", "glibc-1GiB", 60.0, rel_err=1e-6),
               res("openvino:default", "nchw", "glibc-1GiB", status="failed",
                   reason="ValueError: boom")]
    text = bench_deploy.format_table(results, ["a note"])
    lines = text.splitlines()
    eager = next(ln for ln in lines if ln.startswith("eager"))
    assert "2.00x" in eager and "1.50x" in eager  # 100/50 and 60/40
    ov = next(ln for ln in lines if ln.startswith("OpenVINO, default precision (bf16)"))
    assert "0.50x" in ov and "failed [1]" in ov and "2.0e-01" in ov
    assert "[1] failed: ValueError: boom" in text and "note: a note" in text


def test_time_interleaved_rotates_the_order_and_times_every_call():
    order = []
    fns = {k: (lambda k=k: order.append(k)) for k in "abc"}
    t = time_interleaved(fns, budget_s=0.0, min_rounds=3, warmup_rounds=1)
    assert order[:3] == ["a", "b", "c"]                       # warm-up round
    assert order[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: v.reps for k, v in t.items()} == {"a": 3, "b": 3, "c": 3}


def test_logit_checks_float32_bound_and_bf16_cosine():
    import pytest
    ref = torch.randn(1, 5, 8, 8)
    close = ref + 1e-5 * torch.randn_like(ref)
    got = bench_deploy.compare_logits(close.numpy(), ref)
    assert got["rel_err"] < 1e-3 and got["cosine"] > 0.999 and got["labels_agree"] == 1.0
    bench_deploy.check_logits(got, None)

    rounded = ref + 0.2 * ref.abs().max() * torch.randn_like(ref) / 4  # bf16-like noise
    got = bench_deploy.compare_logits(rounded, ref)
    with pytest.raises(ValueError, match="max relative error"):
        bench_deploy.check_logits(got, "f32")
    bench_deploy.check_logits(got, "bf16")  # same function, lower precision: accepted

    for broken in (torch.zeros_like(ref), torch.randn_like(ref)):
        with pytest.raises(ValueError, match="cosine"):
            bench_deploy.check_logits(bench_deploy.compare_logits(broken, ref), "bf16")

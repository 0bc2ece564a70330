"""Level "deploy" (opt-in: ``--levels deploy``): SegNeXt inference on the CPU against what a
deployer would run instead. SegNeXt-T and -B, B1, float32, eval, no gradient, at 512² and
1024² (``--quick``: SegNeXt-T at 512²). Rows:

- ``eager`` in NCHW and channels_last: the model on the ``reference`` backend (the baselines);
- ``fused:cpu``: the model on the ``cpu`` backend, channels_last (fused MSCA and MLP, the
  blocks' eval-mode norms and layer scales folded into the convolutions, as the model does);
- ``compile``: ``torch.compile`` (inductor, ``freezing``) of the reference model;
  ``compile:cpu``: the same of the model with our ops (``--compile`` runs both: minutes);
- ``onnxruntime``: the reference model exported by ``segnext.export`` (legacy exporter, opset
  17, static shape), run with all graph optimisations;
- ``openvino:f32`` / ``openvino:default``: the same ONNX file in OpenVINO at f32 inference
  precision and at its default one (bf16 on CPUs with avx512_bf16 or AMX).

Every output is checked against the reference (eager NCHW) on the same image: the NMF bases
are fixed for the whole comparison, one (S, D, R) tensor drawn from a generator seeded with 0,
passed to every PyTorch variant as ``model(img, bases=...)`` and stored in the exported graph as
a constant (``segnext.export``'s fixed-bases mode). The weights are random (seeded) with a
trained-like eval state (layer scales, norm parameters, batch-norm statistics measured on
random images), so that the folding is exercised.

Each case runs in a fresh subprocess, once per allocator state: glibc's defaults (``MALLOC_*``
thresholds unset: large blocks come from fresh pages, page-faulted on every call) and
``MALLOC_MMAP_THRESHOLD_`` = ``MALLOC_TRIM_THRESHOLD_`` = 1 GiB (freed blocks are reused).
Inside a worker every variant is built, called once (compile, export, first-touch, the check),
then timed in interleaved rounds (each round calls each variant once, the order rotated), so
that a shared machine's drifts touch every row alike; medians, and the minor page faults per call.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .runner import Case, Config, Measured, Variant
from .timing import Timing, format_time

NUM_CLASSES = 150
SEED = 0
ONE_GIB = str(1 << 30)
# allocator state -> the MALLOC_* variables set for the worker (every other one is removed)
ALLOCATORS: Dict[str, Dict[str, str]] = {
    "glibc-default": {},
    "glibc-1GiB": {"MALLOC_MMAP_THRESHOLD_": ONE_GIB, "MALLOC_TRIM_THRESHOLD_": ONE_GIB},
}
ALLOCATOR_TITLES = {
    "glibc-default": "glibc malloc defaults",
    "glibc-1GiB": "MALLOC_MMAP/TRIM_THRESHOLD_=1 GiB",
}
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
               "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX")

# (name, layout, backend, title); baselines are the eager rows
VARIANTS = (
    ("eager", "nchw", "reference", "eager, reference backend"),
    ("eager", "cl", "reference", "eager, reference backend"),
    ("fused:cpu", "cl", "cpu", "ours: cpu backend (fused, folded)"),
    ("compile", "cl", "reference", "torch.compile reference (freezing)"),
    ("compile:cpu", "cl", "cpu", "torch.compile with our ops (freezing)"),
    ("onnxruntime", "nchw", "-", "ONNX Runtime (all optimisations)"),
    ("openvino:f32", "nchw", "-", "OpenVINO, f32 precision hint"),
    ("openvino:default", "nchw", "-", "OpenVINO, default precision"),
)
COMPILED = ("compile", "compile:cpu")
# The check of each row's logits against the reference. float32 rows differ only in rounding:
# max|out - ref| / max|ref| must stay below 1e-3. A bf16 row (OpenVINO's default on bf16-capable
# CPUs) rounds activations to 8 mantissa bits, and the NMF's multiplicative iterations amplify
# that (random weights: 0.1-0.6 at SegNeXt-T/B): it is held to a cosine similarity of 0.9 with
# the reference, which a broken graph fails; its error and the share of pixels whose class
# (argmax) agrees are reported like every row's.
MAX_REL_ERR = 1e-3
MIN_COSINE_HALF = 0.9
TIMEOUT_S = {"smoke": 300, "quick": 900, "full": 1800}     # per worker (one case, one allocator)
ROUNDS = {"smoke": (0.0, 2, 20.0), "quick": (10.0, 3, 60.0), "full": (40.0, 7, 300.0)}
DEPLOY_EXTRA = "pip install -e .[deploy]"
PROGRESS_PREFIX = "deploy worker: "  # worker lines the parent echoes


def configs(cfg: Config) -> List[Tuple[str, int]]:
    """(model size, image side), batch 1."""
    if cfg.size == "smoke":
        return [("t", 64)]
    if cfg.size == "quick":
        return [("t", 512)]
    return [("t", 512), ("t", 1024), ("b", 512), ("b", 1024)]


def _missing(module: str) -> Optional[str]:
    import importlib.util
    return None if importlib.util.find_spec(module) else f"not installed ({DEPLOY_EXTRA})"


def _skip_reasons(cfg: Config) -> Dict[str, Optional[str]]:
    import segnext_kernels as sk

    cpu = sk.available_backends()["cpu"]
    no_cpu = None if cpu.available else f"unavailable: {cpu.reason}"
    no_compile = None if cfg.compile else ("torch.compile variants off (--compile runs them; "
                                           "minutes per model and size)")
    onnx = _missing("onnx")
    return {"eager": None, "fused:cpu": no_cpu, "compile": no_compile,
            "compile:cpu": no_compile or no_cpu,
            "onnxruntime": onnx or _missing("onnxruntime"),
            "openvino:f32": onnx or _missing("openvino"),
            "openvino:default": onnx or _missing("openvino")}


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    skips = _skip_reasons(cfg)
    out = []
    for size, side in configs(cfg):
        for allocator in ALLOCATORS:
            variants = [Variant(name, layout, backend, baseline=name == "eager",
                                compiles=name in COMPILED, graph=False, skip=skips[name])
                        for name, layout, backend, _ in VARIANTS]

            def measure(cfg, chosen, size=size, side=side, allocator=allocator):
                return run_worker(cfg, chosen, size, side, allocator)
            out.append(Case(level="deploy", pass_=f"infer {allocator}",
                            shape=f"SegNeXt-{size.upper()} B1 {side}x{side}",
                            params=dict(model=f"segnext_{size}", batch=1, H=side, W=side,
                                        allocator=allocator, malloc_env=ALLOCATORS[allocator]),
                            dtype="float32", variants=variants, timer="step", measure=measure))
    notes = ["deploy: CPU inference, B1, float32; NMF bases fixed (one seeded (S, D, R) tensor "
             "for every variant, a constant in the exported graph); every output checked "
             "against eager NCHW (err column)",
             "deploy: each case runs in a fresh subprocess per allocator state; variants timed "
             "in interleaved rounds (order rotated), medians; 'faults' = minor page faults per "
             "call",
             f"deploy: {torch.get_num_threads()} threads for each runtime (torch intra-op, ONNX "
             "Runtime intra_op_num_threads, OpenVINO INFERENCE_NUM_THREADS)"]
    if cfg.device.type != "cpu":
        notes.append(f"deploy: runs on the CPU whatever --device says ({cfg.device})")
    if os.environ.get("LD_PRELOAD"):
        notes.append(f"deploy: LD_PRELOAD={os.environ['LD_PRELOAD']} is inherited by the "
                     "workers: the allocator may not be glibc's")
    return out, notes


# --------------------------------------------------------------------------------------------
# Parent side: one worker subprocess per case
# --------------------------------------------------------------------------------------------
def _worker_env(allocator: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARS}
    env.update(ALLOCATORS[allocator])
    return env


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _spawn(cfg: Config, names: List[Tuple[str, str]], size: str, side: int,
           allocator: str) -> Tuple[Optional[dict], str]:
    """Run one worker; (its JSON answer, or None, and why not)."""
    spec = dict(model=size, side=side, variants=names, threads=torch.get_num_threads(),
                size=cfg.size, seed=SEED)
    with tempfile.TemporaryDirectory(prefix="segnext_deploy_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "bench.bench_deploy", "--worker", str(spec_path),
               str(out_path)]
        root = Path(__file__).resolve().parent.parent  # the checkout, for an uninstalled bench
        env = _worker_env(allocator)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        timeout = TIMEOUT_S[cfg.size]
        code, tail = _run_streaming(cmd, env, timeout, f"{size.upper()} {side}² {allocator}")
        if code is None:
            return None, f"worker did not finish within {timeout} s"
        if out_path.exists():
            return json.loads(out_path.read_text()), ""
        why = _last_line(tail) or "no output"
        return None, f"worker exited with status {code}: {why}"


def _run_streaming(cmd: List[str], env: Dict[str, str], timeout: float,
                   label: str) -> Tuple[Optional[int], str]:
    """Run the worker, echoing its progress lines to stderr as they come (builds take minutes);
    (exit status or None on timeout, the tail of its output)."""
    import collections
    import threading

    tail: collections.deque = collections.deque(maxlen=40)
    # its own process group: a timeout also ends the compile workers inductor starts
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, errors="replace", start_new_session=True)

    def pump():
        for line in proc.stderr:
            tail.append(line)
            if line.startswith(PROGRESS_PREFIX):
                sys.stderr.write(f"  [{label}] {line[len(PROGRESS_PREFIX):]}")
                sys.stderr.flush()
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    def stop():
        import signal
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop()
        code = None
    except BaseException:  # Ctrl-C: its own session does not get the terminal's SIGINT
        stop()
        raise
    reader.join(timeout=5)
    return code, "".join(tail)


def run_worker(cfg: Config, variants: List[Variant], size: str, side: int,
               allocator: str) -> List[Measured]:
    """Measure ``variants`` in a worker with the allocator state's environment. A worker that
    times out is run again without the compile variants (reported as timed out)."""
    names = [(v.name, v.layout) for v in variants]
    answer, why = _spawn(cfg, names, size, side, allocator)
    failed: Dict[Tuple[str, str], str] = {}
    if answer is None and "did not finish" in why and any(n in COMPILED for n, _ in names):
        failed = {k: f"{why} (torch.compile too slow here?); the other rows come from a "
                  "second worker without it" for k in names if k[0] in COMPILED}
        rest = [k for k in names if k not in failed]
        answer, why = _spawn(cfg, rest, size, side, allocator) if rest else (None, why)
    rows = {(r["name"], r["layout"]): r for r in (answer or {}).get("variants", [])}
    out = []
    for key in names:
        if key in failed:
            out.append(Measured("failed", failed[key]))
            continue
        r = rows.get(key)
        if r is None:
            out.append(Measured("failed", why or "not reported by the worker"))
            continue
        timing = Timing(**r["timing"]) if r.get("timing") else None
        extra = dict(r.get("extra", {}))
        extra["worker_env"] = answer.get("malloc_env")
        out.append(Measured(r["status"], r.get("reason", ""), timing, r.get("first_call_s"),
                            extra))
    return out


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------
def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@torch.no_grad()
def trained_like(model, seed: int, side: int = 256):
    """A random (seeded) eval state in a trained model's ranges: layer scales and norm affine
    parameters drawn at random, then the batch-norm statistics measured on random images in
    training mode, as training leaves them (random statistics would let the activations grow
    block after block until they overflow, in SegNeXt-B)."""
    import segnext_kernels as sk
    from torch import nn

    gen = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen))

    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm,
                                                          nn.GroupNorm))]
    for m in norms:
        uniform(m.weight, 0.5, 1.5)
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    for name, p in model.named_parameters():
        if "layer_scale" in name:
            uniform(p, 0.05, 0.3)
    bns = [m for m in norms if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the calibration batches
    model.train()
    with sk.use_backend("reference"):
        for _ in range(2):
            model.backbone(torch.randn(2, 3, side, side, generator=gen))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    return model.eval()


class _Worker:
    """Everything the variants of one case share: the model, the fixed bases, the images, the
    reference output, the exported ONNX file."""

    def __init__(self, spec: dict, tmp: Path):
        import segnext
        from segnext.export import fixed_bases

        self.spec, self.tmp = spec, tmp
        self.threads = spec["threads"]
        torch.manual_seed(spec["seed"])
        build = getattr(segnext, f"segnext_{spec['model']}")
        self.model = trained_like(build(num_classes=NUM_CLASSES), spec["seed"],
                                  side=min(spec["side"], 256))
        self.bases_sdr = fixed_bases(self.model, spec["seed"])
        self.bases = self.bases_sdr.repeat(1, 1, 1)  # batch 1
        side = spec["side"]
        gen = torch.Generator().manual_seed(spec["seed"] + 1)
        self.images = [torch.randn(1, 3, side, side, generator=gen) for _ in range(3)]
        self.arrays = [img.numpy() for img in self.images]
        import segnext_kernels as sk
        with torch.no_grad(), sk.use_backend("reference"):
            self.ref = self.model(self.images[0], bases=self.bases)
        self._onnx: Optional[Path] = None

    # the variants: each returns call(i) -> output of image i ------------------------------
    def torch_variant(self, layout: str, backend: str, compiled: bool):
        import segnext_kernels as sk

        model = copy.deepcopy(self.model)
        images = self.images
        if layout == "cl":
            model = model.to(memory_format=torch.channels_last)
            images = [img.contiguous(memory_format=torch.channels_last) for img in images]
        fn = model
        if compiled:
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True  # weights become constants: folded, prepacked
            fn = torch.compile(model)
        bases = self.bases

        def call(i):
            with torch.no_grad(), sk.use_backend(backend):
                return fn(images[i], bases=bases)
        return call

    def onnx_path(self) -> Path:
        if self._onnx is None:
            from segnext.export import export_onnx
            path = self.tmp / "model.onnx"
            export_onnx(self.model, path, self.images[0], bases=self.bases_sdr, dynamic=False)
            self._onnx = path
        return self._onnx

    def onnxruntime_variant(self, extra: dict):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(self.onnx_path()), opts,
                                    providers=["CPUExecutionProvider"])
        extra["version"] = f"onnxruntime {ort.__version__}"
        arrays = self.arrays
        return lambda i: sess.run(None, {"image": arrays[i]})[0]

    def openvino_variant(self, precision: Optional[str], extra: dict):
        from segnext.export import import_openvino
        ov = import_openvino()

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        compiled = core.compile_model(core.read_model(str(self.onnx_path())), "CPU", config)
        chosen = compiled.get_property("INFERENCE_PRECISION_HINT")
        extra["precision"] = getattr(chosen, "get_type_name", lambda: str(chosen))()
        extra["version"] = f"openvino {ov.__version__.split('-')[0]}"
        request = compiled.create_infer_request()
        arrays = self.arrays

        def call(i):
            request.infer({0: arrays[i]}, share_inputs=True)
            return request.get_output_tensor(0).data.copy()
        return call

    def build(self, name: str, layout: str, extra: dict):
        backend = dict(((n, lay), b) for n, lay, b, _ in VARIANTS)[(name, layout)]
        if name in ("eager", "fused:cpu"):
            return self.torch_variant(layout, backend, compiled=False)
        if name in COMPILED:
            return self.torch_variant(layout, backend, compiled=True)
        if name == "onnxruntime":
            return self.onnxruntime_variant(extra)
        if name == "openvino:f32":
            return self.openvino_variant("f32", extra)
        if name == "openvino:default":
            return self.openvino_variant(None, extra)
        raise ValueError(f"unknown deploy variant {name!r}")


def compare_logits(out, ref: torch.Tensor) -> Dict[str, float]:
    """max|out - ref| / max|ref|, the cosine similarity and the share of pixels whose argmax
    class agrees."""
    from segnext.export import relative_error

    got = torch.as_tensor(out).float()
    err = relative_error(got, ref)  # checks the shape
    cos = float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0))
    agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
    return dict(rel_err=err, cosine=cos, labels_agree=agree)


def check_logits(got: Dict[str, float], precision: Optional[str]) -> None:
    """Raise ValueError when ``compare_logits``'s answer fails the row's check."""
    if precision in ("bf16", "f16"):
        if not got["cosine"] >= MIN_COSINE_HALF:
            raise ValueError(f"{precision} output differs from the reference: cosine "
                             f"{got['cosine']:.3f} < {MIN_COSINE_HALF}")
    elif not got["rel_err"] <= MAX_REL_ERR:
        raise ValueError(f"output differs from the reference: max relative error "
                         f"{got['rel_err']:.2e} > {MAX_REL_ERR:g}")


def _counted(call, faults: list, n_images: int):
    """``call`` on the images in turn, recording the minor page faults of each call."""
    images = itertools.cycle(range(n_images))

    def run():
        i = next(images)
        before = _minflt()
        call(i)
        faults.append(_minflt() - before)
    return run


def _progress(text: str) -> None:
    sys.stderr.write(PROGRESS_PREFIX + text + "\n")
    sys.stderr.flush()


def worker_main(spec_path: str, out_path: str) -> int:
    from .runner import short_reason
    from .timing import time_interleaved

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    rows, calls, faults = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="segnext_deploy_w_") as tmp:
        ctx = _Worker(spec, Path(tmp))
        for name, layout in spec["variants"]:
            row = dict(name=name, layout=layout, status="ok", reason="", extra={})
            rows.append(row)
            try:
                t0 = time.perf_counter()
                call = ctx.build(name, layout, row["extra"])
                out = call(0)  # compiles, exports, allocates; the output is checked
                row["first_call_s"] = time.perf_counter() - t0
                row["extra"].update(compare_logits(out, ctx.ref))
                check_logits(row["extra"], row["extra"].get("precision"))
                del out
                _progress(f"{name} {layout}: ready in {row['first_call_s']:.1f} s, max relative "
                          f"error {row['extra']['rel_err']:.1e}")
            except Exception as exc:  # noqa: BLE001 - a row fails, the case goes on
                row["status"], row["reason"] = "failed", short_reason(exc)
                _progress(f"{name} {layout}: failed: {row['reason']}")
                continue
            key = f"{name}/{layout}"
            faults[key] = []

            calls[key] = _counted(call, faults[key], len(ctx.images))
        budget, min_rounds, max_total = ROUNDS[spec["size"]]
        _progress(f"timing {len(calls)} variants in interleaved rounds")
        try:
            timings = time_interleaved(calls, budget, min_rounds=min_rounds,
                                       max_total_s=max_total)
        except Exception as exc:  # noqa: BLE001 - a call that worked once fails later
            timings = {}
            for row in rows:
                if row["status"] == "ok":
                    row["status"], row["reason"] = "failed", f"while timing: {short_reason(exc)}"
    for row in rows:
        key = f"{row['name']}/{row['layout']}"
        if row["status"] == "ok" and key in timings:
            row["timing"] = timings[key].as_dict()
            counts = sorted(faults[key][1:] or faults[key])  # [0] is the warm-up round
            row["extra"]["faults_per_call"] = counts[len(counts) // 2]
    env = {k: os.environ[k] for k in MALLOC_VARS if k in os.environ}
    Path(out_path).write_text(json.dumps(dict(variants=rows, malloc_env=env)))
    return 0


# --------------------------------------------------------------------------------------------
# The table: one block per model and size, the allocator states side by side
# --------------------------------------------------------------------------------------------
def format_table(results, notes=()) -> str:
    states = [s for s in ALLOCATORS if any(r.params.get("allocator") == s for r in results)]
    shapes = list(dict.fromkeys(r.shape for r in results))
    header = ["variant", "layout"]
    for s in states:
        header += [f"{s}: median", "min - max", "faults", "vs fused"]
    header += ["err vs ref", "labels same", "first call"]
    blocks, reasons = [], {}  # a reason that is not ok is shown once, as a footnote

    def mark(r) -> str:
        key = f"{r.status}: {r.reason}"
        reasons.setdefault(key, len(reasons) + 1)
        return f"{r.status} [{reasons[key]}]"

    for shape in shapes:
        by = {(r.variant, r.layout, r.params.get("allocator")): r
              for r in results if r.shape == shape}
        rows = []
        for name, layout, _, title in VARIANTS:
            got = [by.get((name, layout, s)) for s in states]
            if not any(got):
                continue
            prec = next((r.extra.get("precision") for r in got if r and r.extra.get("precision")),
                        None)
            cells = [title + (f" ({prec})" if name == "openvino:default" and prec else ""),
                     layout]
            for s, r in zip(states, got):
                f = by.get(("fused:cpu", "cl", s))
                if r is None:
                    cells += ["", "", "", ""]
                elif r.status != "ok":
                    cells += [mark(r), "", "", ""]
                else:
                    t, faults = r.timing, r.extra.get("faults_per_call")
                    ratio = (f"{t.median_ms / f.timing.median_ms:.2f}x"
                             if f is not None and f.status == "ok" else "-")
                    cells += [format_time(t.median_ms),
                              f"{format_time(t.min_ms)} - {format_time(t.max_ms)}",
                              "-" if faults is None else str(faults), ratio]
            errs = [r.extra["rel_err"] for r in got if r and r.extra.get("rel_err") is not None]
            agree = [r.extra["labels_agree"] for r in got
                     if r and r.extra.get("labels_agree") is not None]
            firsts = [r.first_call_s for r in got if r and r.first_call_s is not None]
            cells += [f"{max(errs):.1e}" if errs else "-",
                      f"{min(agree):.1%}" if agree else "-",
                      f"{max(firsts):.1f} s" if firsts else "-"]
            rows.append(cells)
        blocks.append((shape, rows))
    widths = [len(h) for h in header]
    for _, rows in blocks:
        for cells in rows:
            widths = [max(w, len(c)) for w, c in zip(widths, cells)]

    def fmt(cells):
        return "  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                         for i, c in enumerate(cells)).rstrip()
    lines = ["== deploy: SegNeXt CPU inference against deployment runtimes ==",
             fmt(header), fmt(["-" * w for w in widths])]
    for shape, rows in blocks:
        lines += [shape] + [fmt(cells) for cells in rows] + [""]
    for text, n in reasons.items():
        lines.append(f"[{n}] {text}")
    lines.append("vs fused = this median / the fused median in the same allocator state "
                 "(>1: ours is faster); err vs ref = max|out - ref| / max|ref| against eager "
                 f"NCHW (worst of the states; float32 rows must stay below {MAX_REL_ERR:g}, "
                 f"bf16 rows are held to a cosine similarity >= {MIN_COSINE_HALF}); labels same "
                 "= pixels whose argmax class agrees; allocator states: "
                 + "; ".join(f"{s} = {ALLOCATOR_TITLES[s]}" for s in states))
    for n in notes:
        lines.append(f"note: {n}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3]))
    print("usage: python -m bench --levels deploy  (this module's --worker is internal)",
          file=sys.stderr)
    sys.exit(2)

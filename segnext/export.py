"""``python -m segnext.export``: a SegNeXt to ONNX (and OpenVINO IR), checked against PyTorch.

    python -m segnext.export --model t --out segnext_t.onnx
    python -m segnext.export --checkpoint segnext_mscan-t_ade20k.pth --out t.onnx --ir yes
    python -m segnext.export --model b --bases fixed --static --size 1024 1024 --out b.onnx

What is exported is the reference path of the model (``segnext_kernels`` backend
``reference``, eval mode): plain convolutions, GELU, batch/group norms and matrix products,
all standard ONNX operators. The fused kernels are custom ops that ONNX Runtime and OpenVINO do
not know, and the fused path's eval-mode folding of the norms into the convolutions is left to
the runtime's own graph optimiser, which does the same folding.

The NMF bases of the decoder (see docs/deploy.md):
- ``--bases random`` (default, as the official model): drawn in the graph on every run, a
  ``RandomUniformLike`` node followed by the L2 normalisation; outputs vary slightly per run.
- ``--bases fixed``: one (S, D, R) bases tensor drawn with ``--seed``, stored in the graph as a
  constant and shared by every sample of a batch: reproducible outputs.

The export is verified with ONNX Runtime on a sample input with the same bases on both sides:
a fixed-bases graph as written; a random-bases graph with its random node replaced by an input
that is fed the uniform draw PyTorch also uses. The IR is verified with OpenVINO the same way
(at f32 inference precision). A relative error (max |onnx - torch| / max |torch|) above
``--tolerance`` fails the export (exit 1) and leaves the written files in place for inspection.
Problems with the options, the checkpoint or the environment are reported in one line, exit 2;
a failure of the exporter or of a runtime in one line, exit 1.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import segnext_kernels

from .checkpoint_model import CheckpointFileError, infer_model_size, load_model
from .model import SegNeXt, build

OPSET_RANGE = (13, 20)     # 13: Resize/Split as used; 20: the legacy exporter's newest opset
DEFAULT_OPSET = 17
BASES_MODES = ("random", "fixed")
RANDOM_OP = "RandomUniformLike"
UNIFORM_INPUT = "nmf_uniform"  # the input that replaces RANDOM_OP in verification
DEPLOY_EXTRA = "pip install -e .[deploy]"


class ExportError(Exception):
    """A user-facing problem (options, checkpoint, missing package), reported in one line."""


# ---------------------------------------------------------------------------------------------
# The exported module

def nmf_shape(model: SegNeXt) -> Tuple[int, int, int]:
    """(S, D, R) of the model's NMF: groups, rows per group, rank."""
    ham = model.decode_head.hamburger.ham
    channels = model.decode_head.hamburger.ham_in.conv.out_channels
    return ham.S, channels // ham.S, ham.R


def fixed_bases(model: SegNeXt, seed: int) -> torch.Tensor:
    """(S, D, R) bases drawn as the NMF draws them (uniform, L2-normalised over D), seeded."""
    S, D, R = nmf_shape(model)
    gen = torch.Generator().manual_seed(seed)
    return segnext_kernels.draw_bases(S, D, R, device="cpu", generator=gen)


class ExportedSegNeXt(nn.Module):
    """``model(img)`` with the bases either drawn inside (``bases=None``) or the given (S, D, R)
    tensor repeated for every sample of the batch (so that a sample's output does not depend
    on the batch it is in)."""

    def __init__(self, model: SegNeXt, bases: Optional[torch.Tensor] = None):
        super().__init__()
        self.model = model
        if bases is not None:
            self.register_buffer("bases", bases.detach().clone(), persistent=False)
        else:
            self.bases = None

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.bases is None:
            return self.model(img)
        return self.model(img, bases=self.bases.repeat(img.shape[0], 1, 1))


# ---------------------------------------------------------------------------------------------
# Export

@dataclass
class ExportReport:
    onnx_path: Path
    ir_path: Optional[Path] = None
    onnx_error: Optional[float] = None      # relative error vs PyTorch (ONNX Runtime)
    ir_error: Optional[float] = None        # relative error vs PyTorch (OpenVINO, f32)
    seconds: float = 0.0


def _require(module: str, what: str):
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"{what} needs the '{module}' package, which is not installed; "
                          f"{DEPLOY_EXTRA}") from None


def export_onnx(model: SegNeXt, path: Path, sample: torch.Tensor, *,
                bases: Optional[torch.Tensor] = None, opset: int = DEFAULT_OPSET,
                dynamic: bool = True) -> None:
    """Write ``model`` (reference backend, eval mode) to ``path`` with the legacy (TorchScript)
    exporter. ``bases``: (S, D, R) fixed bases, or None to draw them in the graph.
    ``dynamic``: batch, height and width are free dimensions of the graph."""
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise ExportError(f"opset {opset} is not supported; expected {OPSET_RANGE[0]}.."
                          f"{OPSET_RANGE[1]}")
    wrapper = ExportedSegNeXt(model.eval(), bases).eval()
    axes = None
    if dynamic:
        axes = {"image": {0: "batch", 2: "height", 3: "width"},
                "logits": {0: "batch", 2: "height_8", 3: "width_8"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), segnext_kernels.use_backend("reference"), torch.no_grad():
        # The tracer warns about every shape check of the model's input validation: they hold
        # for any input the exported graph accepts, and cost nothing in the graph.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(wrapper, (sample,), str(path), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=["logits"], dynamic_axes=axes,
                          do_constant_folding=True)


def with_uniform_input(onnx_model):
    """A copy of an ONNX model whose ``RandomUniformLike`` node is replaced by a float input
    named ``nmf_uniform`` of the same shape, so that a run can be fed a known draw."""
    import onnx
    from onnx import TensorProto, helper

    out = onnx.ModelProto()
    out.CopyFrom(onnx_model)
    nodes = [n for n in out.graph.node if n.op_type == RANDOM_OP]
    if len(nodes) != 1:
        raise ValueError(f"expected one {RANDOM_OP} node in the graph, found {len(nodes)}")
    node = nodes[0]
    produced = node.output[0]
    out.graph.node.remove(node)
    for n in out.graph.node:  # consumers read the new input instead
        for i, name in enumerate(n.input):
            if name == produced:
                n.input[i] = UNIFORM_INPUT
    out.graph.input.append(helper.make_tensor_value_info(UNIFORM_INPUT, TensorProto.FLOAT,
                                                         ["bases_batch", "D", "R"]))
    return out


def reference_logits(model: SegNeXt, sample: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """PyTorch logits with the reference backend and the given (B*S, D, R) bases."""
    with segnext_kernels.use_backend("reference"), torch.no_grad():
        return model.eval()(sample, bases=bases)


def relative_error(got, ref: torch.Tensor) -> float:
    got = torch.as_tensor(got).to(ref.dtype)
    if got.shape != ref.shape:
        raise ValueError(f"output shape {tuple(got.shape)} differs from PyTorch's "
                         f"{tuple(ref.shape)}")
    scale = ref.abs().max().clamp_min(1e-30)
    return float((got - ref).abs().max() / scale)


def verification_inputs(model: SegNeXt, sample: torch.Tensor, bases: Optional[torch.Tensor],
                        seed: int):
    """(feeds for the exported graph, PyTorch reference logits): fixed bases repeated over the
    batch, or a seeded uniform draw fed in place of the random node (normalised by the graph
    as by PyTorch)."""
    S, D, R = nmf_shape(model)
    B = sample.shape[0]
    feeds = {"image": sample.numpy()}
    if bases is not None:
        ref = reference_logits(model, sample, bases.repeat(B, 1, 1))
    else:
        uniform = torch.rand((B * S, D, R), generator=torch.Generator().manual_seed(seed))
        feeds[UNIFORM_INPUT] = uniform.numpy()
        ref = reference_logits(model, sample, F.normalize(uniform, dim=1))
    return feeds, ref


def verify_onnx(path: Path, feeds: dict, ref: torch.Tensor, random_bases: bool) -> float:
    """Relative error of ONNX Runtime (all graph optimisations) against ``ref``."""
    onnx = _require("onnx", "verifying the export")
    ort = _require("onnxruntime", "verifying the export")
    model = onnx.load(str(path))
    if random_bases:
        model = with_uniform_input(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    (out,) = sess.run(["logits"], feeds)
    return relative_error(out, ref)


def openvino_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("openvino") is not None


def import_openvino():
    """``import openvino`` without its usage telemetry: the package's converter sends an
    "import" event to an outside server on import unless ``openvino_telemetry`` is missing,
    and then uses its built-in no-op stub. Blocking that one module (in this process only)
    selects the stub; the runtime does not need it."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None: its import raises ImportError
    return _require("openvino", "the OpenVINO IR")


def export_ir(onnx_path: Path) -> Path:
    """Convert the ONNX file to OpenVINO IR (``.xml`` + ``.bin`` beside it, f32 weights).
    Read with the runtime's ONNX reader (``openvino.convert_model`` sends usage telemetry)."""
    ov = import_openvino()
    xml = onnx_path.with_suffix(".xml")
    ov_model = ov.Core().read_model(str(onnx_path))
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)
    return xml


def verify_ir(xml: Path, onnx_path: Path, feeds: dict, ref: torch.Tensor,
              random_bases: bool) -> float:
    """Relative error of OpenVINO (CPU, f32 inference precision) against ``ref``. A random-bases
    IR is checked through the same conversion of the graph with its random node made an input;
    the written IR is then also run once to check it loads and gives finite logits."""
    ov = import_openvino()
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if random_bases:
        onnx = _require("onnx", "verifying the export")
        graph = with_uniform_input(onnx.load(str(onnx_path)))
        checked = core.read_model(graph.SerializeToString())
    else:
        checked = core.read_model(str(xml))
    compiled = core.compile_model(checked, "CPU", config)
    out = compiled(feeds)[compiled.output(0)]
    err = relative_error(out, ref)
    if random_bases:
        written = core.compile_model(core.read_model(str(xml)), "CPU", config)
        logits = written({"image": feeds["image"]})[written.output(0)]
        if tuple(logits.shape) != tuple(ref.shape) or not torch.isfinite(
                torch.as_tensor(logits)).all():
            raise ExportError(f"the OpenVINO IR {xml} gives logits of shape "
                              f"{tuple(logits.shape)} (expected {tuple(ref.shape)}) or "
                              "non-finite values")
    return err


# ---------------------------------------------------------------------------------------------
# Command line

class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = _Parser(prog="python -m segnext.export",
                description="Export a SegNeXt (a checkpoint, or a fresh model of a named size) "
                            "to ONNX and, when openvino is installed, OpenVINO IR; verify both "
                            "against PyTorch on a sample input.")
    p.add_argument("--checkpoint", type=Path,
                   help="official, state_dict or segnext.train checkpoint (default: a fresh "
                        "model of --model, seeded with --seed)")
    p.add_argument("--model", choices=("t", "s", "b", "l"),
                   help="model size (required without --checkpoint; default: read from it)")
    p.add_argument("--num-classes", type=int,
                   help="class count (default: read from the checkpoint, or 150)")
    p.add_argument("--out", type=Path,
                   help="the .onnx file to write (default: segnext_<size>.onnx); the IR goes "
                        "beside it as .xml + .bin")
    p.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"),
                   help="sample input size used to trace and verify (default 512 512)")
    p.add_argument("--batch", type=int, default=1, help="sample batch size (default 1)")
    p.add_argument("--static", action="store_true",
                   help="fix the graph's input shape to the sample's (default: batch, height "
                        "and width are dynamic)")
    p.add_argument("--bases", choices=BASES_MODES, default="random",
                   help="NMF bases: drawn in the graph on every run as the official model "
                        "(random, default) or one seeded constant (fixed, reproducible)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of a fresh model's weights, the fixed bases and the sample")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset ({OPSET_RANGE[0]}..{OPSET_RANGE[1]}, default "
                        f"{DEFAULT_OPSET})")
    p.add_argument("--ir", choices=("auto", "yes", "no"), default="auto",
                   help="also write OpenVINO IR (auto: when openvino is installed)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the comparison with PyTorch (needs no onnxruntime)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest accepted max|exported - torch| / max|torch| (default 1e-3)")
    args = p.parse_args(argv)
    if args.checkpoint is None and args.model is None:
        p.error("give --checkpoint or --model t|s|b|l")
    if args.num_classes is not None and args.num_classes < 1:
        p.error(f"--num-classes must be >= 1, got {args.num_classes}")
    if min(args.size) < 32:
        p.error(f"--size must be at least 32 32 (the backbone's stride), got "
                f"{args.size[0]} {args.size[1]}")
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if not OPSET_RANGE[0] <= args.opset <= OPSET_RANGE[1]:
        p.error(f"--opset {args.opset} is not supported; expected {OPSET_RANGE[0]}.."
                f"{OPSET_RANGE[1]} (the legacy exporter's opsets that carry this model)")
    if not (args.tolerance > 0 and args.tolerance < 1):
        p.error(f"--tolerance must be in (0, 1), got {args.tolerance}")
    if args.out is not None and args.out.suffix != ".onnx":
        p.error(f"--out must name a .onnx file, got {args.out}")
    return args


def load(args: argparse.Namespace) -> Tuple[SegNeXt, str]:
    """The model to export (eval mode) and a description of it."""
    if args.checkpoint is not None:
        try:
            return load_model(args.checkpoint, args.model, args.num_classes)
        except CheckpointFileError as exc:
            raise ExportError(str(exc)) from None
    num_classes = 150 if args.num_classes is None else args.num_classes
    torch.manual_seed(args.seed)
    model = build(args.model, num_classes).eval()
    return model, (f"SegNeXt-{args.model.upper()} with {num_classes} classes "
                   f"(fresh weights, seed {args.seed})")


def run(args: argparse.Namespace) -> ExportReport:
    started = time.perf_counter()
    _require("onnx", "the ONNX export")
    want_ir = args.ir == "yes" or (args.ir == "auto" and openvino_available())
    if args.ir == "yes" and not openvino_available():
        raise ExportError(f"--ir yes needs the 'openvino' package, which is not installed; "
                          f"{DEPLOY_EXTRA}")
    if not args.no_verify:
        _require("onnxruntime", "verifying the export (or pass --no-verify)")
    model, description = load(args)
    out = args.out or Path(f"segnext_{_size_of(model)}.onnx")
    gen = torch.Generator().manual_seed(args.seed)
    sample = torch.randn(args.batch, 3, *args.size, generator=gen)
    bases = fixed_bases(model, args.seed) if args.bases == "fixed" else None
    report = ExportReport(onnx_path=out)

    export_onnx(model, out, sample, bases=bases, opset=args.opset, dynamic=not args.static)
    shape = "static input shape" if args.static else "dynamic batch, height and width"
    how = ("NMF bases drawn in the graph (RandomUniformLike)" if bases is None else
           f"fixed NMF bases (seed {args.seed})")
    print(f"{description} -> {out} (opset {args.opset}, {shape}, {how}), "
          f"{out.stat().st_size / 2**20:.1f} MiB")
    if want_ir:
        report.ir_path = export_ir(out)
        print(f"OpenVINO IR -> {report.ir_path} (+ .bin, f32 weights)")

    if not args.no_verify:
        feeds, ref = verification_inputs(model, sample, bases, args.seed)
        sample_desc = "x".join(str(s) for s in sample.shape)
        report.onnx_error = verify_onnx(out, feeds, ref, bases is None)
        import onnxruntime
        print(f"verified with ONNX Runtime {onnxruntime.__version__} on a {sample_desc} sample, "
              f"same NMF bases as PyTorch: max relative error {report.onnx_error:.2e} "
              f"(tolerance {args.tolerance:g})")
        if report.ir_path is not None:
            report.ir_error = verify_ir(report.ir_path, out, feeds, ref, bases is None)
            openvino = import_openvino()
            print(f"verified with OpenVINO {openvino.__version__.split('-')[0]} (f32 inference "
                  f"precision): max relative error {report.ir_error:.2e}")
    report.seconds = time.perf_counter() - started
    print(f"done in {report.seconds:.1f} s")
    return report


def _size_of(model: SegNeXt) -> str:
    return infer_model_size(model.state_dict()) or "model"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except ExportError as exc:
        print(f"segnext.export: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable --out, a full disk
        print(f"segnext.export: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the exporter or a runtime failed: one line
        lines = str(exc).strip().splitlines()
        print(f"segnext.export: error: export or verification failed: {type(exc).__name__}: "
              f"{lines[0] if lines else ''}", file=sys.stderr)
        return 1
    errors = [e for e in (report.onnx_error, report.ir_error) if e is not None]
    if any(not (e <= args.tolerance) for e in errors):
        print(f"segnext.export: error: the exported model differs from PyTorch by more than "
              f"--tolerance {args.tolerance:g} (files kept for inspection)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

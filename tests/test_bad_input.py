"""Bad input across the public surface: every case gets a clear error naming the argument and
what was expected (command lines: one line, exit status 2, no traceback), loses nothing (a model
is untouched by a refused checkpoint, a training never saves broken weights), and never hangs,
crashes or answers wrongly in silence.

Sections: checkpoints, mixed devices in the ops, training, images of any bit depth, NMF
arguments, and the rest of the public functions and command lines.
Everything here is small: SegNeXt-T is built a few times and trained once for two iterations.
"""
import contextlib
import io
import math
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import segnext
import segnext_kernels as sk
from segnext import predict as predict_cli
from segnext import train as train_cli
from segnext.data import ADE20K, DataError, SyntheticShapes
from segnext.images import read_image
from segnext.inference import predict_labels
from segnext.metrics import ConfusionMatrix
from segnext_kernels import _extension, _strip_conv
from segnext_kernels._validate import check_one_device
from segnext_kernels.nmf2d.functional import EPS_MIN, INV_T_MAX
from utils import one_line_error

Image = pytest.importorskip("PIL.Image", reason="image files are read with Pillow")


@contextlib.contextmanager
def deadline(seconds: float):
    """Turn a hang into a test failure (SIGALRM: Linux/macOS, main thread)."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def tiny_segnext():
    return segnext.segnext_t(num_classes=3).eval()


def small_mscan() -> segnext.MSCAN:
    return segnext.MSCAN(embed_dims=(8, 8, 8, 8), depths=(1, 1, 1, 1))


def snapshot(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"the refused load changed {len(changed)} entries, e.g. {changed[:3]}"


# ---------------------------------------------------------------------------------------------
# Checkpoints: unreadable files, self-references, entries that cannot be right

def test_self_referencing_checkpoint_is_refused_instead_of_looping(tmp_path):
    container = {}
    container["state_dict"] = container
    path = tmp_path / "loop.pth"
    torch.save(container, path)
    looped = {"model": {}}
    looped["model"]["state_dict"] = looped  # a cycle through two wrappers
    for checkpoint in (path, container, looped):
        with deadline(30), pytest.raises(ValueError, match="refers to itself"):
            segnext.load_checkpoint(small_mscan(), checkpoint)


def test_self_referencing_checkpoint_in_the_command_lines(tmp_path, capsys):
    container = {}
    container["state_dict"] = container
    path = tmp_path / "loop.pth"
    torch.save(container, path)
    image = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(image)
    with deadline(60):
        assert predict_cli.main(["--checkpoint", str(path), str(image)]) == 2
    one_line_error(capsys, "segnext.predict", "refers to itself")
    with deadline(120), pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--iters", "1", "--crop", "32", "--workers", "0", "--out",
                        str(tmp_path / "run"), "--pretrained", str(path)])
    assert exit_info.value.code == 2
    one_line_error(capsys, "segnext.train", "--pretrained", "refers to itself")


def test_wrappers_nested_too_deep_are_refused():
    nested = small_mscan().state_dict()
    for _ in range(segnext.checkpoint.MAX_NESTING + 1):
        nested = {"state_dict": nested}
    with pytest.raises(ValueError, match="levels deep"):
        segnext.load_checkpoint(small_mscan(), nested)


def _truncated_checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(64)}, buffer)
    return buffer.getvalue()[:200]


@pytest.mark.parametrize("content,what", [
    (b"", "empty"),
    (b"name,value\nlr,0.01\n", "not a PyTorch checkpoint"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
     "not a PyTorch checkpoint"),
    (_truncated_checkpoint(), "not a PyTorch checkpoint"),
], ids=["empty", "text", "random-bytes", "truncated"])
def test_unreadable_checkpoint_files(tmp_path, content, what):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot read checkpoint") as info:
        segnext.load_checkpoint(small_mscan(), path)
    assert what in str(info.value) and str(path) in str(info.value)
    assert "objects other than tensors" not in str(info.value)  # not the weights_only advice


def test_missing_file_folder_and_wrong_argument_types(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        segnext.load_checkpoint(small_mscan(), tmp_path / "nothing.pth")
    with pytest.raises(IsADirectoryError):
        segnext.load_checkpoint(small_mscan(), tmp_path)
    with pytest.raises(TypeError, match="checkpoint must be a path, a file object or a mapping"):
        segnext.load_checkpoint(small_mscan(), 123)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        segnext.load_checkpoint("model", {})
    with pytest.raises(TypeError, match="strict must be True or False"):
        segnext.load_checkpoint(small_mscan(), {}, strict="yes")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(TypeError, match="holds a list, expected a state_dict"):
        segnext.load_checkpoint(small_mscan(), tmp_path / "list.pth")


def _spoil(name: str, t: torch.Tensor) -> torch.Tensor:
    return {"meta": lambda: t.to("meta"),
            "complex": lambda: t.to(torch.complex64) + 1j,
            "bool": lambda: t > 0,
            "int": lambda: t.to(torch.int32),
            "sparse": lambda: t.to_sparse(),
            "nan": lambda: t.flatten().index_fill(0, torch.tensor([0]), math.nan).view_as(t),
            "inf": lambda: t.flatten().index_fill(0, torch.tensor([0]), math.inf).view_as(t),
            }[name]()


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("kind,error,message", [
    ("meta", ValueError, "meta device"),
    ("complex", TypeError, "complex"),
    ("bool", TypeError, "expected a floating-point tensor"),
    ("int", TypeError, "expected a floating-point tensor"),
    ("sparse", ValueError, "sparse"),
    ("nan", ValueError, "NaN or infinity"),
    ("inf", ValueError, "NaN or infinity"),
])
def test_bad_entry_is_refused_before_anything_is_copied(kind, error, message, strict):
    model = small_mscan()
    before = snapshot(model)
    torch.manual_seed(1)
    checkpoint = {k: torch.randn_like(v) if v.is_floating_point() else v + 3
                  for k, v in before.items()}  # every entry differs from the model's
    spoiled = [k for k, v in checkpoint.items() if v.is_floating_point()][-1]  # the last one
    checkpoint[spoiled] = _spoil(kind, checkpoint[spoiled])
    with pytest.raises(error, match=message) as info:
        segnext.load_checkpoint(model, checkpoint, strict=strict)
    assert spoiled in str(info.value)
    assert_untouched(model, before)


def test_float_counter_and_duplicate_names_are_refused():
    model = small_mscan()
    before = snapshot(model)
    counter = next(k for k in before if k.endswith("num_batches_tracked"))
    checkpoint = dict(before, **{counter: torch.tensor(2.5)})
    with pytest.raises(TypeError, match="expected an integer tensor"):
        segnext.load_checkpoint(model, checkpoint)
    first = next(iter(before))
    with pytest.raises(ValueError, match="name the same weight"):
        segnext.load_checkpoint(model, dict(before, **{"module." + first: before[first]}))
    dw = next(k for k in before if k.endswith("mlp.dwconv.dwconv.weight"))
    mixed = dict(before, **{dw.replace("dwconv.dwconv", "dwconv"): before[dw]})
    with pytest.raises(ValueError, match="key families mixed"):
        segnext.load_checkpoint(model, mixed, strict=False)
    assert_untouched(model, before)


# ---------------------------------------------------------------------------------------------
# Mixed devices (meta included) in the ops

def _msca_args(C=4):
    u = torch.rand(1, C, 6, 6)
    return u, [p.detach() for p in sk.MSCA(C).parameters()]


def _mlp_args(C=4, hidden=8):
    return torch.rand(1, C, 6, 6), [torch.rand(hidden, C, 1, 1), torch.rand(hidden),
                                    torch.rand(hidden, 1, 3, 3), torch.rand(hidden),
                                    torch.rand(C, hidden, 1, 1), torch.rand(C)]


def _on_meta(tensors, index):
    return [t.to("meta") if i == index else t for i, t in enumerate(tensors)]


def _packed(args, lead):
    """The ops that take their weights as one list (Tensor[]): after the first ``lead`` tensors."""
    return args if lead is None else [*args[:lead], list(args[lead:])]


def _cxx_cases():
    u, w = _msca_args()
    x, mw = _mlp_args()
    dw, db = torch.rand(4, 1, 3, 3), torch.rand(4)
    strip = torch.rand(4, 1, 1, 7)
    return {
        "msca_forward": ("msca_forward", [u, *w], 4, "b0_1", 1),
        "msca_backward": ("msca_backward", [u, u, *w], 0, "grad", 2),
        "strip_conv-weight": ("strip_conv_forward", [u, strip, db], 1, "weight", None),
        "strip_conv-bias": ("strip_conv_forward", [u, strip, db], 2, "bias", None),
        "dwconv_gelu_forward": ("dwconv_gelu_forward", [u, dw, db], 1, "weight", None),
        "dwconv_gelu_backward": ("dwconv_gelu_backward", [u, u, dw, db], 3, "bias", None),
        "mlp_forward": ("mlp_forward", [x, *mw], 5, "w2", 1),
    }


CXX_CASES = _cxx_cases()


@pytest.mark.skipif(not _extension.available(), reason="segnext_kernels._C is not built")
@pytest.mark.parametrize("case", list(CXX_CASES))
def test_cxx_cpu_kernels_refuse_a_tensor_on_another_device(case):
    op, args, index, name, lead = CXX_CASES[case]
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"segnext_C::{op}", "CPU"):
        pytest.skip(f"this _C has no CPU kernel for {op}")
    # Straight to the CPU kernel: with a meta argument the dispatcher would pick the Meta key.
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=f"{op}: {name} (is on meta|must be a CPU tensor)"):
        getattr(torch.ops.segnext_C, op).default.redispatch(cpu, *_packed(_on_meta(args, index),
                                                                          lead))


@pytest.mark.skipif(not _extension.available(), reason="segnext_kernels._C is not built")
@pytest.mark.parametrize("case", ["msca_forward", "strip_conv-weight", "dwconv_gelu_forward",
                                  "mlp_forward", "custom:msca", "custom:dwconv_gelu", "custom:mlp"])
def test_registered_ops_refuse_one_argument_on_meta(case):
    if case.startswith("custom:"):
        u, w = _msca_args()
        x, mw = _mlp_args()
        op, args, index, lead = {"msca": ("msca", [u, *w], 4, 1),
                                 "dwconv_gelu": ("dwconv_gelu", [u, torch.rand(4, 1, 3, 3),
                                                                 torch.rand(4)], 1, None),
                                 "mlp": ("mlp", [x, *mw], 5, 1)}[case.split(":")[1]]
        args = [*_packed(_on_meta(args, index), lead), "cpu"]
        ops = torch.ops.segnext
    else:
        op, args, index, _, lead = CXX_CASES[case]
        args = _packed(_on_meta(args, index), lead)
        ops = torch.ops.segnext_C
    with pytest.raises((ValueError, RuntimeError), match="meta"):
        getattr(ops, op)(*args)


def test_check_one_device_names_the_tensor_elsewhere():
    a = torch.zeros(2)
    check_one_device("op", [("a", a), ("b", torch.ones(3))])
    with pytest.raises(ValueError, match="op: b is on meta but a is on cpu"):
        check_one_device("op", [("a", a), ("b", torch.ones(3, device="meta"))])


@pytest.mark.parametrize("name", ["msca", "msca_ref", "dwconv_gelu", "dwconv_gelu_ref", "mlp",
                                  "mlp_ref", "strip_conv", "strip_conv_ref",
                                  "nmf_decompose_ref"])
def test_functions_and_references_refuse_a_weight_on_meta(name):
    u, w = _msca_args()
    x, mw = _mlp_args()
    args = {"msca": [u, *_on_meta(w, 4)], "msca_ref": [u, *_on_meta(w, 14)],
            "dwconv_gelu": [u, torch.rand(4, 1, 3, 3, device="meta"), torch.rand(4)],
            "dwconv_gelu_ref": [u, torch.rand(4, 1, 3, 3), torch.rand(4, device="meta")],
            "mlp": [x, *_on_meta(mw, 2)], "mlp_ref": [x, *_on_meta(mw, 4)],
            "strip_conv": [u, torch.rand(4, 1, 1, 7, device="meta"), torch.rand(4)],
            "strip_conv_ref": [u, torch.rand(4, 1, 7, 1), torch.rand(4, device="meta")],
            "nmf_decompose_ref": [torch.rand(1, 4, 9), torch.rand(1, 4, 2, device="meta"), 1],
            }[name]
    fn = getattr(_strip_conv, name) if name.startswith("strip_conv") else getattr(sk, name)
    with pytest.raises(ValueError, match="is on meta but"):
        fn(*args)


# ---------------------------------------------------------------------------------------------
# Training: arguments, non-finite weights, damaged checkpoints

TINY_RUN = ["--model", "t", "--num-classes", "3", "--crop", "32", "--batch-size", "2",
            "--synthetic-train-size", "4", "--synthetic-val-size", "2", "--workers", "0",
            "--eval-every", "0"]


@pytest.mark.parametrize("argv,fragments", [
    (["--lr", "inf"], ["--lr must be a finite number > 0", "inf"]),
    (["--lr", "0"], ["--lr must be a finite number > 0"]),
    (["--lr", "1e38"], ["overflows float32"]),
    (["--warmup-ratio", "nan"], ["--warmup-ratio must be in [0, 1]", "nan"]),
    (["--warmup-ratio", "2"], ["--warmup-ratio must be in [0, 1]"]),
    (["--weight-decay", "-1"], ["--weight-decay must be a finite number >= 0"]),
    (["--power", "-1"], ["--power must be a finite number >= 0"]),
    (["--min-lr", "1"], ["--min-lr must be in [0, --lr]"]),
    (["--synthetic-val-size", "0"], ["--synthetic-val-size must be >= 1"]),
    (["--synthetic-train-size", "0"], ["--synthetic-train-size must be >= 1"]),
    (["--num-classes", "256"], ["--num-classes must be <= 255", "ignored pixels"]),
    (["--num-classes", "1"], ["--num-classes must be >= 2 with --data synthetic"]),
    (["--seed", "-1"], ["--seed must be in [0, 2**64 - 1]"]),
    (["--iters", "0"], ["--iters must be >= 1"]),
    (["--workers", "-1"], ["--workers must be >= 0"]),
    (["--iters", "x"], ["--iters: invalid int value"]),
])
def test_train_refuses_bad_arguments_in_one_line(argv, fragments, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main([*TINY_RUN, "--out", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == 2
    one_line_error(capsys, "segnext.train", *fragments)
    assert not (tmp_path / "run").exists()


def test_train_refuses_files_where_folders_are_expected(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for flag in ("--out", "--dump-weights"):
        extra = [] if flag == "--out" else ["--out", str(tmp_path / "run")]
        with pytest.raises(SystemExit) as exit_info:
            train_cli.main([*TINY_RUN, *extra, flag, str(a_file)])
        assert exit_info.value.code == 2
        one_line_error(capsys, "segnext.train", f"{flag} must be a folder")


@pytest.mark.parametrize("device", ["meta", "foo", "cuda:7"])
def test_train_refuses_a_device_it_cannot_run_on(device, tmp_path, capsys):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main([*TINY_RUN, "--out", str(tmp_path / "run"), "--device", device])
    assert exit_info.value.code == 2
    one_line_error(capsys, "segnext.train", "--device")


def _training_meta(**changes):
    meta = dict(format=train_cli.CHECKPOINT_FORMAT, model="t", num_classes=3, step=1, iters=2)
    meta.update(changes)
    return meta


@pytest.mark.parametrize("checkpoint,fragments", [
    ({"meta": _training_meta()}, ["no 'state_dict' entry", "no 'optimizer' entry"]),
    ({"meta": _training_meta(), "state_dict": {}, "optimizer": {}, "scheduler": {},
      "grad_scaler": {}, "rng_states": []}, ["not per-process RNG states"]),
    ({"meta": _training_meta(step=-3), "state_dict": {}, "optimizer": {}, "scheduler": {},
      "grad_scaler": {}, "rng_states": [{"torch": torch.get_rng_state()}]},
     ["meta['step'] is -3"]),
    ({"meta": "not a dict"}, ["not a segnext.train checkpoint"]),
    ({"meta": _training_meta(num_classes=9)}, ["no 'optimizer' entry"]),
], ids=["missing-entries", "no-rng", "negative-step", "bad-meta", "missing-and-other-classes"])
def test_resume_of_an_incomplete_checkpoint(checkpoint, fragments, tmp_path, capsys):
    path = tmp_path / "resume.pth"
    torch.save(checkpoint, path)
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main([*TINY_RUN, "--out", str(tmp_path / "run"), "--resume", str(path)])
    assert exit_info.value.code == 2
    one_line_error(capsys, "segnext.train", "--resume", *fragments)


@pytest.mark.parametrize("target,fragments", [
    ("folder", ["checkpoint is not a file"]), ("random", ["cannot read", "not a PyTorch"]),
    ("missing", ["checkpoint not found"])])
def test_resume_of_something_that_is_no_checkpoint(target, fragments, tmp_path, capsys):
    path = {"folder": tmp_path, "random": tmp_path / "random.pth",
            "missing": tmp_path / "missing.pth"}[target]
    if target == "random":
        path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main([*TINY_RUN, "--out", str(tmp_path / "run"), "--resume", str(path)])
    assert exit_info.value.code == 2
    one_line_error(capsys, "segnext.train", "--resume", *fragments)


@pytest.fixture(scope="module")
def broken_at_the_last_step(tmp_path_factory):
    """Two iterations whose second optimizer step leaves a NaN in one weight (as an overflowing
    update would) after the loss of that step was computed: only a check of the weights sees
    it. Returns (exit status, stderr, the run folder)."""
    out = tmp_path_factory.mktemp("train") / "run"
    original_step = torch.optim.AdamW.step
    calls = []

    def step_then_break(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    torch.optim.AdamW.step = step_then_break
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
            train_cli.main([*TINY_RUN, "--iters", "2", "--log-every", "2",
                            "--checkpoint-every", "1", "--out", str(out)])
    finally:
        torch.optim.AdamW.step = original_step
    return exit_info.value.code, stderr.getvalue(), out


def test_non_finite_weights_stop_training_and_keep_the_last_good_checkpoint(
        broken_at_the_last_step):
    code, stderr, out = broken_at_the_last_step
    assert code == 2
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("segnext.train: error: the weights hold NaN or "
                                          "infinity after iteration 2"), stderr
    assert "iter_1.pth, is intact" in lines[-1]
    assert not (out / "iter_2.pth").exists()
    latest = torch.load(out / train_cli.LATEST, map_location="cpu", weights_only=True)
    assert latest["meta"]["step"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in latest["state_dict"].values()
               if v.is_floating_point())
    assert "done at iteration" not in (out / "train.log").read_text()


@pytest.mark.parametrize("spoil,fragments", [
    ("fp16", ["grad_scaler state", "does not fit"]),
    ("scheduler", ["scheduler state at 5"]),
    ("weights", ["weights in", "NaN or infinity"]),
    ("rng", ["RNG state", "damaged"]),
])
def test_resume_of_a_damaged_training_checkpoint(broken_at_the_last_step, spoil, fragments,
                                                 tmp_path, capsys):
    _, _, out = broken_at_the_last_step
    checkpoint = torch.load(out / "iter_1.pth", map_location="cpu", weights_only=True)
    extra = []
    if spoil == "fp16":
        extra = ["--amp", "fp16"]  # the run had no GradScaler: its state is empty
    elif spoil == "scheduler":
        checkpoint["scheduler"]["last_epoch"] = 5
    elif spoil == "weights":
        first = next(iter(checkpoint["state_dict"]))
        checkpoint["state_dict"][first] = torch.full_like(checkpoint["state_dict"][first], math.nan)
    else:
        checkpoint["rng_states"][0]["torch"] = torch.zeros(3, dtype=torch.uint8)
    path = tmp_path / "spoiled.pth"
    torch.save(checkpoint, path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main([*TINY_RUN, "--iters", "2", "--out", str(tmp_path / "run"), *extra,
                        "--resume", str(path)])
    assert exit_info.value.code == 2
    one_line_error(capsys, "segnext.train", "--resume", *fragments)


def test_a_checkpoint_that_cannot_be_written_is_one_error(tmp_path):
    with pytest.raises(train_cli.TrainError, match="cannot write the checkpoint"):
        train_cli.save_checkpoint(tmp_path / "removed" / "iter_3.pth", {"w": torch.ones(1)})
    assert not list(tmp_path.rglob("*.tmp"))


def test_optimizer_schedule_helpers_refuse_bad_values():
    model = small_mscan()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        segnext.param_groups("model")
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        segnext.param_groups(model, lr=math.nan)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        segnext.param_groups(model, weight_decay=-0.1)
    with pytest.raises(ValueError, match="custom_keys must map"):
        segnext.param_groups(model, custom_keys={"head": 10})
    params = [p for p in small_mscan().parameters()][:2]
    params[0].data.view(-1)[0] = math.nan
    assert train_cli.non_finite_state(torch.nn.ParameterList(params)) == ["0"]


# ---------------------------------------------------------------------------------------------
# Images of any bit depth: scaled to 0-255 or refused

def _write_png(path: Path, pixels: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB)."""
    height, width = pixels.shape[:2]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
                     chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


SIXTEEN_BIT = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 64000]], dtype=np.uint16)


def _expected_8bit(values: np.ndarray, full_scale: float) -> torch.Tensor:
    return torch.from_numpy(np.round(values.astype(np.float64) * 255 / full_scale)).to(torch.uint8)


@pytest.mark.parametrize("kind", ["grey16-png", "grey16-tiff", "rgb16-png", "float-tiff",
                                  "pgm-12bit"])
def test_high_bit_depth_images_are_scaled_to_8_bits(kind, tmp_path):
    path = tmp_path / {"grey16-png": "a.png", "grey16-tiff": "a.tif", "rgb16-png": "a.png",
                       "float-tiff": "a.tif", "pgm-12bit": "a.pgm"}[kind]
    if kind in ("grey16-png", "grey16-tiff"):
        Image.fromarray(SIXTEEN_BIT).save(path)
        expected = _expected_8bit(SIXTEEN_BIT, 65535).expand(3, -1, -1)
    elif kind == "rgb16-png":
        rgb = np.stack([SIXTEEN_BIT, 65535 - SIXTEEN_BIT, SIXTEEN_BIT // 3], axis=-1)
        _write_png(path, rgb, colour_type=2)
        expected = _expected_8bit(rgb, 65535).permute(2, 0, 1)
    elif kind == "float-tiff":
        values = (SIXTEEN_BIT / 65535).astype(np.float32)
        Image.fromarray(values).save(path)
        expected = _expected_8bit(values, 1.0).expand(3, -1, -1)
    else:
        twelve = (SIXTEEN_BIT >> 4).astype(">u2")
        path.write_bytes(b"P5\n4 2\n4095\n" + twelve.tobytes())
        expected = _expected_8bit(twelve, 4095).expand(3, -1, -1)
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 2, 4)
    # Within one level: Pillow's own 16 -> 8 bit reduction of RGB keeps the high byte.
    assert (image.int() - expected.int()).abs().max() <= 1, (image, expected)
    assert int(image.max()) == 255 and int(image.min()) == 0  # not saturated, not collapsed


@pytest.mark.parametrize("values,message", [
    (np.array([[0.0, 0.5], [1.5, 0.2]], dtype=np.float32), r"\[0, 1\], got \[0, 1.5\]"),
    (np.array([[0.0, np.nan], [0.5, 0.2]], dtype=np.float32), "NaN or infinity"),
    (np.array([[0, 1000], [70000, 5]], dtype=np.int32), "32-bit integer image"),
], ids=["float-above-1", "float-nan", "int32"])
def test_images_without_a_known_scale_are_refused(values, message, tmp_path):
    path = tmp_path / "odd.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(ValueError, match=message) as info:
        read_image(path)
    assert "odd.tif" in str(info.value)


# ---------------------------------------------------------------------------------------------
# segnext.predict

@pytest.fixture(scope="module")
def predict_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_bad")
    torch.manual_seed(0)
    paths = dict(checkpoint=root / "model.pth", image=root / "image.png",
                 int32=root / "int32.tif", float_bad=root / "float.tif",
                 bad_meta=root / "bad_meta.pth", a_file=root / "a_file")
    state = segnext.segnext_t(num_classes=3).state_dict()
    torch.save(state, paths["checkpoint"])
    torch.save({"state_dict": state, "meta": {"num_classes": "three"}}, paths["bad_meta"])
    Image.new("RGB", (24, 16), (10, 200, 30)).save(paths["image"])
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(paths["int32"])
    Image.fromarray(np.array([[0.0, 2.0]], dtype=np.float32)).save(paths["float_bad"])
    paths["a_file"].write_text("x")
    return paths


@pytest.mark.parametrize("options,fragments", [
    (["--device", "meta"], ["--device must be cpu, cuda or cuda:N", "meta"]),
    (["--device", "foo"], ["--device must be cpu, cuda or cuda:N", "foo"]),
    (["--checkpoint-is-folder"], ["checkpoint is not a file"]),
    (["--bad-meta"], ["class count", "'three'"]),
    (["--image", "int32"], ["int32.tif", "32-bit integer image"]),
    (["--image", "float_bad"], ["float.tif", "[0, 1]"]),
], ids=["device-meta", "device-foo", "checkpoint-folder", "meta-classes", "int32-image",
        "float-image"])
def test_predict_refuses_in_one_line(predict_files, options, fragments, tmp_path, capsys):
    checkpoint, image = predict_files["checkpoint"], predict_files["image"]
    if options == ["--checkpoint-is-folder"]:
        checkpoint, options = tmp_path, []
    elif options == ["--bad-meta"]:
        checkpoint, options = predict_files["bad_meta"], []
    elif options[0] == "--image":
        image, options = predict_files[options[1]], []
    code = predict_cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                             "--scale", "64", "32", *options, str(image)])
    assert code == 2
    one_line_error(capsys, "segnext.predict", *fragments)


@pytest.mark.parametrize("options,fragments", [
    (["--out", "A_FILE"], ["--out must be a folder"]),
    (["--scale", "0", "512"], ["--scale sides must be >= 1"]),
    (["--mode", "slide", "--crop", "64", "--stride", "96"], ["--stride must not exceed --crop"]),
    (["--opacity", "nan"], ["--opacity must be in [0, 1]"]),
    (["--num-classes", "0"], ["--num-classes must be >= 1"]),
    (["--seed", str(2**70)], ["--seed must be in [0, 2**64 - 1]"]),
])
def test_predict_refuses_bad_options_before_any_work(predict_files, options, fragments, capsys):
    options = [str(predict_files["a_file"]) if o == "A_FILE" else o for o in options]
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main(["--checkpoint", str(predict_files["checkpoint"]), *options,
                          str(predict_files["image"])])
    assert exit_info.value.code == 2
    one_line_error(capsys, "segnext.predict", *fragments)


def test_inference_functions_refuse_bad_windows_and_images(tiny_segnext):
    model = tiny_segnext
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match="stride .* must not exceed crop"):
        predict_labels(model, image, "slide", (16, 16), crop=8, stride=12)
    with pytest.raises(ValueError, match=r"image must be a \(3, H, W\) RGB tensor"):
        predict_labels(model, image[:1], "whole")
    with pytest.raises(ValueError, match="size must be two ints >= 1"):
        segnext.upsample_logits(torch.rand(1, 3, 4, 4), (0, 8))


# ---------------------------------------------------------------------------------------------
# NMF arguments

def test_nmf_eps_and_inv_t_out_of_float32_range_are_refused():
    x = torch.rand(1, 8, 4, 4)
    for eps in (1e-300, 1e-39, 0.0, -1e-6, 1e39, math.inf):
        with pytest.raises(ValueError, match="eps must be a finite float > 0 within"):
            sk.nmf2d(x, R=2, steps=1, eps=eps)
    for inv_t in (1e300, -1e300, 2 * INV_T_MAX, math.nan):
        with pytest.raises(ValueError, match="inv_t must be a finite float within"):
            sk.nmf2d(x, R=2, steps=1, inv_t=inv_t)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        sk.nmf2d(x, R=2, steps=1, generator=123)


@pytest.mark.parametrize("eps,inv_t", [(EPS_MIN, INV_T_MAX), (EPS_MIN, -INV_T_MAX),
                                       (1e-6, INV_T_MAX)])
def test_nmf_at_the_bounds_stays_finite(eps, inv_t):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 8, 5, 5)) * 3
    x[:, 2] = 0           # a channel of zeros: its bases row becomes 0, a 0/(0 + eps) update
    x[:, :, 1, :] = 0     # pixels of zeros
    x.requires_grad_()
    y = sk.nmf2d(x, R=4, steps=3, eps=eps, inv_t=inv_t, backend="reference")
    y.sum().backward()
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(x.grad).all())


def test_nmf_module_and_helpers_check_arguments_when_built():
    with pytest.raises(ValueError, match="R must be an int >= 1"):
        sk.NMF2D(R=0)
    with pytest.raises(ValueError, match="eval_steps must be an int >= 0"):
        sk.NMF2D(eval_steps=-1)
    with pytest.raises(ValueError, match="eps must be a finite float > 0"):
        sk.NMF2D(eps=1e-300)
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        sk.draw_bases(-1, 4, 2, device="cpu")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sk.draw_bases(1, 4, 2, device="cpu", generator=3)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        sk.nmf_decompose_ref(torch.rand(1, 4, 9), torch.rand(1, 4, 2), -1)


# ---------------------------------------------------------------------------------------------
# Model, patching, data, metrics

@pytest.mark.parametrize("kwargs,error,message", [
    (dict(num_classes=0), ValueError, "num_classes must be an int >= 1, got 0"),
    (dict(num_classes=True), ValueError, "num_classes must be an int >= 1, got True"),
    (dict(num_classes=2.5), ValueError, "num_classes must be an int >= 1"),
    (dict(in_channels=0), ValueError, "in_channels must be an int >= 1"),
    (dict(drop_path_rate=2.0), ValueError, "drop_path_rate must be a finite number in"),
    (dict(drop_path_rate=math.nan), ValueError, "drop_path_rate must be a finite number in"),
    (dict(dropout_ratio=1.5), ValueError, "dropout_ratio must be a finite number in"),
    (dict(nmf_rank=0), ValueError, "nmf_rank must be an int >= 1"),
    (dict(nmf_kwargs=dict(eps=0.0)), ValueError, "eps must be a finite float > 0"),
    (dict(norm_layer=5), TypeError, "norm_layer must build a norm module"),
])
def test_model_builders_refuse_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        segnext.segnext_t(**kwargs)


@pytest.mark.parametrize("img,error,message", [
    (torch.rand(3, 32, 32), ValueError, r"img must have shape \(B, 3, H, W\)"),
    (torch.rand(1, 4, 32, 32), ValueError, r"img must have shape \(B, 3, H, W\)"),
    (torch.rand(0, 3, 32, 32), ValueError, "img must not be empty"),
    (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError,
     "img must be a floating-point tensor"),
    ([[1.0]], TypeError, "img must be a torch.Tensor"),
])
def test_model_forward_refuses_bad_images(img, error, message, tiny_segnext):
    model = tiny_segnext
    with torch.no_grad(), pytest.raises(error, match=message):
        model(img)
    with torch.no_grad(), pytest.raises(error, match=message.replace("img", "x")):
        model.backbone(img)


def test_patch_and_fused_mlp_refuse_what_is_not_a_model():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        sk.patch("str")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got int"):
        sk.unpatch(3)
    with pytest.raises(ValueError, match="nmf_grad must be one of"):
        sk.patch(torch.nn.Sequential(), nmf_grad="exact")
    with pytest.raises(TypeError, match="msca must be True or False"):
        sk.patch(torch.nn.Sequential(), msca="yes")
    conv = torch.nn.Conv2d(4, 4, 1)
    with pytest.raises(TypeError, match="fc1 must be an nn.Conv2d"):
        sk.FusedMlp(1, conv, torch.nn.GELU(), conv)
    with pytest.raises(TypeError, match="dwconv must be an nn.Conv2d or hold one"):
        sk.FusedMlp(conv, torch.nn.Identity(), torch.nn.GELU(), conv)


def test_class_counts_that_collide_with_the_ignore_label_are_refused():
    with pytest.raises(ValueError, match="num_classes in \\[2, 255\\]"):
        SyntheticShapes(num_classes=256)
    with pytest.raises(ValueError, match="ignore_index must be an int outside the class indices"):
        ConfusionMatrix(300)  # ignore_index 255 would be one of its classes
    assert ConfusionMatrix(300, ignore_index=-1).num_classes == 300
    with pytest.raises(ValueError, match="size must hold ints >= 1"):
        SyntheticShapes(size=0)
    with pytest.raises(TypeError, match="pred must be an integer tensor"):
        ConfusionMatrix(3).update(torch.rand(2, 2), torch.zeros(2, 2, dtype=torch.long))


def test_ade20k_refuses_labels_outside_its_classes_and_skips_folders(tmp_path):
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "validation" / "a.jpg")
    Image.new("L", (8, 8), 200).save(tmp_path / "annotations" / "validation" / "a.png")
    (tmp_path / "images" / "validation" / "folder.jpg").mkdir()  # not a sample
    dataset = ADE20K(tmp_path, "validation")
    assert len(dataset) == 1
    with pytest.raises(DataError, match="annotation values up to 200"):
        dataset[0]
    (tmp_path / "images" / "validation" / "a.jpg").write_text("not a JPEG")
    with pytest.raises(DataError, match="ADE20K sample a.jpg"):
        dataset[0]


def test_building_blocks_and_data_helpers_refuse_bad_values():
    from segnext.data import prepare_test_image
    from segnext.palette import colorize, palette

    with pytest.raises(ValueError, match="drop_prob must be a finite number in"):
        segnext.DropPath(2.0)
    everything = segnext.DropPath(1.0).train()(torch.rand(3, 2, 4, 4))  # not NaN: all dropped
    assert torch.equal(everything, torch.zeros(3, 2, 4, 4))
    head = segnext.LightHamHead(in_channels=(8, 8, 8), channels=32, ham_channels=32,
                                num_classes=3)
    with pytest.raises(ValueError, match="feats must hold the backbone's stage outputs"):
        head([torch.rand(1, 8, 4, 4)] * 2)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        segnext.convert_state_dict("backbone.norm1.weight")
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        palette(2.5)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        colorize(torch.rand(2, 2), palette(3))
    image = torch.rand(3, 10, 12) * 255
    with pytest.raises(ValueError, match=r"image must be a non-empty \(3, H, W\) tensor"):
        prepare_test_image(image[0])
    with pytest.raises(ValueError, match="scale must be two sizes >= 1"):
        prepare_test_image(image, scale=(-5, 3))
    with pytest.raises(ValueError, match="size_divisor must be an int >= 1"):
        prepare_test_image(image, size_divisor=-1)
    for kwargs, message in ((dict(crop_size=0), "crop_size must hold ints >= 1"),
                            (dict(ratio_range=(2.0, 1.0)), "ratio_range must be"),
                            (dict(cat_max_ratio=2.0), "cat_max_ratio must be a finite number"),
                            (dict(test_size_divisor=-1), "test_size_divisor must be an int")):
        with pytest.raises(ValueError, match=message):
            ADE20K("/no/such/folder", **kwargs)

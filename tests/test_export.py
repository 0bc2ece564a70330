"""``python -m segnext.export``: ONNX (and OpenVINO IR) export of SegNeXt, verified against
PyTorch. Needs the ``deploy`` extra (onnx, onnxruntime; openvino for the IR tests), which
.ci/run installs; without it these tests are skipped with the install line."""
import sys

import numpy as np
import pytest
import torch

import segnext
from segnext import export

EXTRA = "the deploy extra is not installed: pip install -e .[deploy]"
onnx = pytest.importorskip("onnx", reason=EXTRA)
ort = pytest.importorskip("onnxruntime", reason=EXTRA)
HAS_OPENVINO = export.openvino_available()
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed: "
                                    "pip install -e .[deploy]")

SIDE = 64  # the smallest size with a 2x2 last stage: a fast export and run


def _session(path_or_model):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    model = path_or_model if isinstance(path_or_model, (str, bytes)) else \
        path_or_model.SerializeToString()
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _fresh_t(num_classes=150, seed=0):
    torch.manual_seed(seed)
    return segnext.segnext_t(num_classes=num_classes).eval()


def test_random_bases_export_is_standard_onnx_and_matches_pytorch_with_the_same_draw(tmp_path):
    model = _fresh_t()
    path = tmp_path / "t.onnx"
    sample = torch.randn(1, 3, SIDE, SIDE)
    export.export_onnx(model, path, sample)

    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = [n.op_type for n in graph.graph.node]
    # only standard operators: neither our custom ops nor the fused path's folding
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
    assert ops.count(export.RANDOM_OP) == 1
    assert "BatchNormalization" in ops or ops.count("Conv") > 100  # the unfolded blocks

    # the random node made an input, fed the draw PyTorch also gets (normalised on both sides)
    feeds, ref = export.verification_inputs(model, sample, None, seed=3)
    (out,) = _session(export.with_uniform_input(graph)).run(["logits"], feeds)
    assert out.shape == (1, 150, SIDE // 8, SIDE // 8)
    assert export.relative_error(out, ref) < 1e-4

    # as shipped, the graph draws new bases every run: outputs are close but not equal
    sess = _session(str(path))
    a = sess.run(["logits"], {"image": sample.numpy()})[0]
    b = sess.run(["logits"], {"image": sample.numpy()})[0]
    assert np.isfinite(a).all() and not np.array_equal(a, b)


def test_dynamic_axes_run_other_batch_and_sizes(tmp_path):
    model = _fresh_t()
    path = tmp_path / "t.onnx"
    export.export_onnx(model, path, torch.randn(1, 3, SIDE, SIDE),
                       bases=export.fixed_bases(model, 0))
    sess = _session(str(path))
    bases = export.fixed_bases(model, 0)
    for batch, h, w in ((2, 96, 64), (1, 64, 128)):
        img = torch.randn(batch, 3, h, w)
        (out,) = sess.run(["logits"], {"image": img.numpy()})
        ref = export.reference_logits(model, img, bases.repeat(batch, 1, 1))
        assert out.shape == tuple(ref.shape) == (batch, 150, h // 8, w // 8)
        assert export.relative_error(out, ref) < 1e-4


def test_fixed_bases_are_reproducible_and_batch_independent(tmp_path):
    model = _fresh_t()
    path = tmp_path / "t.onnx"
    export.export_onnx(model, path, torch.randn(1, 3, SIDE, SIDE),
                       bases=export.fixed_bases(model, 7))
    graph = onnx.load(str(path))
    assert export.RANDOM_OP not in [n.op_type for n in graph.graph.node]
    sess = _session(str(path))
    imgs = torch.randn(2, 3, SIDE, SIDE)
    both = sess.run(["logits"], {"image": imgs.numpy()})[0]
    again = sess.run(["logits"], {"image": imgs.numpy()})[0]
    first = sess.run(["logits"], {"image": imgs[:1].numpy()})[0]
    np.testing.assert_array_equal(both, again)
    np.testing.assert_allclose(both[:1], first, rtol=1e-5, atol=1e-6)


def test_verification_catches_a_wrong_graph(tmp_path):
    model = _fresh_t()
    path = tmp_path / "t.onnx"
    sample = torch.randn(1, 3, SIDE, SIDE)
    bases = export.fixed_bases(model, 0)
    export.export_onnx(model, path, sample, bases=bases)
    feeds, ref = export.verification_inputs(model, sample, bases, seed=0)
    assert export.verify_onnx(path, feeds, ref, random_bases=False) < 1e-4

    graph = onnx.load(str(path))
    seg = next(t for t in graph.graph.initializer if t.name.endswith("conv_seg.weight"))
    w = onnx.numpy_helper.to_array(seg).copy()
    w[0] += 1.0  # one class's classifier off
    seg.CopyFrom(onnx.numpy_helper.from_array(w, seg.name))
    onnx.save(graph, str(path))
    assert export.verify_onnx(path, feeds, ref, random_bases=False) > 1e-2


def test_cli_checkpoint_to_onnx_verified(tmp_path, capsys):
    ckpt = tmp_path / "seg19.pth"
    torch.save({"state_dict": _fresh_t(num_classes=19, seed=1).state_dict()}, ckpt)
    out = tmp_path / "out" / "seg19.onnx"
    rc = export.main(["--checkpoint", str(ckpt), "--out", str(out), "--size", "64", "96",
                      "--ir", "no"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert out.exists() and not out.with_suffix(".xml").exists()
    assert "SegNeXt-T with 19 classes" in text and "RandomUniformLike" in text
    assert "verified with ONNX Runtime" in text
    (logits,) = _session(str(out)).run(["logits"], {"image": np.zeros((1, 3, 64, 96), np.float32)})
    assert logits.shape == (1, 19, 8, 12)


@needs_openvino
@pytest.mark.parametrize("bases", ["random", "fixed"])
def test_cli_writes_and_verifies_openvino_ir(tmp_path, capsys, bases):
    out = tmp_path / "t.onnx"
    rc = export.main(["--model", "t", "--out", str(out), "--size", "64", "64", "--bases", bases,
                      "--static"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert out.with_suffix(".xml").exists() and out.with_suffix(".bin").exists()
    assert "verified with OpenVINO" in text
    errors = [float(line.rsplit("error ", 1)[1].split()[0]) for line in text.splitlines()
              if "max relative error" in line]
    assert len(errors) == 2 and max(errors) < 1e-4


def _one_line_error(capsys, argv, code=2):
    with pytest.raises(SystemExit) as exc:
        rc = export.main(argv)
        raise SystemExit(rc)
    assert exc.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv,expected", [
    (["--opset", "9", "--model", "t"], "--opset 9 is not supported"),
    (["--opset", "21", "--model", "t"], "expected 13..20"),
    ([], "give --checkpoint or --model"),
    (["--model", "t", "--out", "x.txt"], "must name a .onnx file"),
    (["--model", "t", "--size", "16", "64"], "--size must be at least 32"),
    (["--model", "t", "--batch", "0"], "--batch must be >= 1"),
    (["--model", "t", "--tolerance", "0"], "--tolerance must be in (0, 1)"),
    (["--model", "x"], "invalid choice"),
    (["--model", "t", "--bases", "zeros"], "invalid choice"),
])
def test_bad_options_one_line_exit_2(capsys, argv, expected):
    err = _one_line_error(capsys, argv)
    assert expected in err and err.startswith("python -m segnext.export: error:")


def test_bad_checkpoint_and_missing_packages_one_line_exit_2(tmp_path, capsys, monkeypatch):
    err = _one_line_error(capsys, ["--checkpoint", str(tmp_path / "none.pth"),
                                   "--out", str(tmp_path / "x.onnx")])
    assert "checkpoint not found" in err
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    err = _one_line_error(capsys, ["--checkpoint", str(junk), "--out", str(tmp_path / "x.onnx")])
    assert "cannot read checkpoint" in err

    monkeypatch.setattr(export, "openvino_available", lambda: False)
    err = _one_line_error(capsys, ["--model", "t", "--ir", "yes",
                                   "--out", str(tmp_path / "x.onnx")])
    assert "'openvino' package" in err and "pip install -e .[deploy]" in err

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    err = _one_line_error(capsys, ["--model", "t", "--ir", "no", "--out", str(tmp_path / "x.onnx")])
    assert "'onnxruntime' package" in err and "--no-verify" in err
    assert not (tmp_path / "x.onnx").exists()  # refused before any work


@needs_openvino
def test_openvino_is_imported_without_its_usage_telemetry():
    import subprocess
    code = ("from segnext.export import import_openvino; import_openvino(); import sys; "
            "import openvino.tools.ovc.telemetry_utils as t; "
            "print(sys.modules['openvino_telemetry'], t.tm.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "openvino.tools.ovc.telemetry_stub"]


def test_an_exporter_failure_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported: aten::something\nlong traceback text")
    monkeypatch.setattr(torch.onnx, "export", broken)
    err = _one_line_error(capsys, ["--model", "t", "--ir", "no", "--size", "64", "64",
                                   "--out", str(tmp_path / "x.onnx")], code=1)
    assert "export or verification failed: RuntimeError: Unsupported: aten::something" in err

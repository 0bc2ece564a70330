"""segnext.predict: masks and overlays of the right size and colours from every checkpoint
layout, whole and sliding-window inference, and one-line errors with exit status 2."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

Image = pytest.importorskip("PIL.Image", reason="segnext.predict reads and writes images "
                                                "with Pillow")

import segnext  # noqa: E402
from segnext import inference, predict  # noqa: E402
from segnext.checkpoint import MAX_KEYS_SHOWN  # noqa: E402
from segnext.checkpoint_model import infer_model_size  # noqa: E402
from segnext.palette import palette  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 5
HEIGHT, WIDTH = 40, 56
SMALL_SCALE = ["--scale", "96", "64"]  # keep the forward small: 64 x 90 instead of 512 x 717


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = segnext.segnext_t(num_classes=NUM_CLASSES)
    state = model.state_dict()
    paths = dict(image=root / "street.png", not_image=root / "notes.png",
                 plain=root / "plain.pth", mmseg=root / "mmseg.pth",
                 trained=root / "trained.pth", backbone=root / "mscan_t.pth")
    pixels = torch.randint(0, 256, (HEIGHT, WIDTH, 3), dtype=torch.uint8)
    Image.frombytes("RGB", (WIDTH, HEIGHT), pixels.numpy().tobytes()).save(paths["image"])
    paths["not_image"].write_text("this is not a PNG\n")
    torch.save(state, paths["plain"])
    torch.save({"state_dict": segnext.convert_state_dict(state, "mmseg"), "meta": {}},
               paths["mmseg"])
    torch.save({"state_dict": state,
                "meta": {"format": "segnext.train/1", "model": "t",
                         "num_classes": NUM_CLASSES, "step": 7}}, paths["trained"])
    torch.save({k[len("backbone."):]: v for k, v in state.items()
                if k.startswith("backbone.")}, paths["backbone"])
    return paths


def _predict(capsys, *argv):
    code = predict.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _check_outputs(out_dir: Path):
    mask = Image.open(out_dir / "street_mask.png")
    overlay = Image.open(out_dir / "street_overlay.png")
    assert mask.size == overlay.size == (WIDTH, HEIGHT)
    assert mask.mode == "P" and overlay.mode == "RGB"
    labels = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8)
    assert int(labels.max()) < NUM_CLASSES  # palette indices are the classes
    colours = {tuple(c) for c in palette(NUM_CLASSES).tolist()}
    used = {rgb for _, rgb in mask.convert("RGB").getcolors(WIDTH * HEIGHT)}
    assert used <= colours


@pytest.mark.parametrize("layout,described", [
    ("plain", "SegNeXt-T with 5 classes, original key names"),
    ("mmseg", "SegNeXt-T with 5 classes, mmseg key names"),
    ("trained", "SegNeXt-T with 5 classes, segnext.train checkpoint at iteration 7"),
])
def test_whole_inference_writes_mask_and_overlay(files, tmp_path, capsys, layout, described):
    code, out, err = _predict(capsys, "--checkpoint", files[layout], "--out", tmp_path,
                              *SMALL_SCALE, files["image"])
    assert code == 0, err
    assert described in out  # size and class count read from the checkpoint
    assert f"{files['image']}: {WIDTH}x{HEIGHT}, " in out and " ms -> " in out
    _check_outputs(tmp_path)


def test_slide_inference(files, tmp_path, capsys):
    code, out, err = _predict(capsys, "--checkpoint", files["plain"], "--out", tmp_path,
                              "--mode", "slide", *SMALL_SCALE, "--crop", "32",
                              "--stride", "24", files["image"])
    assert code == 0, err
    assert "slide inference" in out
    _check_outputs(tmp_path)


class ConstantLogits(torch.nn.Module):
    """A stand-in model: logits at 1/8 that say "class k" with weight k everywhere."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, img, generator=None):
        h, w = -(-img.shape[-2] // 8), -(-img.shape[-1] // 8)
        return self.scale * torch.arange(3.0).view(1, 3, 1, 1).expand(img.shape[0], 3, h, w)


def test_slide_windows_cover_the_image_and_average():
    model, image = ConstantLogits(), torch.randn(1, 3, 50, 70)
    slid = inference.slide_inference(model, image, (25, 35), crop=32, stride=20)
    whole = inference.whole_inference(model, image, (25, 35))
    assert slid.shape == whole.shape == (1, 3, 25, 35)
    torch.testing.assert_close(slid, whole)  # every pixel covered, overlaps averaged
    bigger_crop = inference.slide_inference(model, image, (50, 70), crop=128, stride=96)
    torch.testing.assert_close(bigger_crop, inference.whole_inference(model, image, (50, 70)))


def test_model_size_is_read_from_the_keys():
    for size in ("t", "s"):
        with torch.device("meta"):
            state = segnext.build(size, 3).state_dict()
        assert infer_model_size(state) == size
    assert infer_model_size({"foo.weight": torch.zeros(1)}) is None


def _assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("segnext.predict: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_image(files, tmp_path, capsys):
    code, _, err = _predict(capsys, "--checkpoint", files["plain"], "--out", tmp_path,
                            files["image"], tmp_path / "missing.jpg")
    _assert_one_line_error(code, err, "image not found", "missing.jpg")
    assert not list(tmp_path.glob("*.png"))  # checked before any work


def test_not_an_image(files, tmp_path, capsys):
    code, _, err = _predict(capsys, "--checkpoint", files["plain"], "--out", tmp_path,
                            files["not_image"])
    _assert_one_line_error(code, err, "not an image", "notes.png")


def test_missing_checkpoint(files, tmp_path, capsys):
    code, _, err = _predict(capsys, "--checkpoint", tmp_path / "none.pth", files["image"])
    _assert_one_line_error(code, err, "checkpoint not found", "none.pth")


def test_file_that_is_not_a_checkpoint(files, capsys):
    code, _, err = _predict(capsys, "--checkpoint", files["not_image"], files["image"])
    _assert_one_line_error(code, err, "cannot read checkpoint", "notes.png")


@pytest.mark.parametrize("options,fragments", [
    (["--num-classes", "7"], ["does not match SegNeXt-T with 7 classes",
                              "decode_head.conv_seg.weight [5, 256, 1, 1] vs [7, 256, 1, 1]"]),
    (["--model", "s"], ["does not match SegNeXt-S with 5 classes", "unexpected",
                        "backbone.patch_embed1.proj.0.weight [16, 3, 3, 3] vs [32, 3, 3, 3]"]),
])
def test_checkpoint_that_does_not_match_the_model(files, capsys, options, fragments):
    code, _, err = _predict(capsys, "--checkpoint", files["plain"], *options, files["image"])
    _assert_one_line_error(code, err, *fragments)
    assert err.count(" vs [") <= MAX_KEYS_SHOWN  # a few keys shown, not hundreds


def test_backbone_only_checkpoint(files, capsys):
    code, _, err = _predict(capsys, "--checkpoint", files["backbone"], "--num-classes", "5",
                            files["image"])
    _assert_one_line_error(code, err, "backbone weights only")


def test_command_line_exit_status_without_traceback(files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "segnext.predict", "--checkpoint",
                           str(files["plain"]), str(tmp_path / "missing.jpg")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"segnext.predict: error: image not found: " \
                                  f"{tmp_path / 'missing.jpg'}"

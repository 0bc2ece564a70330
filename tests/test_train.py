"""segnext.train and its parts: fused and reference backends train alike, two torchrun processes
end with the same weights, a resumed run is the uninterrupted run, mIoU by hand, and the
synthetic data is deterministic with exact masks.

Every run is SegNeXt-T on 64x64 synthetic crops, batch 2, a few iterations (seconds each).
"""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import segnext
import segnext_kernels as sk
from segnext import train as train_cli
from segnext.data import ADE20K, IGNORE_INDEX, SyntheticShapes, normalize, rescale_size
from segnext.metrics import ConfusionMatrix, mean_iou, scores_from_confusion

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["--model", "t", "--data", "synthetic", "--num-classes", "5", "--crop", "64",
            "--batch-size", "2", "--synthetic-train-size", "16", "--workers", "0",
            "--log-every", "1", "--eval-every", "0"]


def _run(tmp_path, name, *extra):
    return train_cli.main([*TINY_RUN, "--out", str(tmp_path / name), *extra])


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} entries differ, e.g. {different[:3]}"


# ---------------------------------------------------------------------------------------------
# (a) fused backends train as the reference does

def _fused_cpu_available():
    return "cpu" in sk.op_backends()["msca"] and sk.available_backends()["cpu"].available


FUSED = [
    pytest.param("cpu", "cpu", marks=pytest.mark.skipif(
        not _fused_cpu_available(),
        reason="no fused C++ CPU MSCA kernel in this segnext_kernels._C "
               "('cpu' is not in op_backends()['msca'])")),
    # Triton on the CPU runs only under the interpreter: far too slow for a whole model.
    pytest.param("cuda", "triton", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not sk.available_backends()["cuda"].available, reason="no CUDA build of _C")]),
]


@pytest.mark.parametrize("device,backend", FUSED)
def test_fused_backend_trains_like_the_reference(tmp_path, device, backend):
    # Same --seed: same initial weights, batches, dropout masks and NMF bases (global RNG).
    common = ["--iters", "3", "--warmup-iters", "0", "--device", device]
    fused = _run(tmp_path, "fused", *common, "--backend", backend)
    reference = _run(tmp_path, "reference", *common, "--backend", "reference")
    fused_losses = torch.tensor([loss for _, loss in fused.losses])
    reference_losses = torch.tensor([loss for _, loss in reference.losses])
    assert len(fused_losses) == 3
    # the fused kernels ran (13 blocks), the reference run ran none of them
    assert fused.kernels[f"msca:{backend}"] == 13 and fused.kernels[f"msca_backward:{backend}"] == 13
    assert not any(k.endswith(f":{backend}") for k in reference.kernels)
    assert reference.kernels["msca:reference"] == 13
    # float32 on the CPU; on CUDA the reference's cuDNN convolutions may use TF32.
    rtol = 1e-4 if device == "cpu" else 2e-3
    torch.testing.assert_close(fused_losses, reference_losses, rtol=rtol, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# (b) two processes under torchrun (gloo on the CPU)

def test_two_process_cpu_run_keeps_ranks_identical(tmp_path):
    weights = tmp_path / "weights"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "segnext.train", *TINY_RUN, "--iters", "2",
               "--device", "cpu", "--out", str(tmp_path / "run"),
               "--dump-weights", str(weights)]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "2 process(es) on cpu" in proc.stdout
    assert "keeping per-process BatchNorm" in proc.stdout  # no SyncBatchNorm on gloo
    assert "[2/2] loss" in proc.stdout

    rank0, rank1 = _state(weights / "rank0.pt"), _state(weights / "rank1.pt")
    _assert_same_tensors(rank0, rank1)
    torch.manual_seed(0)  # the run's --seed: its initial weights
    initial = segnext.segnext_t(num_classes=5).state_dict()
    assert not torch.equal(rank0["decode_head.conv_seg.weight"],
                           initial["decode_head.conv_seg.weight"]), "the weights did not train"
    meta = _state(tmp_path / "run" / "latest.pth")["meta"]
    assert (meta["world_size"], meta["step"]) == (2, 2)


# ---------------------------------------------------------------------------------------------
# (c) resume

@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_resume_continues_the_same_run(tmp_path, amp):
    # fp16 adds the GradScaler: its scale and growth tracker must come back with the run.
    common = ["--iters", "4", "--warmup-iters", "2", "--device", "cpu", "--amp", amp]
    straight = _run(tmp_path, "straight", *common, "--checkpoint-every", "2")

    # A run stopped after its iteration-2 checkpoint, continued with --resume auto.
    (tmp_path / "resumed").mkdir()
    shutil.copyfile(tmp_path / "straight" / "iter_2.pth", tmp_path / "resumed" / "latest.pth")
    resumed = _run(tmp_path, "resumed", *common, "--resume", "auto")

    assert straight.step == resumed.step == 4
    assert resumed.lrs == straight.lrs
    assert [step for step, _ in resumed.losses] == [3, 4]
    assert resumed.losses == straight.losses[2:]
    final_straight = _state(tmp_path / "straight" / "iter_4.pth")
    final_resumed = _state(tmp_path / "resumed" / "iter_4.pth")
    _assert_same_tensors(final_straight["state_dict"], final_resumed["state_dict"])
    assert final_straight["scheduler"] == final_resumed["scheduler"]
    assert final_straight["grad_scaler"] == final_resumed["grad_scaler"]
    if amp == "fp16":
        scaler = final_straight["grad_scaler"]
        assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 0, scaler
        # the iteration-2 checkpoint carried a live scaler state (not the disabled empty dict)
        assert _state(tmp_path / "straight" / "iter_2.pth")["grad_scaler"]
    else:
        assert final_straight["grad_scaler"] == {}
    for a, b in zip(final_straight["optimizer"]["state"].values(),
                    final_resumed["optimizer"]["state"].values()):
        _assert_same_tensors(a, b)

    # A checkpoint of another model is refused before any work, in one line.
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, "other", *common, "--num-classes", "6",
             "--resume", str(tmp_path / "straight" / "iter_2.pth"))
    assert exit_info.value.code == 2


def test_learning_rate_schedule():
    factor = train_cli.warmup_poly(iters=100, warmup_iters=10, warmup_ratio=1e-6, power=1.0,
                                   base_lr=6e-5, min_lr=0.0)
    assert factor(0) == pytest.approx(1e-6)                       # warmup starts at the ratio
    assert factor(5) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert factor(10) == pytest.approx(0.9)                       # then plain poly
    assert factor(100) == 0.0


def test_grad_checkpoint_keeps_the_gradients():
    torch.manual_seed(0)
    plain = segnext.segnext_t(5, drop_path_rate=0.0, dropout_ratio=0.0)
    checkpointed = segnext.segnext_t(5, drop_path_rate=0.0, dropout_ratio=0.0)
    checkpointed.load_state_dict(plain.state_dict())
    assert train_cli.checkpoint_backbone_blocks(checkpointed) == 13
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    image = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32))
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same NMF bases
        train_cli.segmentation_loss(model(image), labels).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_averages_over_all_pixels_including_ignored():
    logits = torch.zeros(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [255, 255]]])
    # Two labelled pixels of loss log(3) each, averaged over four pixels (mmseg 0.24).
    assert float(train_cli.segmentation_loss(logits, labels)) == pytest.approx(math.log(3) / 2)


# ---------------------------------------------------------------------------------------------
# (d) metrics

def test_miou_on_a_hand_made_example():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])   # the prediction under 255 does not count
    confusion = ConfusionMatrix(num_classes=4)     # class 3 appears nowhere: NaN, left out
    confusion.update(pred, target)
    assert confusion.matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0],
                                         [0, 0, 0, 0]]
    scores = confusion.compute()
    # IoU: class 0 1/(2+2-1), class 1 2/(2+3-2), class 2 0/(1+0-0).
    assert scores.iou[:3] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(scores.iou[3])
    assert scores.mean_iou == pytest.approx(1 / 3)
    assert scores.mean_accuracy == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert scores.pixel_accuracy == pytest.approx(3 / 5)
    assert scores.labelled_pixels == 5
    assert mean_iou(pred, target, 4) == pytest.approx(1 / 3)


def test_confusion_accumulates_and_checks_labels():
    torch.manual_seed(0)
    pred, target = torch.randint(0, 3, (2, 8, 8)), torch.randint(0, 3, (2, 8, 8))
    whole, parts = ConfusionMatrix(3), ConfusionMatrix(3)
    whole.update(pred, target)
    parts.update(pred[0], target[0])
    parts.update(pred[1], target[1])
    assert torch.equal(whole.matrix, parts.matrix)
    parts.all_reduce()  # no process group: a no-op
    assert torch.equal(whole.matrix, parts.matrix)
    assert scores_from_confusion(torch.eye(3, dtype=torch.int64)).mean_iou == 1.0
    with pytest.raises(ValueError, match="outside"):
        whole.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7))


# ---------------------------------------------------------------------------------------------
# (e) synthetic data

def _covers(shape, y, x):
    """Independent point-in-shape test at a pixel centre."""
    p = shape.params
    if shape.kind == "rectangle":
        return p[0] <= y < p[2] and p[1] <= x < p[3]
    if shape.kind == "ellipse":
        return ((y - p[0]) / p[2]) ** 2 + ((x - p[1]) / p[3]) ** 2 <= 1.0
    (y0, x0), (y1, x1), (y2, x2) = p[0:2], p[2:4], p[4:6]
    sides = [(x1 - x0) * (y - y0) - (y1 - y0) * (x - x0),
             (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1),
             (x0 - x2) * (y - y2) - (y0 - y2) * (x - x2)]
    return all(s >= 0 for s in sides) or all(s <= 0 for s in sides)


def test_synthetic_data_is_deterministic():
    a, b = SyntheticShapes(5, 48, seed=3), SyntheticShapes(5, 48, seed=3)
    for index in (0, 7):
        image_a, label_a = a.render(index)
        image_b, label_b = b.render(index)
        assert torch.equal(image_a, image_b) and torch.equal(label_a, label_b)
    assert not torch.equal(a.render(0)[0], a.render(1)[0])
    assert not torch.equal(a.render(0)[0], SyntheticShapes(5, 48, seed=4).render(0)[0])
    assert not torch.equal(a.render(0)[0], SyntheticShapes(5, 48, seed=3, split="val")
                           .render(0)[0])
    image, label = a[2]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 48)
    assert torch.equal(image, normalize(a.render(2)[0]))
    flipped = [a.sample(2, torch.Generator().manual_seed(s))[1] for s in range(8)]
    assert all(torch.equal(f, label) or torch.equal(f, label.flip(-1)) for f in flipped)


def test_synthetic_masks_match_their_shapes():
    data = SyntheticShapes(5, 40, seed=0)
    kinds = set()
    for index in range(6):
        image, label = data.render(index)
        shapes = data.shapes(index)
        kinds |= {s.kind for s in shapes}
        expected = torch.zeros(40, 40, dtype=torch.int64)
        for y in range(40):
            for x in range(40):
                for shape in shapes:  # painting order: the last shape covering it wins
                    if _covers(shape, y + 0.5, x + 0.5):
                        expected[y, x] = shape.label
        assert torch.equal(label, expected), f"sample {index}"
        for k in label.unique().tolist():  # the pixels of a class have its colour
            if k:
                mean = image[:, label == k].float().mean(dim=1)
                assert (mean - data.colours[k]).abs().max() < 20, (index, k)
    assert kinds == {"rectangle", "ellipse", "triangle"}


def test_keep_ratio_rescale_as_mmcv():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(48, 64, (2048, 512)) == (512, 683)   # small images are enlarged
    assert rescale_size(1000, 4000, (2048, 512)) == (512, 2048)


def test_ade20k_pipelines_on_a_tiny_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="ADE20K files are read with Pillow")
    torch.manual_seed(0)
    annotation = torch.randint(0, 151, (60, 80), dtype=torch.uint8)
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        pixels = torch.randint(0, 256, (60, 80, 3), dtype=torch.uint8)
        Image.frombytes("RGB", (80, 60), pixels.numpy().tobytes()).save(
            tmp_path / "images" / split / "scene.jpg")
        Image.frombytes("L", (80, 60), annotation.numpy().tobytes()).save(
            tmp_path / "annotations" / split / "scene.png")
    reduced = torch.where(annotation == 0, IGNORE_INDEX, annotation.long() - 1)

    # Validation: the image resized to fit (2048, 512) then to a multiple of 32; the label at
    # its original size, zero label reduced (0 -> 255, k -> k - 1).
    image, label = ADE20K(tmp_path, "validation")[0]
    assert image.shape == (3, 512, 704)  # 60x80 -> 512x683 -> multiple of 32
    assert torch.equal(label, reduced)

    # Training: rescaled so that the image is smaller than the crop, so it is padded with 255.
    train_set = ADE20K(tmp_path, "training", crop_size=64, scale=(40, 30))
    image, label = train_set.sample(0, torch.Generator().manual_seed(0))
    assert image.shape == (3, 64, 64) and label.shape == (64, 64)
    assert set(label.unique().tolist()) <= set(range(150)) | {IGNORE_INDEX}
    assert (label[-1] == IGNORE_INDEX).all() and (image[:, -1] == 0).all()
    again = train_set.sample(0, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], image) and torch.equal(again[1], label)

    with pytest.raises(FileNotFoundError, match="images/test"):
        ADE20K(tmp_path, "test")

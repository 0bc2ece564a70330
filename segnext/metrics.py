"""Semantic segmentation metrics from a confusion matrix, as mmseg computes them.

``ConfusionMatrix`` accumulates (ground truth, prediction) pixel counts over a dataset, skipping
ignored pixels; ``all_reduce`` sums it over the processes of a distributed run, so every rank
gets the metrics of the whole validation set; ``compute`` gives per-class IoU and accuracy and
their means. A class absent from both the ground truth and the predictions has IoU NaN and is
left out of the mean (mmseg's nanmean); a class predicted but absent from the ground truth
counts with IoU 0.

Ours, on ``torch.bincount`` and ``torch.nanmean``, not torchmetrics (not a dependency): mmseg
parity needs NaN for a class absent from both sides, where torchmetrics gives ``zero_division``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist

IGNORE_INDEX = 255


@dataclass
class SegmentationScores:
    """Metrics of one evaluation. Per-class lists hold NaN where the class is undefined."""
    iou: List[float]         # per class: |gt ∩ pred| / |gt ∪ pred|
    accuracy: List[float]    # per class: |gt ∩ pred| / |gt|
    mean_iou: float          # mIoU: nanmean of iou
    mean_accuracy: float     # mAcc: nanmean of accuracy
    pixel_accuracy: float    # aAcc: correct pixels / labelled pixels
    labelled_pixels: int

    def summary(self) -> Dict[str, float]:
        """The three headline numbers, in percent as mmseg prints them."""
        return {"mIoU": 100 * self.mean_iou, "mAcc": 100 * self.mean_accuracy,
                "aAcc": 100 * self.pixel_accuracy}


def scores_from_confusion(matrix: torch.Tensor) -> SegmentationScores:
    """Metrics of a (K, K) confusion matrix whose rows are ground truth, columns prediction."""
    matrix = matrix.double().cpu()
    intersection = matrix.diagonal()
    gt_area = matrix.sum(dim=1)
    pred_area = matrix.sum(dim=0)
    union = gt_area + pred_area - intersection
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, intersection / union.clamp(min=1), nan)
    accuracy = torch.where(gt_area > 0, intersection / gt_area.clamp(min=1), nan)
    total = matrix.sum()
    return SegmentationScores(
        iou=iou.tolist(), accuracy=accuracy.tolist(),
        mean_iou=float(torch.nanmean(iou)), mean_accuracy=float(torch.nanmean(accuracy)),
        pixel_accuracy=float(intersection.sum() / total) if total > 0 else float("nan"),
        labelled_pixels=int(total))


class ConfusionMatrix:
    """Pixel counts ``matrix[gt, pred]`` over everything passed to ``update``."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device="cpu"):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or \
                0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index must be an int outside the class indices [0, "
                             f"{num_classes}) (class {ignore_index} would never be counted), "
                             f"got {ignore_index!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` are integer class maps of the same shape;
        target pixels equal to ``ignore_index`` are skipped."""
        for name, t in (("pred", pred), ("target", target)):
            if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or \
                    t.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor of class indices, got "
                                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                             "must have the same shape")
        keep = target != self.ignore_index
        gt = target[keep].long().to(self.matrix.device)
        pr = pred[keep].long().to(self.matrix.device)
        k = self.num_classes
        if gt.numel() and (int(gt.min()) < 0 or int(gt.max()) >= k):
            raise ValueError(f"target holds labels outside [0, {k}) other than "
                             f"ignore_index={self.ignore_index}: "
                             f"min {int(gt.min())}, max {int(gt.max())}")
        if pr.numel() and (int(pr.min()) < 0 or int(pr.max()) >= k):
            raise ValueError(f"pred holds labels outside [0, {k})")
        self.matrix += torch.bincount(gt * k + pr, minlength=k * k).view(k, k)

    def all_reduce(self) -> None:
        """Sum the counts of every process (no-op outside a distributed run)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self) -> SegmentationScores:
        return scores_from_confusion(self.matrix)


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
             ignore_index: int = IGNORE_INDEX) -> float:
    """mIoU of one prediction against its ground truth."""
    confusion = ConfusionMatrix(num_classes, ignore_index)
    confusion.update(pred, target)
    return confusion.compute().mean_iou

"""The mIoU evaluation of a run: whole-image inference over the validation loader, the
confusion matrices summed over the ranks."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader

from ..data import derive_seed
from ..inference import whole_inference
from ..metrics import ConfusionMatrix, SegmentationScores
from ..model import SegNeXt


@torch.no_grad()
def evaluate(model: SegNeXt, loader: DataLoader, num_classes: int, device: torch.device,
             seed: int, amp_dtype: Optional[torch.dtype] = None) -> SegmentationScores:
    """mIoU over ``loader`` (whole-image inference, logits resized to the label size), summed
    over all ranks. The NMF bases come from a generator seeded with ``seed``, so the result is
    reproducible and the global RNG of the training run is left alone."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device).manual_seed(derive_seed("eval", seed))
    confusion = ConfusionMatrix(num_classes, device=device)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = whole_inference(model, images, labels.shape[-2:], generator=generator)
        confusion.update(logits.argmax(dim=1), labels)
    confusion.all_reduce()
    model.train(was_training)
    return confusion.compute()

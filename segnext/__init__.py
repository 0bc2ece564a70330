"""segnext: a thin, faithful PyTorch SegNeXt (MSCAN + LightHamHead) on segnext_kernels.

The modules carry the official names, so official checkpoints (original release or mmseg) load
with ``load_checkpoint``; MSCA and NMF run the fused kernels of the selected
``segnext_kernels`` backend.

    model = segnext.segnext_t(num_classes=150)
    segnext.load_checkpoint(model, "segnext_mscan-t_ade20k.pth")
    logits = model.eval().predict(img)          # (B, 150, H, W)
    optimizer = torch.optim.AdamW(segnext.param_groups(model), lr=6e-5)
"""
from .checkpoint import (CheckpointMismatchError, LoadResult, convert_state_dict, key_family,
                         load_checkpoint)
from .ham_head import ConvModule, Hamburger, LightHamHead
from .model import (HEAD_SETTINGS, SegNeXt, build, segnext_b, segnext_l, segnext_s, segnext_t,
                    upsample_logits)
from .mscan import (MLP_RATIOS, MSCAN, MSCAN_SETTINGS, Block, DropPath, DWConv, Mlp,
                    OverlapPatchEmbed, SpatialAttention, StemConv, mscan)
from .param_groups import OFFICIAL_CUSTOM_KEYS, param_groups
from .data import ADE20K, SyntheticShapes
from .metrics import ConfusionMatrix, SegmentationScores, mean_iou

__all__ = [
    "SegNeXt", "build", "segnext_t", "segnext_s", "segnext_b", "segnext_l", "upsample_logits",
    "HEAD_SETTINGS",
    "MSCAN", "mscan", "MSCAN_SETTINGS", "MLP_RATIOS", "StemConv", "OverlapPatchEmbed", "Block",
    "SpatialAttention", "Mlp", "DWConv", "DropPath",
    "LightHamHead", "Hamburger", "ConvModule",
    "load_checkpoint", "convert_state_dict", "key_family", "LoadResult",
    "CheckpointMismatchError",
    "param_groups", "OFFICIAL_CUSTOM_KEYS",
    "ADE20K", "SyntheticShapes", "ConfusionMatrix", "SegmentationScores", "mean_iou",
]

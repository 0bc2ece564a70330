"""Level "patch": the drop-in claim. SegNeXt written as the official code writes it
(``bench/official_segnext.py``: eager depthwise convs, ``x.clone()`` gates, BN/layer-scale
blocks, mmseg NMF2D) timed as is and after ``segnext_kernels.patch(model)``, which swaps its
13 (T) MSCA modules, its MLPs and its NMF2D for ours and changes nothing else: inference (eval,
no grad) and a training step (forward, bilinear upsampling, cross-entropy, backward, AdamW).

Unlike the "model" level (our own SegNeXt, whose eval blocks also fold BN and layer scales into
the convolutions), only what ``patch`` replaces differs here.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from .common import (amp_dtype_name, autocast_ctx, cycle, model_fused_backends, n_rotations,
                     to_layout)
from .runner import Case, Config, Variant

NUM_CLASSES = 150


def configs(cfg: Config) -> List[Tuple[str, str, int, int]]:
    """(model size, pass, batch, image side): the model level's shapes."""
    from .bench_model import configs as model_configs
    return [c for c in model_configs(cfg) if c[0] == "t"]


def _official(size: str, cfg: Config, layout: str, train: bool, patched: bool):
    import segnext_kernels as sk

    from .official_segnext import OfficialSegNeXt
    torch.manual_seed(0)
    model = OfficialSegNeXt(size, NUM_CLASSES).to(cfg.device)
    if layout == "cl":
        model = model.to(memory_format=torch.channels_last)
    model.train(train)
    if patched:
        replaced = sk.patch(model)
        if not replaced:
            raise RuntimeError("patch() replaced nothing in the official-layout model")
    return model


def _timed(size, pass_, batch, side, cfg: Config, layout: str, backend: str, patched: bool):
    import segnext_kernels as sk

    train = pass_ == "train"
    model = _official(size, cfg, layout, train, patched)
    sets = []
    for _ in range(n_rotations(batch * 3 * side * side * 4, cfg)):
        img = to_layout(torch.randn(batch, 3, side, side, device=cfg.device), layout)
        labels = torch.randint(0, NUM_CLASSES, (batch, side, side), device=cfg.device)
        sets.append((img, labels))
    nxt = cycle(sets)
    if train:
        opt = torch.optim.AdamW(model.parameters(), lr=6e-5)

        def step():
            img, labels = nxt()
            with sk.use_backend(backend):
                with autocast_ctx(cfg):
                    logits = F.interpolate(model(img), size=img.shape[-2:], mode="bilinear",
                                           align_corners=False)
                loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    def infer():
        img, _ = nxt()
        with torch.no_grad(), sk.use_backend(backend), autocast_ctx(cfg):
            return model(img)
    return infer


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    out, notes = [], []
    backends, ns = model_fused_backends(cfg)
    notes += ns
    for size, pass_, batch, side in configs(cfg):
        def make_for(backend, layout, patched, size=size, pass_=pass_, batch=batch, side=side):
            return lambda: _timed(size, pass_, batch, side, cfg, layout, backend, patched)
        variants = [Variant("eager", layout, "reference", baseline=True, graph=False,
                            make=make_for("reference", layout, False))
                    for layout in ("nchw", "cl")]
        for b, skip in backends:
            for layout in ("nchw", "cl"):
                variants.append(Variant(f"fused:{b}", layout, b, skip=skip, graph=False,
                                        make=make_for(b, layout, True)))
        out.append(Case(level="patch", pass_=pass_,
                        shape=f"official SegNeXt-{size.upper()} B{batch} {side}x{side}",
                        params=dict(model=f"official_segnext_{size}", batch=batch, H=side,
                                    W=side),
                        dtype=amp_dtype_name(cfg), variants=variants, timer="step"))
    notes.append("patch: the official-layout SegNeXt (bench/official_segnext.py) as is ('eager') "
                 "and after segnext_kernels.patch(model) ('fused:<backend>': MSCA, MLP and "
                 "NMF2D swapped, nothing else)")
    return out, list(dict.fromkeys(notes))

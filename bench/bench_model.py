"""Level "model": SegNeXt-T and SegNeXt-B inference (forward to the 1/8 logits, eval, no grad)
and a training step (forward, bilinear upsampling of the logits, cross-entropy, backward,
AdamW step on ``segnext.param_groups``); and (level "memory") the training step's
saved-activation bytes and, on CUDA, its peak memory.

Variants: the model with the reference backend in NCHW and channels_last (the baselines) and
with each backend that fuses MSCA or NMF2D on the device, in both layouts. Half dtypes run under
autocast with float32 parameters (mixed-precision training as users run it). torch.compile of
the whole model is not run: it takes minutes and is a different product.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from .common import (SavedBytes, amp_dtype_name, autocast_ctx, cycle, model_fused_backends,
                     n_rotations, timed_inference, to_layout)
from .runner import Case, Config, Variant

NUM_CLASSES = 150


def configs(cfg: Config) -> List[Tuple[str, str, int, int]]:
    """(model size, pass, batch, image side)."""
    if cfg.size == "smoke":
        return [("t", "infer", 1, 64), ("t", "train", 1, 64)]
    if cfg.cuda:
        if cfg.size == "quick":
            return [("t", "infer", 4, 512), ("t", "train", 4, 512),
                    ("b", "infer", 4, 512), ("b", "train", 4, 512)]
        return [("t", "infer", 16, 512), ("t", "train", 16, 512),
                ("b", "infer", 16, 512), ("b", "train", 8, 512)]
    if cfg.size == "quick":
        return [("t", "infer", 1, 256), ("t", "train", 1, 256)]
    return [("t", "infer", 1, 512), ("b", "infer", 1, 512), ("t", "train", 2, 256)]


def _model(size: str, cfg: Config, layout: str, train: bool):
    import segnext
    build = {"t": segnext.segnext_t, "b": segnext.segnext_b}[size]
    model = build(num_classes=NUM_CLASSES).to(cfg.device)
    if layout == "cl":
        model = model.to(memory_format=torch.channels_last)
    return model.train(train)


def _images(batch: int, side: int, cfg: Config, layout: str, train: bool):
    sets = []
    for _ in range(n_rotations(batch * 3 * side * side * 4, cfg)):
        img = to_layout(torch.randn(batch, 3, side, side, device=cfg.device), layout)
        labels = torch.randint(0, NUM_CLASSES, (batch, side, side), device=cfg.device)
        sets.append((img, labels))
    return sets


def _train_step(model, opt, cfg: Config, backend: str):
    import segnext
    import segnext_kernels as sk

    def step(img, labels):
        with sk.use_backend(backend):
            with autocast_ctx(cfg):
                logits = segnext.upsample_logits(model(img), img.shape[-2:])
            loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def _timed(size, pass_, batch, side, cfg: Config, layout: str, backend: str):
    import segnext

    train = pass_ == "train"
    model = _model(size, cfg, layout, train)
    nxt = cycle(_images(batch, side, cfg, layout, train))
    if train:
        opt = torch.optim.AdamW(segnext.param_groups(model), lr=6e-5)
        step = _train_step(model, opt, cfg, backend)
        return lambda: step(*nxt()).detach()

    return timed_inference(model, nxt, backend, cfg)


def _variants(cfg: Config, make_for) -> Tuple[List[Variant], List[str]]:
    variants = [Variant("eager", layout, "reference", baseline=True, graph=False,
                        make=make_for("reference", layout)) for layout in ("nchw", "cl")]
    backends, notes = model_fused_backends(cfg)
    for b, skip in backends:
        for layout in ("nchw", "cl"):
            variants.append(Variant(f"fused:{b}", layout, b, make=make_for(b, layout), skip=skip,
                                    graph=False))
    return variants, notes


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    out, notes = [], []
    for size, pass_, batch, side in configs(cfg):
        def make_for(backend, layout, size=size, pass_=pass_, batch=batch, side=side):
            return lambda: _timed(size, pass_, batch, side, cfg, layout, backend)
        variants, ns = _variants(cfg, make_for)
        notes += ns
        out.append(Case(level="model", pass_=pass_,
                        shape=f"SegNeXt-{size.upper()} B{batch} {side}x{side}",
                        params=dict(model=f"segnext_{size}", batch=batch, H=side, W=side),
                        dtype=amp_dtype_name(cfg), variants=variants, timer="step"))
    notes.append("model: training step = forward, upsample, cross-entropy, backward, AdamW step; "
                 "timed per call" + (" with CUDA events" if cfg.cuda else ""))
    return out, list(dict.fromkeys(notes))


# --------------------------------------------------------------------------------------------
# Memory level
# --------------------------------------------------------------------------------------------
def _make_memory(size, batch, side, cfg: Config, layout: str, backend: str, what: str):
    def make():
        import segnext
        import segnext_kernels as sk

        model = _model(size, cfg, layout, train=True)
        img, labels = _images(batch, side, cfg, layout, True)[0]
        params = list(model.parameters())
        if what == "saved":
            def saved_bytes():
                counter = SavedBytes(exclude=params)
                with counter.hooks(), sk.use_backend(backend), autocast_ctx(cfg):
                    logits = segnext.upsample_logits(model(img), img.shape[-2:])
                    loss = F.cross_entropy(logits.float(), labels, ignore_index=255)
                del loss, logits
                return counter.total
            return saved_bytes

        opt = torch.optim.AdamW(segnext.param_groups(model), lr=6e-5)
        step = _train_step(model, opt, cfg, backend)

        def peak_bytes():
            step(img, labels)  # allocates the optimizer state: the steady-state peak is wanted
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(img, labels)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return peak_bytes
    return make


def memory_cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    out, notes = [], []
    whats = ("saved", "peak") if cfg.cuda else ("saved",)
    for size, pass_, batch, side in configs(cfg):
        if pass_ != "train":
            continue
        for what in whats:
            def make_for(backend, layout, size=size, batch=batch, side=side, what=what):
                return _make_memory(size, batch, side, cfg, layout, backend, what)
            variants, ns = _variants(cfg, make_for)
            notes += ns
            out.append(Case(level="memory", pass_=f"train {what}",
                            shape=f"SegNeXt-{size.upper()} B{batch} {side}x{side}",
                            params=dict(model=f"segnext_{size}", batch=batch, H=side, W=side),
                            dtype=amp_dtype_name(cfg), variants=variants, metric="bytes",
                            unit_bytes=None))
    notes.append("memory: 'saved' = bytes autograd keeps for backward (distinct storages, "
                 "parameters excluded)" + ("; 'peak' = torch.cuda.max_memory_allocated over a "
                                            "training step (parameters and AdamW state included)"
                                            if cfg.cuda else ""))
    return out, list(dict.fromkeys(notes))

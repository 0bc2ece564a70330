"""Level "patch": the drop-in claim. SegNeXt written as the official code writes it
(``tests/official_segnext.py``: eager depthwise convs, ``x.clone()`` gates, BN/layer-scale
blocks, mmseg NMF2D) timed as is and after ``segnext_kernels.patch(model)``, which swaps its
13 (T) MSCA modules, its MLPs and its NMF2D for ours and changes nothing else: inference (eval,
no grad) and a training step (forward, bilinear upsampling, cross-entropy, backward, AdamW).

When mmsegmentation is installed (requirements-mmseg.txt), mmseg's own SegNeXt-T, built from
mmseg's config file, is timed too: as is, and with what the config line
``custom_hooks = [dict(type='SegNeXtKernelsHook')]`` does to it (``segnext_kernels.mmseg``).
Inference is the network (``mode='tensor'``) on preprocessed images; the training step is
mmseg's ``train_step`` (data preprocessor, decode-head loss, the config's AdamW with its
parameter groups). NCHW only: mmseg's data preprocessor hands the model NCHW batches.

Unlike the "model" level (our own SegNeXt, whose eval blocks also fold BN and layer scales into
the convolutions), only what ``patch`` replaces differs here.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .bench_model import _images
from .common import (amp_dtype_name, autocast_ctx, cycle, model_fused_backends, n_rotations,
                     timed_inference)
from .runner import Case, Config, Variant

NUM_CLASSES = 150
MMSEG_CONFIG = "segnext/segnext_mscan-{size}_1xb16-adamw-160k_ade20k-512x512.py"


def configs(cfg: Config) -> List[Tuple[str, str, int, int]]:
    """(model size, pass, batch, image side): the model level's shapes."""
    from .bench_model import configs as model_configs
    return [c for c in model_configs(cfg) if c[0] == "t"]


def official_segnext():
    """tests/official_segnext.py, the transcription of the official SegNeXt that the tests check
    ``patch`` with, loaded by its path (tests/ is no package), or the module the tests imported."""
    import importlib.util
    import sys

    module = sys.modules.get("official_segnext")
    if module is None:
        path = Path(__file__).resolve().parents[1] / "tests" / "official_segnext.py"
        spec = importlib.util.spec_from_file_location("official_segnext", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["official_segnext"] = module
        spec.loader.exec_module(module)
    return module


def _official(size: str, cfg: Config, layout: str, train: bool, patched: bool):
    import segnext_kernels as sk

    torch.manual_seed(0)
    model = official_segnext().OfficialSegNeXt(size, NUM_CLASSES).to(cfg.device)
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
    nxt = cycle(_images(batch, side, cfg, layout, train))
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

    return timed_inference(model, nxt, backend, cfg)


def _mmseg_missing() -> Optional[str]:
    """Why mmseg's SegNeXt cannot be timed here, or None."""
    try:
        import mmengine  # noqa: F401
        import mmseg  # noqa: F401
    except ImportError as exc:
        return f"{exc} (pip install -r requirements-mmseg.txt)"
    return None


def _mmseg_model(size: str, side: int, cfg: Config, train: bool, patched: bool):
    """mmseg's SegNeXt built from mmseg's own config file (data preprocessor sized ``side``),
    and (``patched``) what SegNeXtKernelsHook does to it at before_run."""
    from mmengine.config import Config as MMConfig
    from mmengine.registry import DefaultScope

    from segnext_kernels.mmseg import patch_model
    from segnext_kernels.mmseg.mmcv_lite import stub_mmcv_ops
    stub_mmcv_ops()  # mmcv-lite: mmseg imports mmcv.ops, which SegNeXt does not use
    import mmseg
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    path = Path(mmseg.__file__).parent / ".mim" / "configs" / MMSEG_CONFIG.format(size=size)
    mm_cfg = MMConfig.fromfile(str(path))
    mm_cfg.model.backbone.init_cfg = None  # an ImageNet checkpoint download
    mm_cfg.model.data_preprocessor.size = (side, side)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(mm_cfg.model).to(cfg.device)
    model.train(train)
    if patched:
        replaced = patch_model(model)
        if not replaced:
            raise RuntimeError("SegNeXtKernelsHook's patch replaced nothing in mmseg's SegNeXt")
    return model, mm_cfg


def _mmseg_batch(batch: int, side: int, cfg: Config) -> dict:
    """A batch as mmseg's dataloader gives it: uint8 CHW images and SegDataSamples."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, side, side), dtype=torch.uint8, device=cfg.device))
        s = SegDataSample(metainfo=dict(img_shape=(side, side), ori_shape=(side, side)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, NUM_CLASSES, (1, side, side),
                                                    device=cfg.device))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def _mmseg_timed(size, pass_, batch, side, cfg: Config, backend: str, patched: bool):
    import segnext_kernels as sk

    train = pass_ == "train"
    model, mm_cfg = _mmseg_model(size, side, cfg, train, patched)
    sets = [_mmseg_batch(batch, side, cfg)
            for _ in range(n_rotations(batch * 3 * side * side * 4, cfg))]
    if train:
        from mmengine.logging import MMLogger
        from mmengine.optim import build_optim_wrapper
        # the current mmengine logger would print every parameter group at INFO
        MMLogger.get_instance("segnext_bench_patch", log_level="WARNING")
        optim_wrapper = build_optim_wrapper(model, mm_cfg.optim_wrapper)
        nxt = cycle([(d,) for d in sets])

        def step():
            with sk.use_backend(backend):
                return model.train_step(nxt()[0], optim_wrapper)["loss"].detach()
        return step

    with torch.no_grad():
        nxt = cycle([(model.data_preprocessor(d, False)["inputs"],) for d in sets])

    def infer():
        with torch.no_grad(), sk.use_backend(backend):
            return model(nxt()[0], mode="tensor")
    return infer


def _mmseg_cases(cfg: Config, backends) -> Tuple[List[Case], List[str]]:
    missing = _mmseg_missing()
    if missing:
        return [], [f"patch: mmseg's SegNeXt not timed: {missing}"]
    out = []
    for size, pass_, batch, side in configs(cfg):
        def make_for(backend, patched, size=size, pass_=pass_, batch=batch, side=side):
            return lambda: _mmseg_timed(size, pass_, batch, side, cfg, backend, patched)
        variants = [Variant("eager", "nchw", "reference", baseline=True, graph=False,
                            make=make_for("reference", False))]
        variants += [Variant(f"fused:{b}", "nchw", b, skip=skip, graph=False,
                             make=make_for(b, True)) for b, skip in backends]
        out.append(Case(level="patch", pass_=pass_,
                        shape=f"mmseg SegNeXt-{size.upper()} B{batch} {side}x{side}",
                        params=dict(model=f"mmseg_segnext_{size}", batch=batch, H=side, W=side),
                        dtype="float32", variants=variants, timer="step"))
    notes = ["patch: mmseg's SegNeXt (mmsegmentation's own config file and modules) as is "
             "('eager') and with the SegNeXtKernelsHook config line ('fused:<backend>'); "
             "train = mmseg's train_step with the config's AdamW; float32, NCHW"]
    return out, notes


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
    notes.append("patch: the official-layout SegNeXt (tests/official_segnext.py) as is ('eager') "
                 "and after segnext_kernels.patch(model) ('fused:<backend>': MSCA, MLP and "
                 "NMF2D swapped, nothing else)")
    if cfg.size == "smoke":  # importing mmseg's models alone takes seconds; test_mmseg runs them
        return out, list(dict.fromkeys(notes + ["patch: mmseg's SegNeXt not timed with --smoke"]))
    mm_cases, mm_notes = _mmseg_cases(cfg, backends)
    return out + mm_cases, list(dict.fromkeys(notes + mm_notes))

"""mmsegmentation integration: turn the fused kernels on from an mmseg config.

Two config lines::

    custom_imports = dict(imports=['segnext_kernels.mmseg'], allow_failed_imports=False)
    custom_hooks = [dict(type='SegNeXtKernelsHook', backend='auto')]

Importing this module registers ``SegNeXtKernelsHook`` in mmengine's root ``HOOKS`` registry,
so it is found from mmseg's scope (and any other OpenMMLab scope). The hook swaps the model's
MSCA attention modules, MSCAN MLPs and NMF2D for ours with ``segnext_kernels.patch`` at
``before_run`` (train, val and test all call it), keeping the very same parameter objects, so
state_dict keys, checkpoints and an already built optimizer are unaffected. docs/mmseg.md says
why a hook and not a model wrapper.
"""
from __future__ import annotations

try:
    import mmengine  # noqa: F401
except ImportError as e:  # an ImportError (not a crash later) that says what to install
    raise ImportError(
        "segnext_kernels.mmseg is the mmsegmentation integration and needs mmsegmentation with "
        "mmengine installed (tested: mmsegmentation==1.2.2, mmengine==0.10.7, "
        "mmcv-lite==2.1.0): pip install -r requirements-mmseg.txt, or pip install "
        "'segnext-kernels[mmseg]'. Without mmseg, call segnext_kernels.patch(model) "
        f"directly. (import failed: {e})") from e

from mmengine.registry import HOOKS  # noqa: E402

from .hook import SegNeXtKernelsHook, patch_model  # noqa: E402

# force: a second import (importlib.reload, a config imported twice) must not raise KeyError
HOOKS.register_module(module=SegNeXtKernelsHook, force=True)

__all__ = ["SegNeXtKernelsHook", "patch_model"]

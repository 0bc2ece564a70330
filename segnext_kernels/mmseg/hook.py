"""``SegNeXtKernelsHook``: ``segnext_kernels.patch`` applied by mmengine's Runner."""
from __future__ import annotations

from collections import Counter
from typing import List, Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from torch import nn

from .. import available_backends, get_backend, set_backend
from ..mlp.module import FusedMlp
from ..msca.module import MSCA
from ..nmf2d.module import NMF2D
from ..patch import Replacement, patch

_NMF_GRADS = ("unrolled", "one_step")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / MMDistributedDataParallel (or other mmengine) wrapper."""
    return model.module if is_model_wrapper(model) else model


def patch_model(model: nn.Module, *, msca: bool = True, mlp: bool = True, nmf: bool = True,
                nmf_grad: str = "unrolled") -> List[Replacement]:
    """``segnext_kernels.patch`` on a Runner's model, through its distributed wrapper if any.

    Swapping inside a DDP wrapper after it was built is sound: the replacements hold the same
    parameter objects, which is what DDP's gradient hooks are attached to.
    """
    return patch(_unwrap(model), msca=msca, mlp=mlp, nmf=nmf, nmf_grad=nmf_grad)


def _ours(model: nn.Module) -> int:
    return sum(isinstance(m, (MSCA, FusedMlp, NMF2D)) for m in model.modules())


def summary(replaced: List[Replacement]) -> str:
    """``13 MSCAAttention -> MSCA, 13 Mlp -> FusedMlp, 1 NMF2D -> NMF2D``."""
    counts = Counter((r.original, r.new) for r in replaced)
    return ", ".join(f"{n} {old} -> {new}" for (old, new), n in counts.items()) or "nothing"


class SegNeXtKernelsHook(Hook):
    """Swap the model's MSCA, MSCAN MLP and NMF2D modules for the fused ones before the run.

    Args:
        backend: ``segnext_kernels`` backend for the run (``"auto"``, ``"cpu"``, ``"cuda"``,
            ``"triton"``, ``"reference"``); ``None`` leaves the current selection (``auto``,
            or ``SEGNEXT_BACKEND``). Set at ``before_run``, restored at ``after_run``.
        msca, mlp, nmf: which kinds of module to swap.
        nmf_grad: gradient of the fused NMF2D: ``"unrolled"`` (what the official checkpoints
            were trained with) or ``"one_step"``.

    ``replaced`` lists every swap made (model and EMA copy), ``model_replaced`` those in the
    Runner's model.
    """

    # Before EMAHook (NORMAL) deep-copies the model, so that the EMA copy is fused too; any
    # EMA copy made earlier is patched as well (see before_run).
    priority = "VERY_HIGH"

    def __init__(self, backend: Optional[str] = None, msca: bool = True, mlp: bool = True,
                 nmf: bool = True, nmf_grad: str = "unrolled"):
        choices = ("auto",) + tuple(available_backends())
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"SegNeXtKernelsHook: backend must be None or a str, got {backend!r}")
        if backend is not None and backend.strip().lower() not in choices:
            raise ValueError(f"SegNeXtKernelsHook: backend must be None or one of {choices}, "
                             f"got {backend!r}")
        for name, value in (("msca", msca), ("mlp", mlp), ("nmf", nmf)):
            if not isinstance(value, bool):
                raise TypeError(f"SegNeXtKernelsHook: {name} must be a bool, got {value!r}")
        if nmf_grad not in _NMF_GRADS:
            raise ValueError(f"SegNeXtKernelsHook: nmf_grad must be one of {_NMF_GRADS}, "
                             f"got {nmf_grad!r}")
        self.backend = None if backend is None else backend.strip().lower()
        self.options = dict(msca=msca, mlp=mlp, nmf=nmf, nmf_grad=nmf_grad)
        self.replaced: List[Replacement] = []
        self.model_replaced: List[Replacement] = []
        self._previous_backend: Optional[str] = None

    def before_run(self, runner) -> None:
        if self.backend is not None:
            # set_backend raises, saying why, when the backend is not available here
            previous = get_backend()
            set_backend(self.backend)
            self._previous_backend = previous
        done = patch_model(runner.model, **self.options)
        self.model_replaced += done
        self.replaced += done
        for hook in runner.hooks:  # an EMA copy made before us (EMAHook given a higher priority)
            ema = getattr(hook, "ema_model", None)
            if isinstance(ema, nn.Module):
                self.replaced += patch(ema, **self.options)
        model = _unwrap(runner.model)
        message = (f"SegNeXtKernelsHook: swapped {len(done)} modules of "
                   f"{type(model).__name__} ({summary(done)}); {len(self.replaced)} in all this "
                   f"run, {_ours(model)} fused modules in the model; backend "
                   f"{get_backend()!r}")
        if _ours(model) == 0:
            runner.logger.warning(message + ": no MSCA, MSCAN Mlp or NMF2D of the official "
                                  "layout found, the model runs unchanged")
        else:
            runner.logger.info(message)

    def after_run(self, runner) -> None:
        if self._previous_backend is not None:
            set_backend(self._previous_backend)
            self._previous_backend = None

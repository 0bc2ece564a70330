"""Let mmseg import its models under mmcv-lite (mmcv without compiled ops).

mmseg 1.x imports ``mmcv.ops`` at import time (``point_sample`` in ``mmseg.utils`` and
``mmseg.models.utils``, ``sigmoid_focal_loss`` in the focal loss; a few heads in try blocks).
With mmcv-lite, ``import mmcv.ops`` fails (no ``mmcv._ext``), and so does ``import
mmseg.models``, although SegNeXt (MSCAN + LightHamHead) uses none of these ops. On a CPU machine
mmcv-lite is what installs: there are no mmcv wheels with ops for recent torch, and the mmcv
2.1.0 sdist does not build with setuptools >= 81.

``stub_mmcv_ops()`` puts a stand-in ``mmcv.ops`` module in ``sys.modules`` only when the real
one fails for that reason. Its ``point_sample`` and ``sigmoid_focal_loss`` raise when called;
any other name raises ``ModuleNotFoundError``, which is what mmseg's optional imports catch.
Nothing here runs on import: our tests and benchmark call it before importing mmseg.models.
"""
from __future__ import annotations

import sys
import types

STUB_MARK = "__segnext_kernels_stub__"


def _needs_compiled_ops(name: str):
    def unavailable(*args, **kwargs):
        raise NotImplementedError(
            f"mmcv.ops.{name} needs mmcv built with its compiled ops; this environment has "
            "mmcv-lite, whose mmcv.ops segnext_kernels.mmseg.mmcv_lite stubbed so that mmseg "
            "imports (SegNeXt does not use it)")
    unavailable.__name__ = name
    return unavailable


def _missing(name: str):
    if name.startswith("__"):
        raise AttributeError(name)  # importlib, pickle and hasattr probe dunders
    raise ModuleNotFoundError(f"mmcv.ops.{name} is not available: mmcv-lite has no compiled ops",
                              name=f"mmcv.ops.{name}")


def stub_mmcv_ops() -> bool:
    """Install the stand-in ``mmcv.ops`` if mmcv is mmcv-lite; True if it is (now) in place."""
    existing = sys.modules.get("mmcv.ops")
    if existing is not None:
        return bool(getattr(existing, STUB_MARK, False))
    try:
        import mmcv.ops  # noqa: F401  (full mmcv: nothing to do)
        return False
    except ModuleNotFoundError as e:
        if e.name != "mmcv._ext":
            if e.name == "mmcv":
                return False  # no mmcv at all: mmseg's own import error says so
            raise
    import mmcv

    stub = types.ModuleType("mmcv.ops", __doc__)
    setattr(stub, STUB_MARK, True)
    stub.point_sample = _needs_compiled_ops("point_sample")
    stub.sigmoid_focal_loss = _needs_compiled_ops("sigmoid_focal_loss")
    stub.__getattr__ = _missing
    sys.modules["mmcv.ops"] = stub
    mmcv.ops = stub
    return True

"""Helpers shared by the benchmark modules: op shapes, the variants of an op level, fused
backends per op, layouts, input rotation and the timed callables built on it, saved-activation
accounting."""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

from . import roofline
from .runner import Config, Variant

LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


# (embed dims, MLP ratios) of the MSCAN stages; S and B share theirs (they differ in depth).
_MSCAN_STAGES = {"t": ((32, 64, 160, 256), (8, 8, 4, 4)),
                 "s": ((64, 128, 320, 512), (8, 8, 4, 4)),
                 "b": ((64, 128, 320, 512), (8, 8, 4, 4))}


def segnext_stage_shapes(models: str = "tsb", image: int = 512) -> List[Tuple[int, int, int, int, int]]:
    """(B, C, H, W, mlp_ratio) of every MSCAN stage of ``models`` for a B1 ``image``² input."""
    out = []
    for m in models:
        dims, ratios = _MSCAN_STAGES[m]
        for i, (C, r) in enumerate(zip(dims, ratios)):
            side = image // (4 << i)
            if (1, C, side, side, r) not in out:
                out.append((1, C, side, side, r))
    return out


def stage_shapes(cfg: Config, quick: List[tuple], full: List[tuple]) -> List[tuple]:
    """(B, C, H, W, mlp_ratio) of MSCAN stages at 512x512 input for a level built on them:
    every stage of SegNeXt-T, -S and -B with ``--shapes segnext``; one tiny shape for the
    smoke size; MSCAN-B stages 1 and 3 at batch 16 on CUDA; else the level's own ``quick`` or
    ``full`` CPU shapes."""
    if cfg.op_shapes == "segnext":
        return segnext_stage_shapes()
    if cfg.size == "smoke":
        return [(1, 8, 16, 16, 4)]
    if cfg.cuda:
        return [(16, 64, 128, 128, 8), (16, 320, 32, 32, 4)]   # MSCAN-B stages 1 and 3
    return quick if cfg.size == "quick" else full


def primary_layout(cfg: Config) -> str:
    """The layout of the compile variants: channels_last, the faster eager layout on both
    cuDNN and oneDNN for these depthwise convs (docs/benchmarking.md#baselines)."""
    return "cl"


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=LAYOUTS[layout]) if t.dim() == 4 else t


def n_rotations(bytes_per_set: int, cfg: Config) -> int:
    """3 input sets (so consecutive calls do not find their inputs in cache) unless 3 sets
    would take a sizeable share of memory."""
    cap = (6 << 30) if cfg.cuda else (768 << 20)
    return 3 if 3 * bytes_per_set <= cap else 1


def cycle(sets: List[tuple]) -> Callable[[], tuple]:
    it = itertools.cycle(sets)
    return lambda: next(it)


def timed_op(fn: Callable, shape: Sequence[int], weights: List[torch.Tensor], cfg: Config,
             layout: str, backward: bool) -> Callable[[], object]:
    """``fn(x, *weights)`` as a timed callable on rotated random inputs ``x`` of ``shape`` (in
    the suite dtype and ``layout``): the forward without grad or (``backward``) the forward
    and the gradients of x and of the weights for a random output gradient."""
    nbytes = math.prod(shape) * roofline.elsize(cfg.dtype) * (2 if backward else 1)
    sets = []
    for _ in range(n_rotations(nbytes, cfg)):
        x = to_layout(torch.randn(shape, device=cfg.device, dtype=cfg.dtype), layout)
        if backward:
            g = to_layout(torch.randn(shape, device=cfg.device, dtype=cfg.dtype), layout)
            sets.append((x.requires_grad_(True), g))
        else:
            sets.append((x,))
    nxt = cycle(sets)
    if backward:
        def fwd_bwd():
            x, g = nxt()
            return torch.autograd.grad(fn(x, *weights), [x] + weights, g)
        return fwd_bwd

    def fwd():
        with torch.no_grad():
            return fn(nxt()[0], *weights)
    return fwd


def op_make(op: str, shape: Sequence[int], weights: Callable[[], List[torch.Tensor]],
            cfg: Config, backward: bool) -> Callable:
    """``make(layout, backend="reference", compiled=False)`` of the variants of an op level
    (``op_variants``): ``segnext_kernels.<op>_ref`` (through ``torch.compile`` when
    ``compiled``) or ``segnext_kernels.<op>`` on ``backend``, as ``timed_op`` on inputs of
    ``shape`` with the tensors ``weights()`` makes."""
    def make_for(layout, backend="reference", compiled=False):
        def make():
            import segnext_kernels as sk
            if backend == "reference":
                ref = getattr(sk, f"{op}_ref")
                fn = torch.compile(ref, dynamic=False) if compiled else ref
            else:
                public = getattr(sk, op)

                def fn(x, *w):
                    return public(x, *w, backend=backend)
            return timed_op(fn, shape, weights(), cfg, layout, backward)
        return make
    return make_for


def timed_inference(run: Callable, nxt: Callable[[], tuple], backend: str,
                    cfg: Config) -> Callable[[], object]:
    """``run`` on the first tensor of the next input set as a timed callable: without grad, on
    ``backend``, under the suite's autocast (the block, model and patch levels' inference)."""
    import segnext_kernels as sk

    def infer():
        x = nxt()[0]
        with torch.no_grad(), sk.use_backend(backend), autocast_ctx(cfg):
            return run(x)
    return infer


def fused_backends(op: str, cfg: Config) -> Tuple[List[Tuple[str, Optional[str]]], List[str]]:
    """The fused backends of ``op`` for the device: [(name, skip reason or None)], and notes.

    A backend with a kernel for the op that cannot run here is listed with its reason when it
    belongs to this device (e.g. ``cuda`` built without CUDA on a GPU machine); Triton under
    TRITON_INTERPRET=1 is skipped, since interpreter timings mean nothing.
    """
    import segnext_kernels as sk

    notes = []
    have = sk.op_backends().get(op, ("reference",))
    status = sk.available_backends()
    out: List[Tuple[str, Optional[str]]] = []
    for b in have:
        if b == "reference":
            continue
        if b == "triton":
            if cfg.interpret:
                out.append((b, "TRITON_INTERPRET=1 (interpreter timings are meaningless)"))
                continue
            if not cfg.cuda:
                continue  # Triton kernels run on CUDA tensors only
        elif b != cfg.device.type:
            continue
        st = status.get(b)
        out.append((b, None if (st and st.available) else f"unavailable: {st.reason if st else '?'}"))
    if not out:
        notes.append(f"{op}: no fused backend for {cfg.device.type} "
                     f"(backends with a kernel: {', '.join(have)})")
    return out, notes


def fused_variants(op: str, cfg: Config, layouts: Iterable[str], make_for: Callable,
                   graph: bool = True) -> Tuple[List[Variant], List[str]]:
    """One variant per fused backend of ``op`` and layout, and ``auto`` (what the op picks by
    itself) per layout; ``make_for(backend, layout)`` gives the variant's ``make``."""
    backends, notes = fused_backends(op, cfg)
    layouts = list(layouts)
    variants = []
    for b, skip in backends:
        for layout in layouts:
            variants.append(Variant(f"fused:{b}", layout, b, make=make_for(b, layout),
                                    skip=skip, graph=graph))
    if any(skip is None for _, skip in backends):
        for layout in layouts:
            variants.append(Variant("auto", layout, "auto", make=make_for("auto", layout),
                                    graph=graph))
    return variants, notes


def op_variants(op: str, cfg: Config, make: Callable,
                compiled: bool = True) -> Tuple[List[Variant], List[str]]:
    """The variants of an op level's case, and notes: the eager reference in NCHW and
    channels_last (the baselines), ``torch.compile`` of it in the primary layout (when
    ``compiled`` and the run compiles), and ``fused_variants`` of ``op`` in both layouts.
    ``make(layout, backend="reference", compiled=False)`` gives a variant's ``make``."""
    variants = [Variant("eager", layout, "reference", baseline=True, make=make(layout))
                for layout in ("nchw", "cl")]
    if compiled and cfg.compile:
        layout = primary_layout(cfg)
        variants.append(Variant("compile", layout, "reference", compiles=True,
                                make=make(layout, compiled=True)))
    fused, notes = fused_variants(op, cfg, ("nchw", "cl"),
                                  lambda backend, layout: make(layout, backend=backend))
    return variants + fused, notes


def model_fused_backends(cfg: Config) -> Tuple[List[Tuple[str, Optional[str]]], List[str]]:
    """Backends that fuse MSCA or NMF2D on this device (the model level runs each as a whole)."""
    seen, notes = {}, []
    for op in ("msca", "nmf2d"):
        bs, ns = fused_backends(op, cfg)
        notes += ns
        for b, skip in bs:
            seen.setdefault(b, skip)
    return list(seen.items()), notes


class SavedBytes:
    """Counts the bytes autograd saves for backward: distinct storages, parameters excluded."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = {self._key(t) for t in exclude}
        self.storages = {}

    @staticmethod
    def _key(t: torch.Tensor):
        s = t.untyped_storage()
        return (t.device.type, s.data_ptr())

    def pack(self, t: torch.Tensor):
        try:
            key = self._key(t)
            if key not in self.exclude:
                self.storages[key] = t.untyped_storage().nbytes()
        except Exception:  # noqa: BLE001 - tensors without storage (fake, nested) count nothing
            pass
        return t

    @staticmethod
    def unpack(t):
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    @property
    def total(self) -> int:
        return int(sum(self.storages.values()))


def autocast_ctx(cfg: Config):
    """Autocast in the suite dtype for the block and model levels (mixed precision as users
    train); a no-op for float32."""
    if cfg.dtype in (torch.float16, torch.bfloat16):
        # no weight-cast cache: CUDA-graph capture requires it off, and every variant gets the same
        return torch.autocast(cfg.device.type, dtype=cfg.dtype, cache_enabled=False)
    import contextlib
    return contextlib.nullcontext()


def amp_dtype_name(cfg: Config) -> str:
    return f"amp-{cfg.dtype_name}" if cfg.dtype in (torch.float16, torch.bfloat16) else cfg.dtype_name

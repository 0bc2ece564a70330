"""``msca(u, *weights)``: validate, pick the backend, run the fused op or the reference."""
from __future__ import annotations

import torch
from torch import Tensor

from .._validate import autocast_inputs, check_same, check_tensor, memory_format_of
from ..dispatch import Problem, layout_of, needs_grad, ran, select
from .reference import MSCAWeights, msca_ref, weight_shapes


def _check(u: Tensor, weights) -> None:
    check_tensor("u", u, dim=4)
    if len(weights) != 16:
        raise ValueError(f"msca expects 16 weight and bias tensors after u "
                         f"({', '.join(MSCAWeights._fields)}), got {len(weights)}")
    C = u.shape[1]
    for name, w, shape in zip(MSCAWeights._fields, weights, weight_shapes(C)):
        check_tensor(name, w)
        if tuple(w.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for u with {C} channels "
                             f"(u has shape {tuple(u.shape)}), got {tuple(w.shape)}")
    check_same("u", u, list(zip(MSCAWeights._fields, weights)))
    if u.numel() == 0:
        raise ValueError(f"u must not be empty, got shape {tuple(u.shape)}")


def msca(u: Tensor, *weights: Tensor, backend: str | None = None) -> Tensor:
    """Multi-scale convolutional attention, fused.

    ``u``: (B, C, H, W), float32/float16/bfloat16 (float64 on the reference and cpu backends),
    contiguous or channels_last. ``weights``: the 16 tensors of MSCAWeights (official shapes).
    Returns ``conv3(a + B7(a) + B11(a) + B21(a)) * u`` in ``u``'s dtype and memory format.
    ``backend`` overrides the selected one for this call (same rules as ``use_backend``).
    """
    check_tensor("u", u, dim=4)
    u, weights = autocast_inputs(u, weights)
    _check(u, weights)
    name = select(Problem("msca", u.device, u.dtype, layout_of(u), tuple(u.shape),
                          needs_grad(u, *weights)), backend)
    if name == "reference":
        ran("msca", "reference")
        return msca_ref(u, *weights)
    from ..ops import msca_fused
    u = u.contiguous(memory_format=memory_format_of(u))
    return msca_fused(u, [w.contiguous() for w in weights], name)



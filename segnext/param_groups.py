"""Optimizer parameter groups with the official paramwise rules (docs/model.md#training-recipe).

The official configs set AdamW(lr 6e-5, weight_decay 0.01) with ``custom_keys``
``{"pos_block": decay_mult 0, "norm": decay_mult 0, "head": lr_mult 10}``. As mmcv/mmengine's
optimizer constructor does, each key is looked for as a substring of the full parameter name,
keys are tried longest first (ties alphabetically) and the first match alone applies. So every
``decode_head.*`` parameter gets lr x10 and keeps its decay (its GN is named ``gn``), the
backbone's ``norm1/2``, ``patch_embed{2-4}.norm`` and ``norm{1-4}`` get no decay, and the stem BNs
(``patch_embed1.proj.1/4``), ``layer_scale_*`` and conv biases keep the decay.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple

from torch import nn

# key: (lr_mult, decay_mult), as in the official configs.
OFFICIAL_CUSTOM_KEYS: Dict[str, Dict[str, float]] = {
    "pos_block": dict(decay_mult=0.0),
    "norm": dict(decay_mult=0.0),
    "head": dict(lr_mult=10.0),
}


def _multipliers(name: str, sorted_keys: List[str],
                 custom_keys: Mapping[str, Mapping[str, float]]) -> Tuple[float, float]:
    for key in sorted_keys:
        if key in name:
            rule = custom_keys[key]
            return float(rule.get("lr_mult", 1.0)), float(rule.get("decay_mult", 1.0))
    return 1.0, 1.0


def param_groups(model: nn.Module, lr: float = 6e-5, weight_decay: float = 0.01,
                 custom_keys: Optional[Mapping[str, Mapping[str, float]]] = None) -> List[dict]:
    """Parameter groups for ``torch.optim.AdamW(param_groups(model), lr=lr)``.

    Parameters sharing (lr, weight_decay) form one group, in the order they first appear in
    ``model.named_parameters()``. Each group has ``params``, ``lr``, ``weight_decay`` and
    ``param_names`` (the names, for inspection). Frozen parameters (``requires_grad`` False)
    are left out. ``custom_keys`` replaces the official rules (same format:
    ``{substring: {"lr_mult": ..., "decay_mult": ...}}``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    rules = OFFICIAL_CUSTOM_KEYS if custom_keys is None else custom_keys
    if not isinstance(rules, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Mapping) and set(v) <= {"lr_mult", "decay_mult"}
            and all(isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m)
                    and m >= 0 for m in v.values()) for k, v in rules.items()):
        raise ValueError("custom_keys must map name substrings to {'lr_mult': x, "
                         f"'decay_mult': y}} with finite x, y >= 0, got {custom_keys!r}")
    sorted_keys = sorted(sorted(rules), key=len, reverse=True)  # longest first, ties a-z
    groups: Dict[Tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult, decay_mult = _multipliers(name, sorted_keys, rules)
        setting = (lr * lr_mult, weight_decay * decay_mult)
        group = groups.setdefault(setting, dict(params=[], param_names=[], lr=setting[0],
                                                weight_decay=setting[1]))
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())

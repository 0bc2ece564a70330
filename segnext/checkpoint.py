"""Loading official SegNeXt / MSCAN checkpoints (docs/model.md#checkpoint-keys).

Accepted, in any combination:
- a path (or file object) given to ``torch.load(map_location="cpu", weights_only=True)``, or an
  already loaded mapping;
- the weights at the top level or nested under ``state_dict`` (mmcv/mmengine) or ``model``;
- a ``module.`` prefix (a model saved inside DistributedDataParallel), stripped;
- both key families: the original release's ``mlp.dwconv.dwconv.*`` and mmseg's
  ``mlp.dwconv.*`` (mapped to the model's own names);
- full-model checkpoints (``backbone.*`` / ``decode_head.*``) and backbone-only (ImageNet MSCAN,
  no prefix) checkpoints.

Which module is loaded, and what ``strict`` checks:
- into a ``SegNeXt``: a full-model checkpoint is checked against the whole model; a backbone-only
  checkpoint (no key starts with ``backbone.`` or ``decode_head.``) is loaded into
  ``model.backbone`` and checked against the backbone only; the head keeps its initialisation
  and is not reported missing.
- into a bare ``MSCAN`` (or any module without ``backbone``/``decode_head``): a full-model
  checkpoint gives its ``backbone.*`` entries; its ``decode_head.*`` / ``auxiliary_head.*``
  entries are set aside (``ignored_keys``), not reported unexpected.

``strict=True`` (the default) raises ``CheckpointMismatchError`` naming every missing,
unexpected and shape-mismatched key, before anything is copied into the model. With
``strict=False`` the matching entries are loaded and the rest is reported in the returned
``LoadResult``. A missing BN ``num_batches_tracked`` (pre-1.0 PyTorch checkpoints) is not an
error: PyTorch sets it to 0.

Whatever ``strict`` says, a checkpoint that cannot be right is refused with a ``ValueError`` (or
``TypeError``) naming the entry, before anything is copied, so that the model is untouched:
a file that is not a PyTorch checkpoint (empty, text, damaged), wrappers nested more than
``MAX_NESTING`` deep or referring to themselves, two entries that land on the same model key,
and entries to be loaded that are not dense tensors with data (meta, sparse, quantized), are
complex, do not match the kind of the model's entry (a floating-point weight from an integer or
bool tensor) or hold NaN or infinity.

For command lines: ``error_summary`` puts any of these errors in one line, ``mismatch_summary``
a ``LoadResult``'s problems. ``segnext.checkpoint_model`` builds the model a checkpoint file
holds.
"""
from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Tuple

import torch
from torch import nn

FAMILIES = ("original", "mmseg")
HEAD_PREFIXES = ("decode_head.", "auxiliary_head.")
_WRAPPER_KEYS = ("state_dict", "model")
_DDP_PREFIX = "module."
# Wrapper levels followed to find the weights: {"state_dict": ...} (mmcv/mmengine) and
# {"model": ...}, possibly one inside the other; deeper nesting is not a checkpoint layout.
MAX_NESTING = 4
MAX_KEYS_SHOWN = 3  # keys of each kind named by mismatch_summary
Shape = Tuple[int, ...]

# The one key difference between the families (docs/model.md#key-families), anchored so that
# it also matches backbone-only keys such as "block1.0.mlp.dwconv.weight".
_MMSEG_DWCONV = re.compile(r"(^|\.)mlp\.dwconv\.(weight|bias)$")
_ORIGINAL_DWCONV = re.compile(r"(^|\.)mlp\.dwconv\.dwconv\.(weight|bias)$")


class CheckpointMismatchError(RuntimeError):
    """A strict load found missing, unexpected or shape-mismatched keys."""


@dataclass
class LoadResult:
    """What ``load_checkpoint`` did.

    ``target``: ``"model"`` or ``"backbone"`` (the module the entries went into). ``key_family``:
    the checkpoint's dwconv naming (``"original"``, ``"mmseg"``, or None if it has no MLP keys).
    ``mismatched_keys``: (key, checkpoint shape, model shape); those entries are not loaded.
    ``ignored_keys``: head entries set aside when loading a full checkpoint into a backbone.
    """
    target: str
    key_family: Optional[str]
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    mismatched_keys: List[Tuple[str, Shape, Shape]] = field(default_factory=list)
    ignored_keys: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model entry was loaded and every checkpoint entry was used."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)


def key_family(keys) -> Optional[str]:
    """``"original"``, ``"mmseg"`` or None (no MLP depthwise-conv key among ``keys``)."""
    keys = list(keys)
    if any(_ORIGINAL_DWCONV.search(k) for k in keys):
        return "original"
    if any(_MMSEG_DWCONV.search(k) for k in keys):
        return "mmseg"
    return None


def _rename(key: str, family: str) -> str:
    if family == "original":
        return _MMSEG_DWCONV.sub(r"\1mlp.dwconv.dwconv.\2", key)
    return _ORIGINAL_DWCONV.sub(r"\1mlp.dwconv.\2", key)


def convert_state_dict(state_dict: Mapping[str, Any],
                       family: str = "mmseg") -> "OrderedDict[str, Any]":
    """The same entries with the MLP depthwise-conv keys in ``family``'s naming:
    ``"original"`` (``mlp.dwconv.dwconv.*``) or ``"mmseg"`` (``mlp.dwconv.*``). Other keys and
    all values are kept as they are; works with and without the ``backbone.`` prefix."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    return OrderedDict((_rename(k, family), v) for k, v in state_dict.items())


def _detail_line(exc: BaseException):
    """The line of an exception's message that says the most: torch.load's weights-only
    refusal when there is one, else the first line (None for an empty message)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("WeightsUnpickler error")),
                lines[0] if lines else None)


def error_summary(exc: BaseException) -> str:
    """``Type: first line of the message``; for torch.load's weights-only refusal, the line
    that says what was refused."""
    detail = _detail_line(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _listed(keys: List[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    return shown + (", ..." if len(keys) > MAX_KEYS_SHOWN else "")


def mismatch_summary(result: LoadResult) -> str:
    """One line: how many keys are missing, unexpected and of another shape, with the first
    few of each."""
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing ({_listed(result.missing_keys)})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected "
                        f"({_listed(result.unexpected_keys)})")
    if result.mismatched_keys:
        shapes = [f"{k} {list(a)} vs {list(b)}" for k, a, b in result.mismatched_keys]
        problems.append(f"{len(shapes)} of another shape, checkpoint vs model "
                        f"({_listed(shapes)})")
    return "; ".join(problems)


def _describe(checkpoint) -> str:
    return str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else repr(checkpoint)


def read_checkpoint(checkpoint, weights_only: bool) -> Mapping:
    """The mapping a checkpoint path or file object holds (a mapping is returned as it is);
    a file that is not a PyTorch checkpoint raises a one-line ``ValueError`` naming it."""
    if isinstance(checkpoint, Mapping):
        return checkpoint
    if not isinstance(checkpoint, (str, os.PathLike)) and not hasattr(checkpoint, "read"):
        raise TypeError(f"checkpoint must be a path, a file object or a mapping of names to "
                        f"tensors, got {type(checkpoint).__name__}")
    name = _describe(checkpoint)
    try:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=weights_only)
    except OSError:
        raise  # missing file, a folder, no permission: the OS's message names the path
    except EOFError:
        raise ValueError(f"cannot read checkpoint {name}: the file is empty or cut short") from None
    except pickle.UnpicklingError as exc:
        detail = _detail_line(exc) or type(exc).__name__
        if weights_only and "Unsupported global" in detail:
            raise ValueError(
                f"torch.load(weights_only=True) refused {name}: it holds objects other than "
                f"tensors and plain containers (e.g. the meta or optimizer state of an mmengine "
                f"training checkpoint). If you trust the file, pass weights_only=False. "
                f"({detail})") from None
        raise ValueError(f"cannot read checkpoint {name}: not a PyTorch checkpoint, or a "
                         f"damaged one ({detail})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes torch.load raise
        raise ValueError(f"cannot read checkpoint {name}: not a PyTorch checkpoint, or a "
                         f"damaged one ({error_summary(exc)})") from None
    if not isinstance(loaded, Mapping):
        raise TypeError(f"{name} holds a {type(loaded).__name__}, expected a state_dict "
                        "(a mapping of names to tensors)")
    return loaded


def _unwrap(ckpt: Mapping) -> Mapping:
    """The weights of an mmcv/mmengine-style checkpoint (``{"state_dict": ..., "meta": ...}``)."""
    path, seen = [], {id(ckpt)}
    while True:
        key = next((k for k in _WRAPPER_KEYS if k in ckpt and isinstance(ckpt[k], Mapping)),
                   None)
        if key is None:
            return ckpt
        path.append(repr(key))
        inner = ckpt[key]
        if id(inner) in seen:
            raise ValueError(f"the checkpoint's container at [{']['.join(path)}] refers to "
                             "itself (or to a container around it); expected a state_dict")
        if len(path) > MAX_NESTING:
            raise ValueError(f"the checkpoint nests its weights more than {MAX_NESTING} levels "
                             f"deep ([{']['.join(path)}]...); expected a state_dict, possibly "
                             "under 'state_dict' or 'model'")
        seen.add(id(inner))
        ckpt = inner


def plain_state_dict(ckpt: Mapping) -> "OrderedDict[str, torch.Tensor]":
    """The weights of a read checkpoint: unwrapped, ``module.`` prefixes stripped, every entry
    checked to be a tensor under a string key."""
    state = OrderedDict()
    for key, value in _unwrap(ckpt).items():
        if not isinstance(key, str):
            raise TypeError(f"checkpoint keys must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor; "
                            "expected a state_dict (possibly under 'state_dict' or 'model')")
        name = key[len(_DDP_PREFIX):] if key.startswith(_DDP_PREFIX) else key
        if name in state:
            raise ValueError(f"checkpoint entries {name!r} and {_DDP_PREFIX + name!r} name the "
                             "same weight; expected one of them")
        state[name] = value
    return state


def _check_entry(key: str, value: torch.Tensor, expected: torch.Tensor) -> None:
    """Refuse an entry that cannot be copied into ``expected`` faithfully."""
    if value.is_meta or value.layout != torch.strided or value.is_quantized:
        what = "on the meta device (no data)" if value.is_meta else \
            f"a {'quantized' if value.is_quantized else str(value.layout)} tensor"
        raise ValueError(f"checkpoint entry {key!r} is {what}; expected a dense tensor "
                         "with data")
    if value.is_complex():
        raise TypeError(f"checkpoint entry {key!r} is complex ({value.dtype}); expected "
                        f"{expected.dtype} (a real tensor: the imaginary part would be lost)")
    if expected.is_floating_point() and not value.is_floating_point():
        raise TypeError(f"checkpoint entry {key!r} is {value.dtype}; expected a floating-point "
                        f"tensor ({expected.dtype})")
    if not expected.is_floating_point() and (value.is_floating_point() or
                                             value.dtype == torch.bool):
        raise TypeError(f"checkpoint entry {key!r} is {value.dtype}; expected an integer "
                        f"tensor ({expected.dtype})")


def _non_finite(entries: Mapping[str, torch.Tensor]) -> List[str]:
    return [k for k, v in entries.items()
            if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())]


def _select_target(model: nn.Module, state: "OrderedDict[str, torch.Tensor]"):
    """(module to load, its name, entries for it, entries set aside)."""
    is_full = any(k.startswith("backbone.") or k.startswith(HEAD_PREFIXES) for k in state)
    has_parts = isinstance(getattr(model, "backbone", None), nn.Module) and \
        isinstance(getattr(model, "decode_head", None), nn.Module)
    if has_parts:
        if is_full:
            return model, "model", state, []
        return model.backbone, "backbone", state, []
    if not is_full:
        return model, "model", state, []
    entries, ignored = OrderedDict(), []
    for key, value in state.items():
        if key.startswith("backbone."):
            name = key[len("backbone."):]
            if name in state:
                raise ValueError(f"checkpoint entries {name!r} and {key!r} name the same "
                                 "backbone weight; expected one of them")
            entries[name] = value
        elif key.startswith(HEAD_PREFIXES):
            ignored.append(key)
        else:
            entries[key] = value
    return model, "model", entries, ignored


def _list(title: str, items: List[str], limit: int = 40) -> str:
    shown = "\n".join(f"    {item}" for item in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _mismatch_message(result: LoadResult, target: nn.Module) -> str:
    parts = [f"checkpoint does not match {type(target).__name__} "
             f"(loading into {result.target}, checkpoint key family {result.key_family}):"]
    if result.missing_keys:
        parts.append(_list("missing in the checkpoint", result.missing_keys))
    if result.unexpected_keys:
        parts.append(_list("unexpected in the checkpoint", result.unexpected_keys))
    if result.mismatched_keys:
        parts.append(_list("shape mismatch (checkpoint vs model)",
                           [f"{k}: {list(a)} vs {list(b)}" for k, a, b in result.mismatched_keys]))
    parts.append("  (pass strict=False to load the matching entries and get this report back)")
    return "\n".join(parts)


def load_checkpoint(model: nn.Module, checkpoint, strict: bool = True, *,
                    weights_only: bool = True) -> LoadResult:
    """Load a SegNeXt or MSCAN checkpoint into ``model`` (a ``SegNeXt`` or an ``MSCAN``).

    ``checkpoint``: a path / file object (read with ``torch.load`` on the CPU, ``weights_only``
    by default) or a mapping. See the module docstring for the accepted layouts and for what
    ``strict`` checks. Returns a ``LoadResult``; with ``strict`` raises
    ``CheckpointMismatchError`` listing the offending keys, leaving the model untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, flag in (("strict", strict), ("weights_only", weights_only)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    state = plain_state_dict(read_checkpoint(checkpoint, weights_only))
    family = key_family(state)
    target, target_name, entries, ignored = _select_target(model, state)

    expected = target.state_dict()
    model_family = key_family(expected) or "original"
    renamed = convert_state_dict(entries, model_family)
    if len(renamed) < len(entries):
        seen = {}
        for key in entries:
            other = seen.setdefault(_rename(key, model_family), key)
            if other != key:
                raise ValueError(f"checkpoint entries {other!r} and {key!r} name the same "
                                 "weight (the original and mmseg key families mixed); expected "
                                 "one of them")
    entries = renamed

    result = LoadResult(target=target_name, key_family=family, ignored_keys=ignored)
    result.missing_keys = [k for k in expected
                           if k not in entries and not k.endswith("num_batches_tracked")]
    result.unexpected_keys = [k for k in entries if k not in expected]
    result.mismatched_keys = [(k, tuple(v.shape), tuple(expected[k].shape))
                              for k, v in entries.items()
                              if k in expected and v.shape != expected[k].shape]
    if strict and not result.ok:
        raise CheckpointMismatchError(_mismatch_message(result, target))

    mismatched = {k for k, _, _ in result.mismatched_keys}
    loadable = OrderedDict((k, v) for k, v in entries.items()
                           if k in expected and k not in mismatched)
    for key, value in loadable.items():
        _check_entry(key, value, expected[key])
    bad = _non_finite(loadable)
    if bad:
        raise ValueError(f"checkpoint entries hold NaN or infinity ({len(bad)}: "
                         f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); "
                         "the weights are broken (a diverged training?)")
    target.load_state_dict(loadable, strict=False)
    return result

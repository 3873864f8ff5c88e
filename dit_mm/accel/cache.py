"""Weights derived from parameters at inference, cached per weight version.

The executors reorder weights for their kernels, and the packed forward
folds norms into weights (:mod:`dit_mm.accel.folding`); :func:`prepared`
computes each once per weight version and keeps it outside the module.
Device independent. The model reaches it through the seam
(:func:`dit_mm.accel.prepared`), which bypasses it while acceleration is
off.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Optional, Tuple, TypeVar

import torch
import torch.nn as nn

T = TypeVar('T')

_PREPARED: weakref.WeakKeyDictionary[nn.Module, Dict[str, Tuple[tuple, object, tuple]]] = \
    weakref.WeakKeyDictionary()


def prepared(owner: nn.Module, key: str, fn: Callable[..., T],
             *params: Optional[torch.Tensor]) -> T:
    """``fn(*params)``, cached for ``owner`` while ``params`` are unchanged.

    For weights derived from parameters at inference (folded, transposed,
    reordered): computing them per call costs a pass over the weights, as
    much as the work they save on small maps. The cache is keyed on each
    tensor's storage address and version counter, so in-place updates
    (``load_state_dict``, optimiser steps) and replaced or moved tensors
    invalidate it; the entry holds the storages it was made from, so no new
    tensor can reuse their addresses while it stands. With autograd enabled
    nothing is cached, so gradients reach the parameters. The cache lives
    outside ``owner`` and dies with it.
    """
    if torch.is_grad_enabled():
        return fn(*params)
    stamp = tuple(None if p is None else (p.data_ptr(), p._version, p.dtype, p.device)
                  for p in params)
    cache = _PREPARED.setdefault(owner, {})
    hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]  # type: ignore[return-value]
    value = fn(*params)
    pinned = tuple(p.untyped_storage() for p in params if p is not None)
    cache[key] = (stamp, value, pinned)
    return value


def forget_prepared(module: nn.Module) -> None:
    """Drops the prepared weights of ``module`` and its submodules, for
    weight changes that bump no version counter and keep the storage:
    ``p.data.copy_(...)``, as mmengine's ``EMAHook`` swaps in the averaged
    weights before validation. The routed stages and the backbone call it
    on every ``train()`` / ``eval()``."""
    for m in module.modules():
        _PREPARED.pop(m, None)

"""The packed forward of a grid node as one C++ call (inference, CPU).

The packed node forward in Python (:mod:`.packed`) runs about 150 ATen ops
per block; on small maps each costs more in the interpreter and the Python
bindings than in its kernel, so small inputs cost far more than their FLOPs
(``docs/design.md``, "The stage as one C++ call").
``dit_mm/accel/cpu/csrc/packed_stage.cpp`` runs the same ops in the same
order from C++: same values (the tests compare it bit for bit with the
Python path), without the per-op overhead.

Its weights come from a *plan* built once per weight version: norm1's affine
folded into the query, SR conv and kv weights (as the Python path folds
them), every GEMM weight also reordered for oneDNN, the depthwise taps
transposed. A plan is rebuilt when a parameter changes (in place, or its
storage), a module or parameter is assigned, the stage is cast or moved, or
it switches ``train()`` / ``eval()`` (see :func:`_plan` for what is not
detected). Stages that the program does not cover (no fused attention,
another norm or activation, a non-3x3 depthwise conv) get no plan and keep
the Python path.

``DIT_MM_NO_NATIVE=1`` (or ``RoutedStage.native = False``) turns it off.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.modules.module as _nn_module

from ..folding import fold_conv, fold_linear, foldable, fusable
from . import onednn, sparse_ops

#: Tensors per block in the parameter list of ``packed_stage`` (C++ ``kParams``).
BLOCK_PARAMS = ('q_weight', 'q_packed', 'q_bias', 'sr_packed', 'sr_bias',
                'sr_norm_weight', 'sr_norm_bias', 'kv_weight', 'kv_packed', 'kv_bias',
                'proj_weight', 'proj_packed', 'proj_bias', 'norm2_weight', 'norm2_bias',
                'fc1_weight', 'fc1_packed', 'fc1_bias', 'dw_taps', 'dw_bias',
                'fc2_weight', 'fc2_packed', 'fc2_bias')

Plan = Tuple[List[Optional[torch.Tensor]], List[int], List[float]]


@dataclass
class _Entry:
    generation: int  # of _GENERATION when last checked in full
    ids: List[object]  # the stage's module tree
    switches: List[object]  # timm's fused_attn per block
    stamp: List[int]  # data pointer and version of every parameter
    params: List[torch.Tensor]  # the parameters (their storages stay pinned)
    versions: List[int]  # their versions
    plan: Optional[Plan]


_PLANS: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()

#: Bumped whenever a module or parameter is assigned anywhere (torch's global
#: registration hooks) and by :func:`forget`: until it moves, a plan is
#: checked by its parameters' versions only (the full check walks the
#: module tree, a measurable part of a small forward; ``docs/design.md``,
#: "The stage as one C++ call").
_GENERATION = [0]


def _bump(*_args) -> None:
    _GENERATION[0] += 1


_nn_module.register_module_module_registration_hook(_bump)
_nn_module.register_module_parameter_registration_hook(_bump)


def forget(stage: nn.Module) -> None:
    """Drops the plan of ``stage`` (see :func:`dit_mm.accel.cache.forget_prepared`)."""
    _PLANS.pop(stage, None)
    _bump()


def native_applies(stage: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`packed_forward` may run ``stage`` on ``x``: float32
    CPU inference where the reordered oneDNN ops and the extension exist,
    not turned off."""
    return (getattr(stage, 'native', True) and os.environ.get('DIT_MM_NO_NATIVE') != '1'
            and onednn.packed_applies(x) and sparse_ops.inference_kernel_applies(x))


def packed_forward(stage: nn.Module, x: torch.Tensor, hw: Tuple[int, int],
                   idx: torch.Tensor) -> Optional[torch.Tensor]:
    """The packed forward of ``stage`` in C++, or ``None`` where the stage
    has no plan (then the caller runs the Python path).

    Args:
        stage: A :class:`dit_mm.models.blocks.RoutedStage`.
        x: Tokens ``(B, N, C)``.
        hw: Map size ``(H, W)``.
        idx: Sorted flat positions of the kept tokens in ``(B * N)``.

    Returns:
        ``(B, N, C)``: kept tokens updated, skipped tokens unchanged.
    """
    plan = _plan(stage)
    if plan is None:
        return None
    params, ints, eps = plan
    return sparse_ops._extension().packed_stage(x.contiguous(), idx, hw[0], hw[1],
                                                params, ints, eps)


def _plan(stage: nn.Module) -> Optional[Plan]:
    """The plan of ``stage``, rebuilt when a parameter or submodule changed.

    Detected: in-place updates (version counters: optimiser steps,
    ``load_state_dict``), assigned modules and parameters, moves and casts
    (``_apply``), and ``train()`` / ``eval()`` (which drop the plan, for
    ``p.data.copy_``, mmengine's ``EMAHook`` swap). Not detected: writing
    through ``p.data`` of a model left in eval mode; call :func:`forget`
    then. Other settings of existing modules are read when the plan is
    built, except timm's ``fused_attn`` switch, which is checked.
    """
    hit = _PLANS.get(stage)
    switches = [getattr(blk.attn, 'fused_attn', None) for blk in stage.blocks]
    if hit is not None and hit.generation == _GENERATION[0] and hit.switches == switches \
            and [p._version for p in hit.params] == hit.versions:
        return hit.plan
    modules: List[Optional[nn.Module]] = [stage]
    stamp: List[int] = []
    params: List[torch.Tensor] = []
    for m in modules:  # breadth first; the list grows as it is walked
        if m is None:
            continue
        modules.extend(m._modules.values())
        for p in m._parameters.values():
            if p is not None:
                params.append(p)
                stamp += (p.data_ptr(), p._version)
    ids: List[object] = list(map(id, modules))
    if hit is not None and hit.ids == ids and hit.stamp == stamp and hit.switches == switches:
        plan = hit.plan
    else:
        with torch.no_grad():
            plan = _build(stage)
    _PLANS[stage] = _Entry(_GENERATION[0], ids, switches, stamp, params, stamp[1::2], plan)
    return plan


def _build(stage: nn.Module) -> Optional[Plan]:
    """Folded and reordered weights of every block, or ``None`` if a block is
    not what the C++ program computes."""
    blocks = list(stage.blocks)
    eps = blocks[0].norm1.eps
    if not (_layer_norm(stage.norm, stage.dim) and all(
            foldable(b, eps) and fusable(b.mlp) and _layer_norm(b.norm2, stage.dim)
            and getattr(b.attn, 'fused_attn', False) for b in blocks)):
        return None
    pack = onednn._pack_linear
    params: List[Optional[torch.Tensor]] = []
    ints: List[int] = []
    epss: List[float] = []
    for blk in blocks:
        attn, n1, mlp = blk.attn, blk.norm1, blk.mlp
        qw, qb = fold_linear(attn.q.weight, attn.q.bias, n1.weight, n1.bias)
        params += [qw, pack(qw), qb]
        if attn.sr is not None:
            if not (_layer_norm(attn.norm, stage.dim) and onednn._conv_packable(attn.sr)):
                return None
            sw, sb = fold_conv(attn.sr.weight, attn.sr.bias, n1.weight, n1.bias)
            kw, kb = attn.kv.weight, attn.kv.bias
            params += [onednn._pack_conv(sw, attn.sr), sb, attn.norm.weight, attn.norm.bias]
            ints += [attn.num_heads, *attn.sr.stride]
            epss += [n1.eps, attn.norm.eps]
        else:
            kw, kb = fold_linear(attn.kv.weight, attn.kv.bias, n1.weight, n1.bias)
            params += [None, None, None, None]
            ints += [attn.num_heads, 0, 0]
            epss += [n1.eps, 0.0]
        params += [kw, pack(kw), kb]
        params += [attn.proj.weight, pack(attn.proj.weight), attn.proj.bias,
                   blk.norm2.weight, blk.norm2.bias]
        taps, dw_bias = sparse_ops._taps(mlp.dwconv.weight, mlp.dwconv.bias)
        params += [mlp.fc1.weight, pack(mlp.fc1.weight), mlp.fc1.bias, taps, dw_bias,
                   mlp.fc2.weight, pack(mlp.fc2.weight), mlp.fc2.bias]
        epss.append(blk.norm2.eps)
    params += [stage.norm.weight, stage.norm.bias]
    ints += [onednn.PLAIN_MACS, onednn.PLAIN_WEIGHT]
    epss.append(stage.norm.eps)
    assert len(params) == len(BLOCK_PARAMS) * len(blocks) + 2, 'plan layout != BLOCK_PARAMS'
    # plain tensors on the same storage: the binding converts an
    # nn.Parameter several times slower than a tensor
    return [None if p is None else p.detach() for p in params], ints, epss


def _layer_norm(norm: nn.Module, dim: int) -> bool:
    """A LayerNorm over the last ``dim`` channels with weight and bias."""
    return (isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (dim,)
            and norm.elementwise_affine and norm.bias is not None)

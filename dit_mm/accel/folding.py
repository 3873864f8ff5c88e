"""Norm folding, and the PVTv2 block shapes the fast paths cover.

Plain PyTorch, on any device. The CPU executor's packed node forward
(:mod:`dit_mm.accel.cpu.packed`) folds each block's ``norm1``
affine into the weights that read it (query, SR conv or kv linear) where
:func:`foldable` says it can; the CPU stage program
(:mod:`dit_mm.accel.cpu.native_stage`) builds its plan from the same folds
and covers only blocks that are :func:`foldable` with a :func:`fusable` MLP.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn


def exact_gelu(act: nn.Module) -> bool:
    """Whether ``act`` is the exact (erf) GELU."""
    return isinstance(act, nn.GELU) and act.approximate == 'none'


def foldable(blk: nn.Module, eps: float) -> bool:
    """Whether ``blk.norm1`` is a channel LayerNorm with affine weights and
    ``eps`` whose affine part the packed forward
    (:func:`dit_mm.accel.cpu.packed._keys_values_folded`) can fold into the
    spatial reduction (a padding-free conv) or the kv linear."""
    norm, sr = blk.norm1, blk.attn.sr
    return (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine
            and norm.bias is not None and norm.eps == eps
            and getattr(blk.attn, 'pool', None) is None
            and (sr is None or (sr.padding == (0, 0) and sr.dilation == (1, 1)
                                and sr.groups == 1 and sr.padding_mode == 'zeros')))


def fold_conv(w: torch.Tensor, b: Optional[torch.Tensor], gamma: torch.Tensor,
              beta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``conv(x * gamma + beta) == conv'(x)`` for a padding-free conv."""
    bias = (w * beta.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    return w * gamma.view(1, -1, 1, 1), bias if b is None else bias + b


def fold_linear(w: torch.Tensor, b: Optional[torch.Tensor], gamma: torch.Tensor,
                beta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``linear(x * gamma + beta) == linear'(x)``."""
    return w * gamma, w @ beta if b is None else torch.addmv(b, w, beta)


def fusable(mlp: nn.Module) -> bool:
    """PVTv2's MLP as the sparse kernel
    (:func:`dit_mm.accel.cpu.sparse_ops.sparse_dwconv_gelu`) computes it (no extra ReLU,
    exact GELU, 3x3 depthwise conv)."""
    return (isinstance(mlp.relu, nn.Identity) and exact_gelu(mlp.act)
            and mlp.dwconv.kernel_size == (3, 3)
            and mlp.dwconv.groups == mlp.dwconv.in_channels)

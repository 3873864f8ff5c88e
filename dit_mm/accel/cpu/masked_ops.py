"""Kernels of the masked training path (:meth:`RoutedStage.forward_masked`).

The masked path computes a grid node on every token and holds the skipped
ones at their input. Its node output is ``x0 + g * (norm(x) - x0)`` per
token (paper eq. 4), where ``x`` is the last block's output, which equals
the node input ``x0`` at the held tokens. Written as PyTorch ops, that is a
``LayerNorm`` and a ``lerp``: forward and backward, five passes over the
map, and a gradient for ``x0`` that autograd adds into the other gradients
of the node input (one more pass). In a training step of DiT-b2 at 512²
batch 2 these passes cost 4-5 % of the step, more than the ops timed
alone, because the maps they read are cold by then (``docs/design.md``,
"Training").

:func:`held_norm` is one C++ pass each way (the kernels are in
``csrc/sparse_kernels.cpp``, the same build as :mod:`.sparse_ops`):

* forward: ``LayerNorm`` at kept rows, ``x0`` copied at held rows;
* backward: the ``LayerNorm`` backward at kept rows; at held rows the
  incoming gradient itself, returned as the gradient of ``x`` (whose
  residual chain passes it on to ``x0`` unchanged, so ``x0`` needs no
  gradient of its own); the gate gradient ``sum_c g * (norm(x) - x0)`` at
  every row; the affine gradients from kept rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from .. import reference
from . import onednn
from .sparse_ops import _extension, kernel_applies


def held_norm_applies(norm: nn.Module, x: torch.Tensor, x0: torch.Tensor,
                      mask: torch.Tensor) -> bool:
    """Whether :func:`held_norm` runs its kernel: under autograd, for
    float32 CPU tensors, an affine ``LayerNorm`` over the last dim, and a
    float32 ``(B, N)`` mask for ``(B, N, C)`` maps."""
    return (torch.is_grad_enabled() and kernel_applies(x) and isinstance(norm, nn.LayerNorm)
            and norm.weight is not None and norm.bias is not None
            and tuple(norm.normalized_shape) == (x.shape[-1],)
            and x0.dtype == mask.dtype == torch.float32 and x0.shape == x.shape
            and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]))


def held_norm(norm: nn.Module, x: torch.Tensor, x0: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """``x0 + mask * (norm(x) - x0)`` for a 0/1 ``mask (B, N)`` that may
    carry a straight-through gradient, where ``x (B, N, C)`` equals ``x0``
    at the rows where ``mask`` is 0 and passes its gradient there on to
    ``x0`` unchanged (see the module docstring); else
    :func:`dit_mm.accel.reference.held_norm`."""
    if not held_norm_applies(norm, x, x0, mask):
        return reference.held_norm(norm, x, x0, mask)
    return _HeldNorm.apply(x, x0, mask, norm.weight, norm.bias, norm.eps)


class _HeldNorm(torch.autograd.Function):
    """:func:`held_norm` with its forward and backward in C++."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        x, x0 = x.contiguous(), x0.contiguous()
        keep = mask.detach().reshape(-1).contiguous()
        w, b = weight.detach().contiguous(), bias.detach().contiguous()
        out, mean, rstd = _extension().held_norm_forward(x, x0, keep, w, b, eps)
        ctx.save_for_backward(x, x0, keep, mean, rstd, w, b)
        ctx.mask_shape = mask.shape
        return out

    @staticmethod
    @once_differentiable  # the C++ backward is not itself differentiable
    def backward(ctx, g: torch.Tensor):
        x, x0, keep, mean, rstd, w, b = ctx.saved_tensors
        mask_grad = ctx.needs_input_grad[2]
        chunks = max(1, min(keep.numel(), 4 * torch.get_num_threads()))
        gx, gm, gwb = _extension().held_norm_backward(g.contiguous(), x, x0, keep, mean, rstd,
                                                      w, b, mask_grad, chunks)
        gmask: Optional[torch.Tensor] = gm.view(ctx.mask_shape) if mask_grad else None
        gw = gwb[0] if ctx.needs_input_grad[3] else None
        gb = gwb[1] if ctx.needs_input_grad[4] else None
        return gx if ctx.needs_input_grad[0] else None, None, gmask, gw, gb, None


def masked_linear(fc: nn.Linear, x: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """``fc(x) * hard`` for a 0/1 mask ``hard (B, N, 1)``, with the mask on the
    narrow input instead of the wide output: the bias rides on the mask as
    one more input channel, ``[x * hard, hard] @ [W, b]^T``, exactly zero
    where ``hard == 0``. For the MLP's fc1 (8x wider output at strides 4 and
    8) this saves a pass over the hidden map forward and backward (about a
    quarter of fc1's time; ``docs/design.md``, "Training"). Where the weight
    is as large as the activations (fewer rows than 4x the input channels:
    the stride-32 node), joining it to its bias at every call costs more,
    and the output is masked instead."""
    if fc.bias is None:
        return onednn.linear(x * hard, fc.weight)
    if x.numel() < 4 * x.shape[-1] ** 2:
        return onednn.linear_module(fc, x) * hard
    joined = _MaskedJoin.apply(x, hard)
    return onednn.linear(joined, torch.cat([fc.weight, fc.bias.unsqueeze(1)], dim=1))


class _MaskedJoin(torch.autograd.Function):
    """``cat([x * hard, hard], -1)`` for a detached 0/1 mask ``hard``, written
    in one pass (the product and the concatenation were two)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hard)
        out = x.new_empty(*x.shape[:-1], x.shape[-1] + 1)
        torch.mul(x, hard, out=out[..., :-1])
        out[..., -1:] = hard
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hard, = ctx.saved_tensors
        return grad[..., :-1] * hard, None

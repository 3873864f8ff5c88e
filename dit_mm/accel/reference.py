"""The plain-PyTorch reference of every operation the seam dispatches.

:mod:`dit_mm.accel` runs these where no executor takes the input (another
device or dtype, or acceleration switched off), and the executors fall back
to them for inputs they do not cover. An executor must give the same values
(bit for bit where it runs the same ATen ops, within float rounding where it
reorders the arithmetic); ``tests/test_accel.py`` checks the CPU executor
against them through the whole model.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``."""
    return F.linear(x, weight, bias)


def conv2d(conv: nn.Conv2d, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None, gelu: bool = False) -> torch.Tensor:
    """``conv(x)``, or the same convolution with ``weight`` / ``bias`` in
    place of the module's; ``gelu=True`` applies the exact GELU after it."""
    if weight is None:
        weight, bias = conv.weight, conv.bias
    if weight is conv.weight:
        y = conv(x)
    else:
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return F.gelu(y) if gelu else y


def masked_linear(fc: nn.Linear, x: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """``fc(x) * hard`` for a 0/1 mask ``hard (B, N, 1)``: the masked path's
    fc1, zero at held tokens."""
    return F.linear(x, fc.weight, fc.bias) * hard


def write_rows(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.index_copy_(0, idx, src)``: rows ``src (K, C)`` into
    ``dst (N, C)`` at the distinct rows ``idx``. Returns ``dst``."""
    return dst.index_copy_(0, idx, src)


def neighbour_table(idx: torch.Tensor, batch: int, hw: Tuple[int, int]) -> torch.Tensor:
    """Packed-row indices ``(K, 9)`` of the 3x3 neighbours of the kept tokens
    at the sorted flat positions ``idx`` of a ``(batch, H, W)`` map: row-major
    taps ``(dy, dx)`` in ``{-1, 0, 1}^2``, ``-1`` where the neighbour is
    skipped or outside the image (any device; the C++ version is one call
    instead of ~60 small ops)."""
    H, W = hw
    n = H * W
    packed = torch.full((batch * n,), -1, dtype=torch.long, device=idx.device)
    packed[idx] = torch.arange(idx.numel(), device=idx.device)
    b, rest = idx // n, idx % n
    y, x = rest // W, rest % W
    taps = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            yy, xx = y + dy, x + dx
            inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            flat = b * n + yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)
            taps.append(torch.where(inside, packed[flat], torch.full_like(flat, -1)))
    return torch.stack(taps, dim=1).contiguous()


def sparse_dwconv_gelu(h: torch.Tensor, nbr: torch.Tensor, conv: nn.Conv2d,
                       gelu: bool = True, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``GELU(dwconv3x3(hidden))`` at the kept tokens: the depthwise conv
    ``conv`` on a map that holds the packed rows ``h (K, C)`` at the kept
    positions and zeros elsewhere, read through the neighbour table ``nbr``
    (:func:`neighbour_table`). ``out`` is accepted for the executors'
    signature and ignored. The CPU executor's packed path runs it where
    its kernel does not apply (:mod:`dit_mm.accel.cpu.packed`)."""
    C = h.shape[1]
    taps = conv.weight.reshape(C, 9).t()
    rows = torch.cat([h, h.new_zeros(1, C)])  # row -1: the zero row
    y = sum(rows[nbr[:, t]] * taps[t] for t in range(9))
    if conv.bias is not None:
        y = y + conv.bias
    return F.gelu(y) if gelu else y


def held_norm(norm: nn.Module, x: torch.Tensor, x0: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """``x0 + mask * (norm(x) - x0)`` per token for a 0/1 ``mask (B, N)``,
    as one ``lerp`` in the promoted dtype (exactly ``norm(x)`` where
    ``mask == 1`` and ``x0`` where it is 0): the masked training path's
    node output, ``x`` its last block's output (equal to ``x0`` where the
    mask is 0)."""
    y = norm(x)
    dtype = torch.promote_types(x0.dtype, y.dtype)
    return torch.lerp(x0.to(dtype), y.to(dtype), mask.unsqueeze(-1).to(dtype))

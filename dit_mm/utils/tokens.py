"""Token-map helpers that the model and its executors both use (plain PyTorch)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def tokens_to_map(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """Tokens ``(B, N, C)`` -> ``(B, C, H, W)`` as a channels-last view.

    timm's ``x.transpose(1, 2).view(B, C, H, W)`` has the same strides, but
    at batch 1 oneDNN does not recognise it as channels-last, and its
    depthwise conv ran 15x slower (at 56x56x512; ``docs/design.md``,
    "Memory layout").
    """
    B, N, C = x.shape
    return x.contiguous().view(B, hw[0], hw[1], C).permute(0, 3, 1, 2)


def map_to_tokens(y: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> tokens ``(B, H*W, C)`` (a view for channels-last maps)."""
    return y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, y.shape[1])


def blend(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x + mask * (y - x)`` per token (paper eq. 4) for a 0/1 ``mask (B, N)``
    that may carry a straight-through gradient (it receives
    ``sum_c g * (y - x)``), as one ``lerp``: exactly ``y`` where
    ``mask == 1`` and ``x`` where it is 0, in the promoted dtype."""
    dtype = torch.promote_types(x.dtype, y.dtype)
    return torch.lerp(x.to(dtype), y.to(dtype), mask.unsqueeze(-1).to(dtype))


def sdpa(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         dropout: float = 0.0) -> torch.Tensor:
    """Attention with timm's choice of fused or explicit kernel (the explicit
    one is what FLOP counters can read)."""
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return F.dropout(a, dropout) @ v


def dropout(drop: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``drop(x)`` where it can change ``x`` (training with a dropout rate);
    no call otherwise."""
    return drop(x) if drop.training and getattr(drop, 'p', 0.0) else x

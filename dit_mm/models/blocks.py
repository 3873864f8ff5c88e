"""A grid node: PVTv2 blocks that run on the tokens its row gate keeps.

A :class:`RoutedStage` holds timm's PVTv2 ``Block`` modules (so its weights
have timm's / the official PVTv2 layout) and the stage-end ``LayerNorm``. It
computes ``y = g * B(x) + (1 - g) * x`` per token (paper eq. 4), in one of
four forwards that give the same values for the same hard gate ``g``:

* :meth:`RoutedStage.forward_dense`: every token (PVTv2 itself);
* :meth:`RoutedStage.forward_masked`: training, and traced exports of the
  dense form; every token is computed, skipped ones are held at their input
  value and hidden from the depthwise conv, and the straight-through
  gradient of ``g`` gets ``B(x) - x`` at every token;
* :meth:`RoutedStage.forward_sparse`: eager inference, and training with
  ``sparse_training``; only the kept tokens go through the blocks. This is
  the node as the unit of execution: an executor may run it
  (:func:`dit_mm.accel.run_node`; on the CPU a C++ program or a packed path
  with training tricks, :mod:`dit_mm.accel.cpu.packed`), and otherwise the
  kept tokens of each image run as slots (:mod:`.slots`);
* :meth:`RoutedStage.forward_slots`: static shapes (export, compile, CUDA
  graphs); a fixed number of slots per image (:mod:`.slots`).

Semantics of a skipped token inside the node (shared by all four): it
keeps its input value; keys/values come from the spatially reduced *full*
map (skipped tokens included, at their input value), and the MLP's 3x3
depthwise conv sees zeros at skipped positions, like its own zero padding
at the border.

The dense and masked forwards are written out here; their GEMMs and convs
go through :mod:`dit_mm.accel` (``linear_module``, ``conv2d``,
``masked_linear``, ``held_norm``), which runs each as plain PyTorch or on an
executor with the same values.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from timm.models.pvt_v2 import Block

from ..accel import conv2d, forget, held_norm, masked_linear, run_node
from ..accel import linear_module as _linear
from ..utils.tokens import blend, map_to_tokens, sdpa, tokens_to_map
from .slots import kept_slots, run_slots

__all__ = ['RoutedStage', 'blend', 'tokens_to_map', 'map_to_tokens', 'DENSE_ABOVE_ACCELERATOR']

#: Off the CPU, :meth:`RoutedStage.forward_sparse` computes densely (the
#: masked forward, same values) when more than this fraction of a node's
#: tokens is kept and autograd is off. Set from H200 runs of the earlier
#: per-image packed path (``benchmarks/check_cuda.py``; ``docs/benchmarks.md``,
#: "The eager packed path on an H200"), where packing won at half kept or
#: less and the dense route at three quarters.
DENSE_ABOVE_ACCELERATOR = 0.6


class RoutedStage(nn.Module):
    """PVTv2 blocks of one grid node, with dense, masked, sparse and slot forwards.

    Args:
        dim: Channels.
        depth: Number of PVTv2 blocks.
        num_heads: Attention heads.
        sr_ratio: Spatial-reduction ratio of the attention keys/values.
        mlp_ratio: Hidden ratio of the MLP.
        drop_path: Stochastic-depth rate per block.
        qkv_bias: Bias in the query/key/value projections.
        drop: Dropout rate after the attention projection and in the MLP
            (timm's ``proj_drop``, mmdet's ``drop_rate``).
        attn_drop: Dropout rate of the attention weights.
        with_cp: Activation checkpointing (mmdet's name and semantics): each
            block's activations are recomputed in the backward instead of
            kept, when its input requires grad; in the masked and the sparse
            training paths. Values and gradients are unchanged (dropout and
            drop path replay the same random draws).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, sr_ratio: int,
                 mlp_ratio: float, drop_path: Sequence[float] = (),
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 with_cp: bool = False) -> None:
        super().__init__()
        rates = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList([
            Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, sr_ratio=sr_ratio,
                  qkv_bias=qkv_bias, proj_drop=drop, attn_drop=attn_drop, drop_path=rates[k])
            for k in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.dim = dim
        self.with_cp = bool(with_cp)
        self.dense_above_accelerator = DENSE_ABOVE_ACCELERATOR
        #: read by the CPU executor: ``False`` turns its C++ stage program off
        #: for this node (:mod:`dit_mm.accel.cpu.native_stage`)
        self.native = True

    def train(self, mode: bool = True) -> RoutedStage:
        # weights may have been swapped without a version bump in between
        # (p.data.copy_: mmengine's EMAHook before validation)
        forget(self)
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        # moves and casts replace parameter data
        out = super()._apply(*args, **kwargs)
        forget(self)
        return out

    def _maybe_checkpoint(self, fn, *args):
        """``fn(*args)``, checkpointed with ``with_cp`` when a tensor
        argument requires grad (the block's activations are recomputed in
        the backward)."""
        if self.with_cp and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return cp.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # ------------------------------------------------------------------ dense
    def forward_dense(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """All tokens through all blocks: ``(B, N, C) -> (B, N, C)``."""
        out = run_node(self, x, hw)
        if out is not None:
            return out
        for blk in self.blocks:
            x = self._maybe_checkpoint(_block, blk, x, hw)
        return self.norm(x)

    # ----------------------------------------------------------------- masked
    def forward_masked(self, x: torch.Tensor, hw: Tuple[int, int],
                       mask: torch.Tensor) -> torch.Tensor:
        """Dense compute with the per-token gate ``mask (B, N)``.

        ``mask`` holds hard 0/1 values and may carry a straight-through
        gradient; the gradient it receives is ``B(x) - x`` per token.
        """
        hard = mask.detach().to(x.dtype).unsqueeze(-1)
        x0 = x
        h = x

        def held_block(blk: nn.Module, h: torch.Tensor) -> torch.Tensor:
            return _block(blk, h, hw, hard)  # skipped tokens stay at x0

        for blk in self.blocks:
            h = self._maybe_checkpoint(held_block, blk, h)
        # blend(x0, self.norm(h), mask): h is x0 at the held tokens
        return held_norm(self.norm, h, x0, mask)

    # ----------------------------------------------------------------- sparse
    def forward_sparse(self, x: torch.Tensor, hw: Tuple[int, int],
                       keep: torch.Tensor, gate: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
        """The blocks on the kept tokens only (inference, and training with
        ``sparse_training``).

        An executor runs the node where one takes ``x``
        (:func:`dit_mm.accel.run_node`). Otherwise the kept tokens of each
        image fill slots (as many as the image that keeps most; the others
        pad with skipped tokens, computed and dropped) and run through
        :func:`dit_mm.models.slots.run_slots`; off the CPU, without autograd,
        above ``self.dense_above_accelerator`` kept, the masked forward runs
        instead (the same values).

        Args:
            x: Tokens ``(B, N, C)``.
            hw: Map size ``(H, W)`` with ``H * W == N``.
            keep: Boolean ``(B, N)``; images may keep different numbers of
                tokens, including none or all.
            gate: Sparse training: the hard 0/1 gate ``(B, N)`` behind
                ``keep``, with its straight-through gradient. The output is
                then the blend ``x + gate * (B(x) - x)`` (:func:`blend`).

        Returns:
            ``(B, N, C)``: kept tokens updated, skipped tokens unchanged.
        """
        out = run_node(self, x, hw, keep, gate)
        if out is not None:
            return out
        B, N, C = x.shape
        counts = keep.sum(dim=1)
        most = int(counts.max())  # eager: the slot count follows the data
        if most == 0:
            return x
        if most == N and int(counts.min()) == N:
            out = self.forward_dense(x, hw)
        elif (x.device.type != 'cpu' and not torch.is_grad_enabled()
              and int(counts.sum()) > self.dense_above_accelerator * B * N):
            return self.forward_masked(x, hw, keep.to(x.dtype))
        else:
            slots, valid = kept_slots(keep, most)
            out = run_slots(self.blocks, self.norm, x, hw, slots, valid,
                            checkpoint=self._maybe_checkpoint, dwconv='map')
        return out if gate is None else blend(x, out, gate)

    # ------------------------------------------------------------------ slots
    def forward_slots(self, x: torch.Tensor, hw: Tuple[int, int], slots: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
        """Static-shape path (:mod:`dit_mm.models.slots`): the blocks on
        ``slots (B, S)`` token slots per image, whose outputs are written
        back where ``valid (B, S)``. Plain PyTorch on every device."""
        return run_slots(self.blocks, self.norm, x, hw, slots, valid)


def _block(blk: nn.Module, x: torch.Tensor, hw: Tuple[int, int],
           hard: Optional[torch.Tensor] = None) -> torch.Tensor:
    """timm's PVTv2 ``Block`` on all tokens. With a 0/1 mask ``hard (B, N, 1)``
    the tokens where it is 0 are held: both residual branches are added
    times ``hard`` (one ``addcmul`` each, exactly ``x`` there and exactly the
    block's value elsewhere), and the MLP's hidden map is zero there before
    the depthwise conv."""
    if hard is None:
        x = x + blk.drop_path1(_attention(blk.attn, blk.norm1(x), hw))
        return x + blk.drop_path2(_mlp(blk.mlp, blk.norm2(x), hw))
    # Held tokens' residual input only reaches the MLP through its masked
    # fc1, so it does not matter that it skips the attention update.
    x = torch.addcmul(x, hard, blk.drop_path1(_attention(blk.attn, blk.norm1(x), hw)))
    return torch.addcmul(x, hard, blk.drop_path2(_mlp(blk.mlp, blk.norm2(x), hw, hard)))


def _keys_values(attn: nn.Module, x: torch.Tensor, hw: Tuple[int, int]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(B, heads, Nk, hd)`` from the (normed) full map."""
    B = x.shape[0]
    if attn.sr is not None:
        x = attn.norm(map_to_tokens(conv2d(attn.sr, tokens_to_map(x, hw))))
    kv = _linear(attn.kv, x).reshape(B, -1, 2, attn.num_heads, attn.head_dim)
    return kv.permute(2, 0, 3, 1, 4).unbind(0)


def _attention(attn: nn.Module, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """timm's PVTv2 spatial-reduction attention on all tokens ``(B, N, C)``."""
    B, N, C = x.shape
    q = _linear(attn.q, x).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = _keys_values(attn, x, hw)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = sdpa(attn, q, k, v, dropout).transpose(1, 2).reshape(B, N, C)
    return attn.proj_drop(_linear(attn.proj, out))


def _mlp(mlp: nn.Module, x: torch.Tensor, hw: Tuple[int, int],
         hard: Optional[torch.Tensor] = None) -> torch.Tensor:
    """timm's ``MlpWithDepthwiseConv``, with the hidden map zero where
    ``hard`` is 0 (see :func:`_block`)."""
    h = _linear(mlp.fc1, x) if hard is None else masked_linear(mlp.fc1, x, hard)
    m = mlp.relu(tokens_to_map(h, hw))
    if isinstance(mlp.act, nn.GELU) and mlp.act.approximate == 'none':
        h = map_to_tokens(conv2d(mlp.dwconv, m, gelu=True))  # an executor may fuse it
    else:
        h = mlp.act(map_to_tokens(conv2d(mlp.dwconv, m)))
    return mlp.drop(_linear(mlp.fc2, mlp.drop(h)))

"""Sparse-aware PVTv2 stages: the row edge ``B[i][j]`` of a grid node.

A :class:`RoutedStage` holds timm's PVTv2 ``Block`` modules (so its weights
have timm's / the official PVTv2 layout) and the stage-end ``LayerNorm``. It
computes ``y = g * B(x) + (1 - g) * x`` per token (paper eq. 4), in one of
three ways that give the same values for the same hard gate ``g``:

* :meth:`RoutedStage.forward_dense`: every token (PVTv2 itself);
* :meth:`RoutedStage.forward_masked`: training; dense compute, skipped tokens
  are held at their input value and hidden to the depthwise conv, and the
  straight-through gradient of ``g`` gets ``B(x) - x`` at every token;
* :meth:`RoutedStage.forward_sparse`: inference, and training with
  ``sparse_training``; the kept tokens of all images are packed into one
  ``(K, C)`` matrix, and only they go through the token-wise layers (query,
  attention, projection, MLP linears, norms) and, where an executor has the
  kernel, the MLP's depthwise conv (with its backward in training). At
  float32 CPU inference the whole packed stage runs as one C++ call
  (:mod:`dit_mm.accel.cpu.native_stage`, same ops and values); elsewhere, in
  Python.

The GEMMs, convolutions, row writes, the sparse depthwise kernel, prepared
and folded weights and the C++ stage program are reached through
:mod:`dit_mm.accel` only, which runs each op on an executor or as its
plain-PyTorch reference (``F.linear``, the module's conv, ``index_copy_``,
no folding: ``DIT_MM_ACCEL=0``). Read with acceleration off, every branch
below that asks the seam (``native_applies``, ``kernel_applies``,
``foldable``) takes its plain path.

Semantics of a skipped token inside the stage (shared by all three paths):
it keeps its input value; keys/values come from the spatially reduced *full*
map (skipped tokens included), and the MLP's 3x3 depthwise conv sees zeros at
skipped positions, like its own zero padding at the border.
"""
from __future__ import annotations

from functools import partial
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.models.pvt_v2 import Block

from ..accel import (
    bucket_rows,
    conv2d,
    exact_gelu,
    fold_conv,
    fold_linear,
    foldable,
    forget_prepared,
    forget_stage,
    fusable,
    held_norm,
    kernel_applies,
    linear,
    native_applies,
    neighbour_table,
    packed_forward,
    prepared,
    recording,
    sparse_dwconv_gelu,
    write_rows,
)
from ..accel import linear_module as _linear
from ..utils.profiling import scope
from .slots import run_slots

#: The token-wise layers of the packed path: their row count is the number
#: of kept tokens, which changes at every training step (see ``rows_vary``
#: in :func:`dit_mm.accel.linear`).
_linear_packed = partial(_linear, rows_vary=True)

#: Without the C++ stage program (:mod:`dit_mm.accel.cpu.native_stage`),
#: :meth:`RoutedStage.forward_sparse` computes densely (with skipped tokens
#: held, same values) when more than this fraction of a node's tokens is kept.
#: Whole DiT-b2, packed / held at r = 0.85 and 0.92 kept: 0.92 / 0.96 at 224²
#: batch 1, 0.90 / 0.98 at 512² batch 1, 0.93 / 1.01 at 224² batch 4. The
#: program packs at any fraction: at 0.92 kept it took 77 / 296 / 461 ms
#: packed against 87 / 310 / 491 ms held (224² b1, 224² b4, 512² b1).
DENSE_ABOVE = 0.9

#: The same threshold off the CPU, where the packed path has no kernels of
#: its own (a per-image attention loop, a dense depthwise conv on a
#: zero-filled map, a host sync per node). DiT-b2 on H200s (torch 2.11,
#: benchmarks/check_cuda.py, 2-4 runs per input), ms at r = 1 and, dense
#: route / packed, at r = 0.75 / 0.5 / 0.25: 1024² batch 8: 253-254;
#: 269-277 / 273-283 / 278-287 and 265-275 / 210-217 / 153-163. 512² batch
#: 32: 189-190; 214-227 / 218-226 / 223-235 and 234-241 / 195-205 / 156-169.
#: 1024² batch 2: 72; 79 / 80 / 81 and 78 / 64 / 50. 512² batch 4: 33;
#: 40-43 / 41-44 / 42-44 and 44-49 / 40-46 / 36-45. Packing wins at half
#: kept or less, the dense route at three quarters.
DENSE_ABOVE_ACCELERATOR = 0.6


class RoutedStage(nn.Module):
    """PVTv2 blocks of one grid node, with dense, masked and packed forwards.

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
        self.dense_above = DENSE_ABOVE
        self.dense_above_accelerator = DENSE_ABOVE_ACCELERATOR
        #: run the packed path as one C++ call where it applies
        #: (:mod:`dit_mm.accel.cpu.native_stage`)
        self.native = True

    def train(self, mode: bool = True) -> RoutedStage:
        # weights may have been swapped without a version bump in between
        # (p.data.copy_: mmengine's EMAHook before validation)
        forget_prepared(self)
        forget_stage(self)
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        # moves and casts replace parameter data
        out = super()._apply(*args, **kwargs)
        forget_stage(self)
        return out

    # ------------------------------------------------------------------ dense
    def forward_dense(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """All tokens through all blocks: ``(B, N, C) -> (B, N, C)``; at
        float32 CPU inference through the C++ stage program (same values up
        to float rounding: folded norms, the depthwise kernel)."""
        if native_applies(self, x):  # the C++ program with every token kept
            out = packed_forward(self, x, hw, torch.arange(x.shape[0] * x.shape[1]))
            if out is not None:
                return out
        for blk in self.blocks:
            x = self._maybe_checkpoint(_block, blk, x, hw)
        return self.norm(x)

    # ----------------------------------------------------------------- masked
    def forward_masked(self, x: torch.Tensor, hw: Tuple[int, int],
                       mask: torch.Tensor) -> torch.Tensor:
        """Training path: dense compute with per-token gate ``mask (B, N)``.

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

    def _maybe_checkpoint(self, fn, *args):
        """``fn(*args)``, checkpointed with ``with_cp`` when a tensor
        argument requires grad (the block's activations are recomputed in
        the backward)."""
        if self.with_cp and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return cp.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _forward_held(self, x: torch.Tensor, hw: Tuple[int, int],
                      skipped: torch.Tensor) -> torch.Tensor:
        """Inference: dense blocks, with the flat token rows ``skipped`` put
        back to their input after every block and zeroed in every hidden map
        (in place: costs only the skipped rows). Equals
        :meth:`forward_masked` for the same gate."""
        B, N, C = x.shape
        held = x.reshape(B * N, C).index_select(0, skipped)
        h = x
        for blk in self.blocks:
            h = _block(blk, h, hw, skipped=skipped)
            write_rows(h.view(B * N, C), skipped, held)
        h = self.norm(h)
        write_rows(h.view(B * N, C), skipped, held)
        return h

    # ------------------------------------------------------------------ slots
    def forward_slots(self, x: torch.Tensor, hw: Tuple[int, int], slots: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
        """Static-shape path (:mod:`dit_mm.models.slots`): the blocks on
        ``slots (B, S)`` token slots per image, whose outputs are written
        back where ``valid (B, S)``. Plain PyTorch on every device."""
        return run_slots(self.blocks, self.norm, x, hw, slots, valid)

    # ----------------------------------------------------------------- sparse
    def forward_sparse(self, x: torch.Tensor, hw: Tuple[int, int],
                       keep: torch.Tensor, gate: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
        """Packed path (inference, and training with ``sparse_training``):
        computes only the kept tokens. Float32 CPU inference runs the C++
        stage program (:mod:`dit_mm.accel.cpu.native_stage`);
        elsewhere, with autograd off, the Python path computes densely (with
        the same values) when more than ``self.dense_above`` of the tokens
        are kept, or ``self.dense_above_accelerator`` off the CPU.

        Args:
            x: Tokens ``(B, N, C)``.
            hw: Map size ``(H, W)`` with ``H * W == N``.
            keep: Boolean ``(B, N)``; images may keep different numbers of
                tokens, including none or all.
            gate: Sparse training: the hard 0/1 gate ``(B, N)`` behind
                ``keep``, with its straight-through gradient. The output is
                then the blend ``x + gate * (B(x) - x)`` (:func:`blend`),
                computed at the kept rows only: the gate's gradient
                ``sum_c g * (B(x) - x)`` is zero at the others.

        Returns:
            ``(B, N, C)``: kept tokens updated, skipped tokens unchanged.
        """
        B, N, C = x.shape
        with scope('dit::gather'):
            idx = keep.reshape(-1).nonzero().squeeze(1)  # sorted: images are contiguous
        if idx.numel() == 0:
            return x
        if native_applies(self, x):  # the same ops from C++ (dit_mm.accel.cpu.native_stage);
            out = packed_forward(self, x, hw, idx)  # packs at any kept fraction
            if out is not None:
                return out if gate is None else blend(x, out, gate)
        if idx.numel() == B * N:
            out = self.forward_dense(x, hw)
            return out if gate is None else blend(x, out, gate)
        dense_above = self.dense_above if x.device.type == 'cpu' else self.dense_above_accelerator
        if idx.numel() > dense_above * B * N and not torch.is_grad_enabled():
            # packing pays off below ~90 % kept (benchmarks/bench_backbone.py);
            # above, dense compute with held tokens gives the same values
            return self._forward_held(x, hw, (~keep).reshape(-1).nonzero().squeeze(1))
        return self._forward_packed(x, hw, keep, idx, gate)

    def _forward_packed(self, x: torch.Tensor, hw: Tuple[int, int], keep: torch.Tensor,
                        idx: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
        """The Python packed path of :meth:`forward_sparse` for the kept flat
        rows ``idx`` (at least one). The keys and values, the map-wise part,
        are computed for the images that keep tokens only: an image that keeps
        none is its input, whatever its keys. In sparse training a closed
        grid node often keeps a token or two of one image of the batch (the
        Gumbel noise), and then paid the map-wise part of every image."""
        B, N, C = x.shape
        base = x.reshape(B * N, C)
        K = idx.numel()
        # the depthwise conv + GELU at the kept tokens only (dit_mm.accel.cpu.sparse_ops),
        # else a dense conv on a hidden map that holds kept rows only (no padding)
        mlp_kernel = kernel_applies(x) and all(fusable(blk.mlp) for blk in self.blocks)
        with scope('dit::gather'):
            active = keep.any(dim=1)
            if B > 1 and not bool(active.all()):
                imgs = active.nonzero().squeeze(1)
                x, keep = x.index_select(0, imgs), keep.index_select(0, imgs)
                local = keep.reshape(-1).nonzero().squeeze(1)  # the same rows, in order
            else:
                local = idx
            layout = _row_layout(keep.sum(dim=1).tolist(), mlp_kernel, x)
            # padding rows: copies of the first (front) and last (tail) kept row
            src = idx if not (layout.front or layout.tail) else torch.cat(
                [idx[:1].expand(layout.front), idx, idx[-1:].expand(layout.tail)])
            t0 = base.index_select(0, src)
        h = self._packed_rows(x, hw, keep, local, t0, mlp_kernel, layout)
        kept_in = t0[layout.front:layout.front + K]
        if gate is None:
            t = self.norm(h)
        else:  # blend(kept_in, self.norm(h), g) with g = 1 at these rows: exactly norm(h)
            g = gate.reshape(1, -1).index_select(1, idx)
            t = held_norm(self.norm, h.unsqueeze(0), kept_in.unsqueeze(0), g).squeeze(0)
        with scope('dit::scatter'):  # _write_rows copies under autograd, else writes in place
            out = base if torch.is_grad_enabled() else base.clone(
                memory_format=torch.contiguous_format)
            return _write_rows(out, idx, t).view(B, N, C)

    def _packed_rows(self, x: torch.Tensor, hw: Tuple[int, int], keep: torch.Tensor,
                     idx: torch.Tensor, t: torch.Tensor, mlp_kernel: bool,
                     layout: RowLayout) -> torch.Tensor:
        """The last block's output ``(K, C)`` (before the stage's norm) at
        the kept flat rows ``idx`` of ``x (B, N, C)``, whose input rows are
        ``t[layout.front:layout.front + K]``; ``mlp_kernel``: the MLP's
        depthwise conv runs at the kept rows.

        The other rows of ``t`` are padding (:func:`_row_layout`): they go
        through the token-wise layers as queries of the first or the last
        image and read nothing else; no kept row reads them (the depthwise
        conv's neighbour table and the key/value map hold kept rows only),
        and their outputs are dropped, so they get zero gradients and add
        nothing to the weights' gradients."""
        B, N, C = x.shape
        K = idx.numel()
        front = layout.front
        with scope('dit::gather'):
            padded = None if layout.stride else _padded_rows(layout.counts, x.device)
            base = x.reshape(B * N, C)
        if mlp_kernel:  # differentiable under autograd
            with scope('dit::gather'):
                nbr = neighbour_table(idx, B, hw)
                if front:  # the kept rows' neighbours move down with them
                    nbr = torch.where(nbr >= 0, nbr + front, nbr)
                if front or layout.tail:  # no neighbours, and no kept row's neighbour
                    nbr = torch.cat([nbr.new_full((front, nbr.shape[1]), -1), nbr,
                                     nbr.new_full((layout.tail, nbr.shape[1]), -1)])
            # one output buffer for every block at inference (autograd keeps each block's)
            hidden = None if torch.is_grad_enabled() else t.new_empty(
                t.shape[0], self.blocks[0].mlp.fc1.out_features)
            mlp = partial(_mlp_packed_kernel, nbr=nbr, hidden=hidden)
        else:
            # dense depthwise conv on a hidden map that is zero at skipped
            # positions; every block writes the same rows, so it is zeroed once
            buffer = x.new_zeros(B * N, self.blocks[0].mlp.fc1.out_features)
            mlp = partial(_mlp_packed, hw=hw, idx=idx, buffer=buffer)
        # Keys/values read the whole map, whose skipped rows never change in
        # the stage: normalise them once and update only the kept rows per
        # block. At inference, and under autograd where the kept tokens touch
        # few of the SR conv's patches (the map is then never rewritten: see
        # _replace_touched), each block's norm1 affine is folded into its SR
        # conv / kv and query weights. Under autograd, where they touch many,
        # each block's map is its kept rows through norm1 interleaved with
        # the skipped rows' normalised input times norm1's affine
        # (_interleave_rows): one pass, no chain of whole-map copies, and no
        # fold, whose backward cost more than the affine of the held rows
        # (forward and backward, per block: the stride-16 SR conv's fold 1.03
        # ms, the held rows' affine at 84 % kept 0.07 ms; whole sparse step
        # at mu = 0.86, 512² batch 2, per route over static, paired: 1.073 ->
        # 1.058 and 1.084 -> 1.063).
        eps = self.blocks[0].norm1.eps
        touched, touched_rows, skipped = None, None, None
        if all(foldable(blk, eps) for blk in self.blocks):
            normalise = partial(_normalise, unit=(x.new_ones(C), x.new_zeros(C)), eps=eps)
            if torch.is_grad_enabled():
                with scope('dit::gather'):
                    touched = _touched_patches(idx, B, hw, self.blocks[0].attn.sr)
            if touched is None and torch.is_grad_enabled():
                with scope('dit::gather'):
                    skipped = (~keep).reshape(-1).nonzero().squeeze(1)
                normed = normalise(base.index_select(0, skipped))  # the held rows only
            else:
                normed = normalise(base)
                if touched is not None:  # the touched patches' tokens of the input map
                    touched_rows = normed.index_select(0, touched.rows)
        else:
            normed = None
        def packed_block(blk: nn.Module, t: torch.Tensor, normed: Optional[torch.Tensor]
                         ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
            if skipped is not None:  # norm1 at the kept rows, its affine at the held ones
                t_n = blk.norm1(t)
                held = torch.addcmul(blk.norm1.bias, normed, blk.norm1.weight)
                with scope('dit::scatter'):
                    full = _interleave_rows(t_n[front:front + K], idx, held, skipped)
                q = _linear_packed(blk.attn.q, t_n)
                k, v = _keys_values(blk.attn, full.view(B, N, C), hw)
            elif normed is not None:
                t_hat = normalise(t)
                rows = t_hat[front:front + K]
                full = normed
                if touched is None:
                    with scope('dit::scatter'):
                        normed = full = _write_rows(normed, idx, rows)
                kept = None if touched is None else (touched, touched_rows, rows)
                q = _query_folded(blk.attn, blk.norm1, t_hat)
                k, v = _keys_values_folded(blk.attn, blk.norm1, full.view(B, N, C), hw, kept)
            else:
                with scope('dit::scatter'):
                    full = base.index_copy(0, idx, t[front:front + K]).view(B, N, C)
                q = _linear_packed(blk.attn.q, blk.norm1(t))
                k, v = _keys_values(blk.attn, blk.norm1(full), hw)
            t = t + _attention_packed(blk.attn, q, k, v, layout.counts, padded, layout.stride)
            return t + mlp(blk.mlp, blk.norm2(t)), normed

        for blk in self.blocks:
            t, normed = self._maybe_checkpoint(packed_block, blk, t, normed)
        return t[front:front + K]


def tokens_to_map(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """Tokens ``(B, N, C)`` -> ``(B, C, H, W)`` as a channels-last view.

    timm's ``x.transpose(1, 2).view(B, C, H, W)`` has the same strides, but
    at batch 1 oneDNN does not recognise it as channels-last and its
    depthwise conv ran 15x slower here (1.0 vs 14.7 ms at 56x56x512).
    """
    B, N, C = x.shape
    return x.contiguous().view(B, hw[0], hw[1], C).permute(0, 3, 1, 2)


def map_to_tokens(y: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> tokens ``(B, H*W, C)`` (a view for channels-last maps)."""
    return y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, y.shape[1])


def _block(blk: nn.Module, x: torch.Tensor, hw: Tuple[int, int],
           hard: Optional[torch.Tensor] = None,
           skipped: Optional[torch.Tensor] = None) -> torch.Tensor:
    """timm's PVTv2 ``Block`` on all tokens. With a 0/1 mask ``hard (B, N, 1)``
    (training) the tokens where it is 0 are held: both residual branches are
    added times ``hard`` (one ``addcmul`` each, exactly ``x`` there and
    exactly the block's value elsewhere), and the MLP's hidden map is zeroed
    there before the depthwise conv. With the flat token rows ``skipped``
    (inference) only the hidden map is zeroed, in place; the caller holds
    the rows."""
    if hard is None:
        x = x + blk.drop_path1(_attention(blk.attn, blk.norm1(x), hw))
        return x + blk.drop_path2(_mlp(blk.mlp, blk.norm2(x), hw, skipped=skipped))
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
    kv = _linear(attn.kv, x).reshape(B, -1, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return kv.unbind(0)


def _attention(attn: nn.Module, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """timm's PVTv2 spatial-reduction attention on all tokens ``(B, N, C)``."""
    B, N, C = x.shape
    q = _linear(attn.q, x).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = _keys_values(attn, x, hw)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = _sdpa(attn, q, k, v, dropout).transpose(1, 2).reshape(B, N, C)
    return attn.proj_drop(_linear(attn.proj, out))


def _mlp(mlp: nn.Module, x: torch.Tensor, hw: Tuple[int, int],
         hard: Optional[torch.Tensor] = None,
         skipped: Optional[torch.Tensor] = None) -> torch.Tensor:
    """timm's ``MlpWithDepthwiseConv``, optionally with a zeroed hidden map
    (see :func:`_block`)."""
    h = _linear(mlp.fc1, x) if hard is None else _masked_linear(mlp.fc1, x, hard)
    if skipped is not None:
        h.view(-1, h.shape[-1]).index_fill_(0, skipped, 0.0)
    m = mlp.relu(tokens_to_map(h, hw))
    if exact_gelu(mlp.act):  # fused into the conv at inference
        h = map_to_tokens(conv2d(mlp.dwconv, m, gelu=True))
    else:
        h = mlp.act(map_to_tokens(conv2d(mlp.dwconv, m)))
    return mlp.drop(_linear(mlp.fc2, mlp.drop(h)))


def blend(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x + mask * (y - x)`` per token for a 0/1 ``mask (B, N)`` that may
    carry a straight-through gradient (it receives ``sum_c g * (y - x)``),
    as one ``lerp``: exactly ``y`` where ``mask == 1`` and ``x`` where it is
    0, in the promoted dtype of ``x`` and ``y`` (at 2 x 16384 x 64, forward
    and backward took 4.6 ms against 6.2 ms for the three separate ops)."""
    dtype = torch.promote_types(x.dtype, y.dtype)
    return torch.lerp(x.to(dtype), y.to(dtype), mask.unsqueeze(-1).to(dtype))


class TouchedPatches(NamedTuple):
    """The SR conv's patches that hold kept tokens (:func:`_touched_patches`).

    Attributes:
        ids: Their flat positions ``b * Hs * Ws + py * Ws + px`` in the
            reduced map, sorted.
        rows: The flat token rows of every such patch, patch by patch in
            ``(dy, dx)`` order: ``(P * s * s,)``.
        slots: Where each kept token that lies in a patch sits in ``rows``.
        inside: The packed rows of those kept tokens, or ``None`` when every
            kept token lies in a patch (the SR conv drops a border of
            ``H % s`` rows and ``W % s`` columns).
    """
    ids: torch.Tensor
    rows: torch.Tensor
    slots: torch.Tensor
    inside: Optional[torch.Tensor]


#: Sparse training computes a node's keys and values from the stage input's
#: normalised map plus its touched SR patches (:func:`_replace_touched`)
#: when at most this fraction of the patches holds kept tokens.
PATCH_KV_UP_TO = 0.25


def _touched_patches(idx: torch.Tensor, batch: int, hw: Tuple[int, int],
                     sr: Optional[nn.Module]) -> Optional[TouchedPatches]:
    """The patches of the SR conv ``sr`` (a padding-free conv whose kernel
    is its stride) that hold the kept flat token rows ``idx``, or ``None``
    when there is no such conv or more than :data:`PATCH_KV_UP_TO` of the
    patches hold kept tokens."""
    if not isinstance(sr, nn.Conv2d) or sr.kernel_size != sr.stride \
            or sr.kernel_size[0] != sr.kernel_size[1]:
        return None
    s = sr.stride[0]
    H, W = hw
    Hs, Ws = H // s, W // s
    if idx.numel() > PATCH_KV_UP_TO * batch * Hs * Ws * s * s:  # a patch holds <= s * s
        return None
    n = H * W
    b, r = idx // n, idx % n
    yy, xx = r // W, r % W
    inside = (yy < Hs * s) & (xx < Ws * s)
    if not bool(inside.all()):
        sel = inside.nonzero().squeeze(1)
        b, yy, xx = b[sel], yy[sel], xx[sel]
    else:
        sel = None
    pid = b * (Hs * Ws) + (yy // s) * Ws + xx // s
    ids = torch.unique(pid)  # sorted
    if ids.numel() > PATCH_KV_UP_TO * batch * Hs * Ws:
        return None
    pb, pr = ids // (Hs * Ws), ids % (Hs * Ws)
    d = torch.arange(s, device=idx.device)
    corner = pb * n + (pr // Ws) * s * W + (pr % Ws) * s
    rows = (corner.view(-1, 1, 1) + d.view(1, s, 1) * W + d.view(1, 1, s)).reshape(-1)
    slots = torch.searchsorted(ids, pid) * (s * s) + (yy % s) * s + xx % s
    return TouchedPatches(ids, rows, slots, sel)


def _replace_touched(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     patches: TouchedPatches, rows: torch.Tensor,
                     t_hat: torch.Tensor) -> torch.Tensor:
    """The SR conv's output tokens ``y (B, Hs * Ws, C_out)`` of a map, with
    the outputs of the ``patches`` that hold kept tokens recomputed for the
    kept rows ``t_hat``: one GEMM over those patches' tokens (``rows``, with
    the kept ones replaced). The conv's kernel is its stride, so no other
    output reads a kept token, and the map itself is never rewritten: under
    autograd every block's rewritten map is a copy of the whole map, forward
    and backward, whatever few tokens the node keeps. With the blend at the
    kept rows, a whole sparse-training step of DiT-b2 at mu = 0.86 (512²
    batch 2) went from 1.064 to 0.988 x a static step."""
    c_out = y.shape[-1]
    kept = t_hat if patches.inside is None else t_hat.index_select(0, patches.inside)
    vec = rows.index_copy(0, patches.slots, kept).view(patches.ids.numel(), weight[0].numel())
    y_touched = linear(vec, weight.permute(0, 2, 3, 1).reshape(c_out, -1), bias, rows_vary=True)
    return y.reshape(-1, c_out).index_copy(0, patches.ids, y_touched.to(y.dtype)).view_as(y)


def _masked_linear(fc: nn.Linear, x: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """``fc(x) * hard`` for a 0/1 mask ``hard (B, N, 1)``, with the mask
    applied to the narrow input instead of the wide output: the bias rides
    on the mask as one more input channel, ``[x * hard, hard] @ [W, b]^T``,
    which is exactly zero where ``hard == 0``. For the MLP's fc1 (8x wider
    output at strides 4 and 8) this saves a pass over the hidden map in the
    forward and in the backward: fc1 and mask, forward and backward, at
    2x16384x64 -> 512 took 27.6 instead of 36.6 ms (26.0 -> 20.3 at
    2x4096x128 -> 1024). Where the weight is as large as the activations
    (fewer rows than 4x the input channels: the stride-32 node), joining
    it to its bias at every call costs more than the wide pass, so the
    output is masked instead (fc1 and mask, forward and backward, at
    512x512 -> 2048: 14.6 instead of 17.1 ms). A recorded forward (trace,
    export) always joins: a choice by row count would become a guard on the
    input size of the exported graph."""
    if fc.bias is None:
        return linear(x * hard, fc.weight)
    if not recording() and x.numel() < 4 * x.shape[-1] ** 2:
        return _linear(fc, x) * hard
    joined = torch.cat([x * hard, hard], dim=-1) if recording() else _MaskedJoin.apply(x, hard)
    return linear(joined, torch.cat([fc.weight, fc.bias.unsqueeze(1)], dim=1))


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


class _InterleaveRows(torch.autograd.Function):
    """``out[idx] = a, out[jdx] = b`` for complementary row sets: one write
    of the map forward, one gather per input backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, idx: torch.Tensor, b: torch.Tensor,
                jdx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx, jdx)
        out = a.new_empty(idx.numel() + jdx.numel(), a.shape[1])
        write_rows(out, idx, a)
        return write_rows(out, jdx, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        idx, jdx = ctx.saved_tensors
        ga = grad.index_select(0, idx) if ctx.needs_input_grad[0] else None
        gb = grad.index_select(0, jdx) if ctx.needs_input_grad[2] else None
        return ga, None, gb, None


def _interleave_rows(a: torch.Tensor, idx: torch.Tensor, b: torch.Tensor,
                     jdx: torch.Tensor) -> torch.Tensor:
    """The ``(len(idx) + len(jdx), C)`` map with rows ``a`` at ``idx`` and
    ``b`` at ``jdx`` (complementary, distinct rows), differentiable in both.
    Sparse training builds each block's key/value input map this way from
    the kept rows and the skipped rows of the stage input. It replaced a
    copy of the whole map per block, whose backward passed a whole-map
    gradient back through every earlier block's copy."""
    return _InterleaveRows.apply(a, idx, b, jdx)


def _write_rows(buffer: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``buffer`` with ``rows`` at ``idx``: in place without autograd, else a
    copy (autograd keeps every block's version)."""
    if torch.is_grad_enabled():
        return buffer.index_copy(0, idx, rows)
    return write_rows(buffer, idx, rows)


def _keys_values_folded(attn: nn.Module, norm1: nn.LayerNorm, x_hat: torch.Tensor,
                        hw: Tuple[int, int],
                        kept: Optional[Tuple[TouchedPatches, torch.Tensor, torch.Tensor]] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_keys_values` of ``norm1(x)`` from the normalised map ``x_hat``
    (``LayerNorm`` without affine): ``gamma`` scales the input channels of
    the SR conv (or kv linear) and ``beta`` moves into its bias, so no
    full-map affine pass is needed. The folded weights are prepared once per
    weight version at inference. With ``kept = (patches, rows, t_hat)``
    (an SR conv only), of the map ``x_hat`` with its kept rows replaced by
    ``t_hat`` (:func:`_replace_touched`)."""
    B = x_hat.shape[0]
    if attn.sr is not None:
        w, bias = prepared(attn, 'folded_sr', fold_conv, attn.sr.weight, attn.sr.bias,
                           norm1.weight, norm1.bias)
        y = map_to_tokens(conv2d(attn.sr, tokens_to_map(x_hat, hw), w, bias, key='folded'))
        if kept is not None:
            y = _replace_touched(y, w, bias, *kept)
        kv = _linear(attn.kv, attn.norm(y))
    else:
        w, bias = prepared(attn, 'folded_kv', fold_linear, attn.kv.weight, attn.kv.bias,
                           norm1.weight, norm1.bias)
        kv = linear(x_hat, w, bias, owner=attn, key='folded_kv_packed')
    kv = kv.reshape(B, -1, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return kv.unbind(0)


def _normalise(x: torch.Tensor, unit: Tuple[torch.Tensor, torch.Tensor],
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dim without an affine part, through the
    affine kernel with ``unit = (ones, zeros)``: PyTorch's CPU kernel
    without weights took twice as long (1.02 vs 0.51 ms at 32768 x 64)."""
    return F.layer_norm(x, x.shape[-1:], unit[0], unit[1], eps)


def _query_folded(attn: nn.Module, norm1: nn.LayerNorm, x_hat: torch.Tensor) -> torch.Tensor:
    """``attn.q(norm1(x))`` from ``x_hat``, ``norm1(x)`` without its affine
    part, which is folded into the query weights."""
    w, bias = prepared(attn, 'folded_q', fold_linear, attn.q.weight, attn.q.bias,
                       norm1.weight, norm1.bias)
    return linear(x_hat, w, bias, owner=attn, key='folded_q_packed', rows_vary=True)


class RowLayout(NamedTuple):
    """Where the packed path puts the kept rows of each image
    (:func:`_row_layout`).

    Attributes:
        counts: Rows per image, padding included (the attention's queries).
        front: Padding rows before the first image's kept rows.
        tail: Padding rows after the last image's kept rows.
        stride: Every image holds exactly this many rows (``counts`` are all
            equal): the attention reads the queries as a ``(B, stride)``
            batch in place. ``0`` otherwise.
    """
    counts: List[int]
    front: int
    tail: int
    stride: int


#: :func:`_row_layout` gives two images the same row count when that adds
#: at most this fraction of the kept rows (beyond what
#: :func:`dit_mm.accel.bucket_rows` pads anyway).
SAME_COUNT_UP_TO = 0.02


def _row_layout(counts: List[int], mlp_kernel: bool, x: torch.Tensor) -> RowLayout:
    """The packed rows' layout for images keeping ``counts`` tokens.

    Under autograd with the MLP kernel the rows are padded to a count that
    repeats between steps (:func:`dit_mm.accel.bucket_rows`). For two
    images whose counts differ by at most :data:`SAME_COUNT_UP_TO` of the
    kept rows, the padding goes before the first image and after the
    second, so that each image holds half of the rows and the attention
    reads its queries in place: the zero-padded copy of the queries and
    the gather of its output (:func:`_padded_rows`) cost 1.9 ms a block
    forward and backward at stride 4 (two images of 128² x 64 at 84 %
    kept: 38.0 against 36.1 ms for the attention alone). Otherwise all
    padding goes after the last image. The kept rows stay contiguous
    either way, in the order of ``idx``."""
    K = sum(counts)
    if not (mlp_kernel and torch.is_grad_enabled()):
        return RowLayout(list(counts), 0, 0, 0)
    if len(counts) == 2 and 2 * max(counts) - K <= SAME_COUNT_UP_TO * K:
        rows = bucket_rows(2 * max(counts), x)
        rows += rows % 2
        half = rows // 2
        return RowLayout([half, half], half - counts[0], half - counts[1], half)
    pad = bucket_rows(K, x) - K
    return RowLayout(list(counts[:-1]) + [counts[-1] + pad], 0, pad, 0)


#: :func:`_attention_packed` pads the images' queries to one batch when
#: that computes at most this many times the kept rows (else one call per
#: image).
PAD_QUERIES_UP_TO = 1.25


def _padded_rows(counts: List[int], device: torch.device
                 ) -> Optional[Tuple[torch.Tensor, int]]:
    """Where the packed rows of ``counts`` go in a ``(B, max(counts))`` batch
    (flat positions, and the padded length), or ``None`` when padding would
    compute more than :data:`PAD_QUERIES_UP_TO` times the kept rows."""
    n_max, total = max(counts), sum(counts)
    if len(counts) < 2 or len(counts) * n_max > PAD_QUERIES_UP_TO * total:
        return None
    pos = torch.cat([torch.arange(n, device=device) + b * n_max for b, n in enumerate(counts)])
    return pos, n_max


def _attention_packed(attn: nn.Module, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, counts: List[int],
                      padded: Optional[Tuple[torch.Tensor, int]] = None,
                      stride: int = 0) -> torch.Tensor:
    """Spatial-reduction attention for packed queries ``q (K, C)`` (after
    the query linear).

    ``k``/``v`` ``(B, heads, Nk, hd)`` come from the reduced full map; queries
    of image ``b`` are the ``counts[b]`` consecutive rows of ``q``. With
    ``padded`` (:func:`_padded_rows`) the queries of all images go through
    one attention call, zero-padded to the longest image (the padding rows'
    outputs are dropped, so they get no gradient): PyTorch's CPU flash
    attention splits its backward over batch and heads, so one image of a
    one-head stride-4 node ran it on one thread (two images' forward and
    backward at 13000 queries: 33.4 ms in two calls, 25.9 ms in one).
    With ``stride`` every image holds that many rows of ``q`` (padding
    included, :class:`RowLayout`), and the call reads them in place.
    """
    C = q.shape[1]
    heads, hd = attn.num_heads, attn.head_dim
    dropout = attn.attn_drop.p if attn.training else 0.0
    if stride:  # every image holds `stride` rows (RowLayout): the queries in place
        o = _sdpa(attn, q.view(-1, stride, heads, hd).transpose(1, 2), k, v, dropout)
        out = o.transpose(1, 2).reshape(q.shape[0], C)
    elif padded is not None:
        pos, n_max = padded
        B = k.shape[0]
        qp = q.new_zeros(B * n_max, C).index_copy(0, pos, q)
        o = _sdpa(attn, qp.view(B, n_max, heads, hd).transpose(1, 2), k, v, dropout)
        out = o.transpose(1, 2).reshape(B * n_max, C).index_select(0, pos)
    else:
        outs = []  # per image; one concatenation (a single image needs no copy)
        for qb, kb, vb, n in zip(q.split(counts), k.split(1), v.split(1), counts):
            if n:
                ob = _sdpa(attn, qb.view(1, n, heads, hd).transpose(1, 2), kb, vb, dropout)
                outs.append(ob.transpose(1, 2).reshape(n, C))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return _dropout(attn.proj_drop, _linear_packed(attn.proj, out))


def _dropout(drop: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``drop(x)`` where it can change ``x`` (sparse training with a
    dropout rate); no call at inference."""
    return drop(x) if drop.training and getattr(drop, 'p', 0.0) else x


def _sdpa(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          dropout: float = 0.0) -> torch.Tensor:
    """Attention with timm's choice of fused or explicit kernel (the explicit
    one is what FLOP counters can read)."""
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return F.dropout(a, dropout) @ v


def _mlp_packed_kernel(mlp: nn.Module, t: torch.Tensor, nbr: torch.Tensor,
                       hidden: Optional[torch.Tensor]) -> torch.Tensor:
    """MLP of packed tokens with the sparse depthwise conv + GELU, written
    into the stage's ``hidden`` buffer at inference."""
    h = sparse_dwconv_gelu(_linear_packed(mlp.fc1, t), nbr, mlp.dwconv, out=hidden)
    return _dropout(mlp.drop, _linear_packed(mlp.fc2, _dropout(mlp.drop, h)))


def _mlp_packed(mlp: nn.Module, t: torch.Tensor, hw: Tuple[int, int],
                idx: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """MLP with depthwise conv for packed tokens ``t (K, C)`` at flat
    positions ``idx`` of a ``(B, H, W)`` map. ``buffer (B*H*W, hidden)`` must
    be zero outside ``idx``; without autograd its kept rows are overwritten in
    place."""
    h = _linear_packed(mlp.fc1, t)
    with scope('dit::scatter'):  # a copy under autograd (it keeps each block's map)
        buffer = _write_rows(buffer, idx, h)
    B = buffer.shape[0] // (hw[0] * hw[1])
    conv = conv2d(mlp.dwconv, mlp.relu(tokens_to_map(buffer.view(B, -1, h.shape[1]), hw)))
    with scope('dit::gather'):
        h = map_to_tokens(conv).reshape(buffer.shape).index_select(0, idx)
    return _dropout(mlp.drop, _linear_packed(mlp.fc2, _dropout(mlp.drop, mlp.act(h))))

"""The CPU executor's node forward: a grid node's blocks on its kept tokens.

:func:`run_node` is what the seam (:func:`dit_mm.accel.run_node`) calls for
float32 CPU tensors. It computes the same values as the model's own
plain-PyTorch path (:meth:`dit_mm.models.blocks.RoutedStage.forward_sparse`,
which runs the kept tokens as slots, :mod:`dit_mm.models.slots`), by one of
three routes:

* the C++ stage program (:mod:`.native_stage`) at float32 inference, at any
  kept fraction;
* above :data:`DENSE_ABOVE` kept, without autograd: the stage's masked dense
  forward (skipped tokens held), which costs less than packing there;
* otherwise the packed path in Python below: the kept tokens of all images
  as one ``(K, C)`` matrix through the token-wise layers, with the tricks
  that make sparse training on the CPU cheaper than a static step: padded
  row buckets (:func:`_row_layout`), keys and values from the touched SR
  patches only (:func:`_touched_patches`), interleaved key/value maps
  (:func:`_interleave_rows`) and ``norm1`` folded into the weights that read
  it (:mod:`dit_mm.accel.folding`). Why each pays, with its measurements:
  ``docs/design.md``, "Skipped tokens cost nothing at inference"; the
  step costs: ``docs/benchmarks.md``, "Training time (CPU)".

Executor functions are called through their modules (``onednn.linear``, not
a bound name), so the tests can watch them.
"""
from __future__ import annotations

from functools import partial
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...utils.profiling import scope
from ...utils.tokens import blend, map_to_tokens, tokens_to_map
from ...utils.tokens import dropout as _dropout
from ...utils.tokens import sdpa as _sdpa
from .. import cache, folding
from . import masked_ops, native_stage, onednn, sparse_ops

#: Without the C++ stage program, :func:`run_node` computes densely (with
#: skipped tokens held, same values) when more than this fraction of a
#: node's tokens is kept and autograd is off: packing stopped paying off
#: there (whole DiT-b2 at 0.85 and 0.92 kept, ``benchmarks/bench_backbone.py``;
#: ``docs/design.md``, "Skipped tokens cost nothing at inference"). A
#: stage's ``dense_above`` attribute, where set, overrides it.
DENSE_ABOVE = 0.9


def _linear_layer(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return onednn.linear_module(layer, x)


def _linear_rows(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A token-wise layer of the packed path: its row count is the number of
    kept tokens, which changes at every training step (``rows_vary``)."""
    return onednn.linear_module(layer, x, rows_vary=True)


def run_node(stage: nn.Module, x: torch.Tensor, hw: Tuple[int, int],
             keep: Optional[torch.Tensor] = None,
             gate: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The node output for float32 CPU tokens, or ``None`` where the model's
    own path should run (the contract of :func:`dit_mm.accel.run_node`).

    Args:
        stage: A :class:`dit_mm.models.blocks.RoutedStage`.
        x: Tokens ``(B, N, C)``.
        hw: Map size ``(H, W)``.
        keep: Boolean ``(B, N)``, or ``None`` for every token (the dense forward).
        gate: Sparse training: the hard 0/1 gate behind ``keep``, with its
            straight-through gradient; the output is then
            ``blend(x, B(x), gate)``.
    """
    B, N, C = x.shape
    if keep is None:  # the C++ program with every token kept, else the model's dense path
        if native_stage.native_applies(stage, x):
            return native_stage.packed_forward(stage, x, hw, torch.arange(B * N))
        return None
    with scope('dit::gather'):
        idx = keep.reshape(-1).nonzero().squeeze(1)  # sorted: images are contiguous
    if idx.numel() == 0:
        return x
    if native_stage.native_applies(stage, x):
        out = native_stage.packed_forward(stage, x, hw, idx)  # packs at any kept fraction
        if out is not None:
            return out if gate is None else blend(x, out, gate)
    if idx.numel() == B * N:
        out = stage.forward_dense(x, hw)
        return out if gate is None else blend(x, out, gate)
    if idx.numel() > getattr(stage, 'dense_above', DENSE_ABOVE) * B * N \
            and not torch.is_grad_enabled():
        return stage.forward_masked(x, hw, keep.to(x.dtype))  # the same values, held
    return forward_packed(stage, x, hw, keep, idx, gate)


def forward_packed(stage: nn.Module, x: torch.Tensor, hw: Tuple[int, int], keep: torch.Tensor,
                    idx: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    """The Python packed path of :func:`run_node` for the kept flat
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
    mlp_kernel = sparse_ops.kernel_applies(x) and all(
        folding.fusable(blk.mlp) for blk in stage.blocks)
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
    h = _packed_rows(stage, x, hw, keep, local, t0, mlp_kernel, layout)
    kept_in = t0[layout.front:layout.front + K]
    if gate is None:
        t = stage.norm(h)
    else:  # blend(kept_in, stage.norm(h), g) with g = 1 at these rows: exactly norm(h)
        g = gate.reshape(1, -1).index_select(1, idx)
        t = masked_ops.held_norm(stage.norm, h.unsqueeze(0), kept_in.unsqueeze(0), g).squeeze(0)
    with scope('dit::scatter'):  # _write_rows copies under autograd, else writes in place
        out = base if torch.is_grad_enabled() else base.clone(
            memory_format=torch.contiguous_format)
        return _write_rows(out, idx, t).view(B, N, C)

def _packed_rows(stage: nn.Module, x: torch.Tensor, hw: Tuple[int, int], keep: torch.Tensor,
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
            nbr = sparse_ops.neighbour_table(idx, B, hw)
            if front:  # the kept rows' neighbours move down with them
                nbr = torch.where(nbr >= 0, nbr + front, nbr)
            if front or layout.tail:  # no neighbours, and no kept row's neighbour
                nbr = torch.cat([nbr.new_full((front, nbr.shape[1]), -1), nbr,
                                 nbr.new_full((layout.tail, nbr.shape[1]), -1)])
        # one output buffer for every block at inference (autograd keeps each block's)
        hidden = None if torch.is_grad_enabled() else t.new_empty(
            t.shape[0], stage.blocks[0].mlp.fc1.out_features)
        mlp = partial(_mlp_packed_kernel, nbr=nbr, hidden=hidden)
    else:
        # dense depthwise conv on a hidden map that is zero at skipped
        # positions; every block writes the same rows, so it is zeroed once
        buffer = x.new_zeros(B * N, stage.blocks[0].mlp.fc1.out_features)
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
    # fold, which under autograd costs over ten times the affine of the held
    # rows (docs/design.md, "Skipped tokens cost nothing at inference").
    eps = stage.blocks[0].norm1.eps
    touched, touched_rows, skipped = None, None, None
    if all(folding.foldable(blk, eps) for blk in stage.blocks):
        normalise = partial(_normalise, unit=(x.new_ones(C), x.new_zeros(C)), eps=eps)
        if torch.is_grad_enabled():
            with scope('dit::gather'):
                touched = _touched_patches(idx, B, hw, stage.blocks[0].attn.sr)
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
            q = _linear_rows(blk.attn.q, t_n)
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
            q = _linear_rows(blk.attn.q, blk.norm1(t))
            k, v = _keys_values(blk.attn, blk.norm1(full), hw)
        t = t + _attention_packed(blk.attn, q, k, v, layout.counts, padded, layout.stride)
        return t + mlp(blk.mlp, blk.norm2(t)), normed

    for blk in stage.blocks:
        t, normed = stage._maybe_checkpoint(packed_block, blk, t, normed)
    return t[front:front + K]


def _keys_values(attn: nn.Module, x: torch.Tensor, hw: Tuple[int, int]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(B, heads, Nk, hd)`` from the (normed) full map."""
    B = x.shape[0]
    if attn.sr is not None:
        x = attn.norm(map_to_tokens(onednn.conv2d(attn.sr, tokens_to_map(x, hw))))
    kv = _linear_layer(attn.kv, x).reshape(B, -1, 2, attn.num_heads, attn.head_dim)
    kv = kv.permute(2, 0, 3, 1, 4)
    return kv.unbind(0)


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
#: when at most this fraction of the patches holds kept tokens: a node that
#: keeps few tokens then skips the whole-map copy per block that rewriting
#: the map costs under autograd (``docs/design.md``, "Skipped tokens cost
#: nothing at inference").
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
    kept rows, this saves about 7 % of a sparse-training step of DiT-b2 at
    mu = 0.86, 512² (``docs/design.md``, "Skipped tokens cost nothing at
    inference")."""
    c_out = y.shape[-1]
    kept = t_hat if patches.inside is None else t_hat.index_select(0, patches.inside)
    vec = rows.index_copy(0, patches.slots, kept).view(patches.ids.numel(), weight[0].numel())
    w2d = weight.permute(0, 2, 3, 1).reshape(c_out, -1)
    y_touched = onednn.linear(vec, w2d, bias, rows_vary=True)
    return y.reshape(-1, c_out).index_copy(0, patches.ids, y_touched.to(y.dtype)).view_as(y)


class _InterleaveRows(torch.autograd.Function):
    """``out[idx] = a, out[jdx] = b`` for complementary row sets: one write
    of the map forward, one gather per input backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, idx: torch.Tensor, b: torch.Tensor,
                jdx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx, jdx)
        out = a.new_empty(idx.numel() + jdx.numel(), a.shape[1])
        sparse_ops.write_rows(out, idx, a)
        return sparse_ops.write_rows(out, jdx, b)

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
    the kept rows and the skipped rows of the stage input, in one write:
    a copy of the whole map per block instead would pass a whole-map
    gradient back through every earlier block's copy."""
    return _InterleaveRows.apply(a, idx, b, jdx)


def _write_rows(buffer: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``buffer`` with ``rows`` at ``idx``: in place without autograd, else a
    copy (autograd keeps every block's version)."""
    if torch.is_grad_enabled():
        return buffer.index_copy(0, idx, rows)
    return sparse_ops.write_rows(buffer, idx, rows)


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
        w, bias = cache.prepared(attn, 'folded_sr', folding.fold_conv, attn.sr.weight,
                                 attn.sr.bias, norm1.weight, norm1.bias)
        y = map_to_tokens(onednn.conv2d(attn.sr, tokens_to_map(x_hat, hw), w, bias, key='folded'))
        if kept is not None:
            y = _replace_touched(y, w, bias, *kept)
        kv = _linear_layer(attn.kv, attn.norm(y))
    else:
        w, bias = cache.prepared(attn, 'folded_kv', folding.fold_linear, attn.kv.weight,
                                 attn.kv.bias, norm1.weight, norm1.bias)
        kv = onednn.linear(x_hat, w, bias, owner=attn, key='folded_kv_packed')
    kv = kv.reshape(B, -1, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return kv.unbind(0)


def _normalise(x: torch.Tensor, unit: Tuple[torch.Tensor, torch.Tensor],
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dim without an affine part, through the
    affine kernel with ``unit = (ones, zeros)``: PyTorch's CPU kernel
    without weights takes about twice as long (``docs/design.md``)."""
    return F.layer_norm(x, x.shape[-1:], unit[0], unit[1], eps)


def _query_folded(attn: nn.Module, norm1: nn.LayerNorm, x_hat: torch.Tensor) -> torch.Tensor:
    """``attn.q(norm1(x))`` from ``x_hat``, ``norm1(x)`` without its affine
    part, which is folded into the query weights."""
    w, bias = cache.prepared(attn, 'folded_q', folding.fold_linear, attn.q.weight, attn.q.bias,
                             norm1.weight, norm1.bias)
    return onednn.linear(x_hat, w, bias, owner=attn, key='folded_q_packed', rows_vary=True)


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
#: :func:`.onednn.bucket_rows` pads anyway): the attention then reads the
#: queries in place, without a zero-padded copy (``docs/design.md``,
#: "Skipped tokens cost nothing at inference", the attention bullet).
SAME_COUNT_UP_TO = 0.02


def _row_layout(counts: List[int], mlp_kernel: bool, x: torch.Tensor) -> RowLayout:
    """The packed rows' layout for images keeping ``counts`` tokens.

    Under autograd with the MLP kernel the rows are padded to a count that
    repeats between steps (:func:`.onednn.bucket_rows`). For two
    images whose counts differ by at most :data:`SAME_COUNT_UP_TO` of the
    kept rows, the padding goes before the first image and after the
    second, so that each image holds half of the rows and the attention
    reads its queries in place: the zero-padded copy of the queries and
    the gather of its output (:func:`_padded_rows`) cost about 5 % of the
    attention's forward and backward at stride 4 (``docs/design.md``,
    "Skipped tokens cost nothing at inference"). Otherwise all
    padding goes after the last image. The kept rows stay contiguous
    either way, in the order of ``idx``."""
    K = sum(counts)
    if not (mlp_kernel and torch.is_grad_enabled()):
        return RowLayout(list(counts), 0, 0, 0)
    if len(counts) == 2 and 2 * max(counts) - K <= SAME_COUNT_UP_TO * K:
        rows = onednn.bucket_rows(2 * max(counts), x)
        rows += rows % 2
        half = rows // 2
        return RowLayout([half, half], half - counts[0], half - counts[1], half)
    pad = onednn.bucket_rows(K, x) - K
    return RowLayout(list(counts[:-1]) + [counts[-1] + pad], 0, pad, 0)


#: :func:`_attention_packed` pads the images' queries to one batch when
#: that computes at most this many times the kept rows (else one call per
#: image): one call lets PyTorch's CPU flash attention split its backward
#: over the batch, where a one-head node's per-image backward runs on one
#: thread (``docs/design.md``, "Skipped tokens cost nothing at inference",
#: the attention bullet).
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
    one-head stride-4 node ran it on one thread (two calls took 1.3x as
    long as one; ``docs/design.md``).
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
    return _dropout(attn.proj_drop, _linear_rows(attn.proj, out))


def _mlp_packed_kernel(mlp: nn.Module, t: torch.Tensor, nbr: torch.Tensor,
                       hidden: Optional[torch.Tensor]) -> torch.Tensor:
    """MLP of packed tokens with the sparse depthwise conv + GELU, written
    into the stage's ``hidden`` buffer at inference."""
    h = sparse_ops.sparse_dwconv_gelu(_linear_rows(mlp.fc1, t), nbr, mlp.dwconv, out=hidden)
    return _dropout(mlp.drop, _linear_rows(mlp.fc2, _dropout(mlp.drop, h)))


def _mlp_packed(mlp: nn.Module, t: torch.Tensor, hw: Tuple[int, int],
                idx: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """MLP with depthwise conv for packed tokens ``t (K, C)`` at flat
    positions ``idx`` of a ``(B, H, W)`` map. ``buffer (B*H*W, hidden)`` must
    be zero outside ``idx``; without autograd its kept rows are overwritten in
    place."""
    h = _linear_rows(mlp.fc1, t)
    with scope('dit::scatter'):  # a copy under autograd (it keeps each block's map)
        buffer = _write_rows(buffer, idx, h)
    B = buffer.shape[0] // (hw[0] * hw[1])
    conv = onednn.conv2d(mlp.dwconv, mlp.relu(tokens_to_map(buffer.view(B, -1, h.shape[1]), hw)))
    with scope('dit::gather'):
        h = map_to_tokens(conv).reshape(buffer.shape).index_select(0, idx)
    return _dropout(mlp.drop, _linear_rows(mlp.fc2, _dropout(mlp.drop, mlp.act(h))))

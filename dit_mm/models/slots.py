"""Static-shape routing: a node's blocks on a fixed number of token slots.

A gated node with *capacity* ``S`` runs its PVTv2 blocks on ``S`` token
slots per image, whatever the gate decides. Every tensor's shape follows
from the input size and the capacities alone, so the forward has no
``nonzero``, no host sync and no per-image loop: it exports
(``torch.export``, ONNX), compiles with ``fullgraph=True`` and can be
captured in a CUDA graph, and its cost is fixed before the data is seen.

Which tokens fill the slots (:func:`choose_slots`):

* ``'threshold'`` (default for calibrated budgets): the tokens the gate keeps
  (score above its threshold), the best-scored ones when an image keeps more
  than ``S``; when it keeps fewer, the remaining slots hold its next-best
  tokens as *padding*: they are computed and their outputs discarded. So the
  output equals threshold routing for every image that fits its capacity.
* ``'top'``: the ``S`` best-scored tokens of each image, all kept. With
  ``keep_ratio=r`` and ``S = ceil(r * N)`` this is exactly today's top-k
  routing.

Inside the node the semantics are those of the eager paths
(:mod:`dit_mm.models.blocks`): keys and values come from the spatially
reduced *full* map (kept tokens at their current value, the others at their
input value), so only the queries are ragged and padding slots need no
attention mask; the MLP's depthwise conv sees zeros at tokens that are not
kept. Everything here is plain PyTorch (gather, one batched attention call
over ``(B, heads, S, d)`` queries, linears on the slots, a 9-tap depthwise
conv through a neighbour table, scatter): it runs on any device.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..utils.tokens import dropout, sdpa

SLOT_POLICIES = ('threshold', 'top')


def slot_count(fraction: float, tokens: int) -> int:
    """Slots for a capacity ``fraction`` of a node's ``tokens``:
    ``ceil(fraction * tokens)``, 0 for a fraction of 0 (the node is skipped),
    else at least 1."""
    if fraction <= 0.0:
        return 0
    return min(tokens, max(1, math.ceil(fraction * tokens - 1e-9)))


def choose_slots(score: torch.Tensor, keep: torch.Tensor, capacity: int,
                 policy: str = 'threshold') -> Tuple[torch.Tensor, torch.Tensor]:
    """The token slots of each image.

    Args:
        score: Keep scores ``(B, N)`` (the gate's keep logit).
        keep: The gate's hard 0/1 decisions ``(B, N)`` (used by ``'threshold'``).
        capacity: Slots per image ``S``, in ``[1, N]``.
        policy: ``'threshold'`` or ``'top'`` (module docstring).

    Returns:
        ``slots (B, S)``, token indices, distinct within an image, and
        ``valid (B, S)``, a bool: the slot's output is written back.
    """
    if policy not in SLOT_POLICIES:
        raise ValueError(f'slot policy {policy!r} is not one of {SLOT_POLICIES}')
    slots = score.detach().topk(capacity, dim=1, sorted=False).indices
    if policy == 'top':
        return slots, torch.ones_like(slots, dtype=torch.bool)
    return slots, keep.detach().gather(1, slots) > 0.5


def kept_slots(keep: torch.Tensor, capacity: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Slots for eager routing: each image's kept tokens first (in token
    order), then skipped tokens as padding, ``capacity`` in all.

    Args:
        keep: Boolean ``(B, N)``.
        capacity: Slots per image, at least the most tokens an image keeps.

    Returns:
        ``slots (B, S)`` and ``valid (B, S)`` as :func:`choose_slots`.
    """
    order = keep.to(torch.int8).sort(dim=1, descending=True, stable=True).indices
    slots = order[:, :capacity]
    return slots, keep.gather(1, slots)


def neighbour_slots(slots: torch.Tensor, valid: torch.Tensor,
                    hw: Tuple[int, int]) -> torch.Tensor:
    """The 3x3 neighbourhood of every slot, as rows of a slot table.

    The table holds ``S + 1`` rows per image: the slots, then one zero row.
    A neighbour that is outside the map or not a valid slot points at the
    zero row, so a depthwise conv through this table sees zeros there, as
    the dense conv sees its zero padding and the zeroed hidden map.

    Returns:
        ``(9, B * S)`` flat row indices into the ``(B * (S + 1), C)`` table,
        tap ``k = 3 * (dy + 1) + (dx + 1)`` (the conv weight's order).
    """
    B, S = slots.shape
    H, W = hw
    Wp = W + 2
    # slot id of every position of the zero-bordered (H + 2) x (W + 2) map
    pos = (slots // W + 1) * Wp + slots % W + 1
    ids = torch.arange(S, device=slots.device).expand(B, S)
    ids = torch.where(valid, ids, torch.full_like(ids, S))
    table = torch.full((B, (H + 2) * Wp), S, dtype=slots.dtype, device=slots.device)
    table = table.scatter(1, pos, ids)
    base = (torch.arange(B, device=slots.device) * (S + 1)).view(B, 1)
    taps = [table.gather(1, pos + (dy * Wp + dx)) + base
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return torch.stack(taps).reshape(9, B * S)


def _keys_values(attn: nn.Module, xn: torch.Tensor, hw: Tuple[int, int]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm's spatial-reduction keys and values ``(B, heads, Nk, hd)`` of
    the normalised full map ``xn (B, N, C)``."""
    B, N, C = xn.shape
    if attn.sr is not None:
        m = xn.transpose(1, 2).reshape(B, C, hw[0], hw[1])
        xn = attn.norm(attn.sr(m).flatten(2).transpose(1, 2))
    kv = attn.kv(xn).reshape(B, -1, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return kv[0], kv[1]


def _attention(attn: nn.Module, q_in: torch.Tensor, xn: torch.Tensor,
               hw: Tuple[int, int]) -> torch.Tensor:
    """Attention of the slot queries ``q_in (B, S, C)`` against the keys and
    values of the full map: one batched call, no mask (padding slots' rows
    are dropped at the scatter)."""
    B, S, C = q_in.shape
    q = attn.q(q_in).reshape(B, S, attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = _keys_values(attn, xn, hw)
    o = sdpa(attn, q, k, v, attn.attn_drop.p if attn.training else 0.0)
    return dropout(attn.proj_drop, attn.proj(o.transpose(1, 2).reshape(B, S, C)))


#: How :func:`_mlp` runs the depthwise conv at the slots:
#: ``'map'``: the slots' hidden rows are written into a zero map and the
#: module's own conv runs densely on it (the map-wise cost of a conv, in few
#: large ops); ``'taps'``: 9 gathers through the neighbour table, each
#: multiplied and accumulated (the per-token cost, in 27 small ops). The
#: analytic cost (``DiT.static_shape_cost``) follows the choice. In
#: onnxruntime on the CPU the taps win at capacities up to about a quarter of
#: the tokens, the map above (``docs/benchmarks.md``, "Deployed inference on
#: the CPU: ONNX in onnxruntime").
DWCONV = 'taps'


class SlotIndex(NamedTuple):
    """Where a node's slots sit, built once per node (every block reads it).

    Attributes:
        rows: Flat rows ``b * N + slot`` of the ``(B * N, C)`` token map, ``(B * S,)``.
        keep: ``(B * S, 1)`` bool: the slot's output is written back.
        nbr: The neighbour table (:func:`neighbour_slots`), or ``None`` with ``DWCONV='map'``.
        hw: Map size.
        batch: ``B``.
    """

    rows: torch.Tensor
    keep: torch.Tensor
    nbr: Optional[torch.Tensor]
    hw: Tuple[int, int]
    batch: int


def _depthwise(conv: nn.Conv2d, h: torch.Tensor, where: SlotIndex) -> torch.Tensor:
    """The 3x3 depthwise ``conv`` of the hidden slot rows ``h (B * S, hid)``
    over a map that is zero wherever no valid slot sits."""
    hid = h.shape[-1]
    H, W = where.hw
    B = where.batch
    if where.nbr is None:
        h = h * where.keep.to(h.dtype)  # padding slots are not kept tokens: zero
        hmap = h.new_zeros(B * H * W, hid).index_put((where.rows,), h)
        y = conv(hmap.view(B, H, W, hid).permute(0, 3, 1, 2))
        return y.permute(0, 2, 3, 1).reshape(B * H * W, hid).index_select(0, where.rows)
    S = h.shape[0] // B
    rows = torch.cat([h.view(B, S, hid), h.new_zeros(B, 1, hid)], 1).reshape(-1, hid)
    w = conv.weight.reshape(hid, 9).t()  # (9, hid), tap k = 3 * (dy + 1) + (dx + 1)
    acc = rows.index_select(0, where.nbr[4]) * w[4]
    for k in (0, 1, 2, 3, 5, 6, 7, 8):
        acc = acc + rows.index_select(0, where.nbr[k]) * w[k]
    return acc if conv.bias is None else acc + conv.bias


def _mlp(mlp: nn.Module, t: torch.Tensor, where: SlotIndex) -> torch.Tensor:
    """timm's ``MlpWithDepthwiseConv`` on the slot rows ``t (B * S, C)``."""
    h = mlp.act(_depthwise(mlp.dwconv, mlp.relu(mlp.fc1(t)), where))
    return dropout(mlp.drop, mlp.fc2(dropout(mlp.drop, h)))


def _slot_block(blk: nn.Module, t: torch.Tensor, t0: torch.Tensor, base: torch.Tensor,
                where: SlotIndex) -> torch.Tensor:
    """One block on the slot rows ``t``: the keys' and values' map is
    ``base`` with the valid slots at their current value."""
    B, (H, W) = where.batch, where.hw
    C = t.shape[-1]
    full = base.index_put((where.rows,), torch.where(where.keep, t, t0))
    xn = blk.norm1(full)
    q_in = xn.index_select(0, where.rows).view(B, -1, C)
    t = t + _attention(blk.attn, q_in, xn.view(B, H * W, C), where.hw).reshape(-1, C)
    return t + _mlp(blk.mlp, blk.norm2(t), where)


def run_slots(blocks: Sequence[nn.Module], norm: nn.Module, x: torch.Tensor,
              hw: Tuple[int, int], slots: torch.Tensor, valid: torch.Tensor,
              checkpoint: Optional[Callable[..., torch.Tensor]] = None,
              dwconv: Optional[str] = None) -> torch.Tensor:
    """A node's blocks and final norm on the token slots of each image.

    Args:
        blocks: timm PVTv2 ``Block`` modules (their dropout applies in
            training; drop path does not, as in every sparse path).
        norm: The stage-end ``LayerNorm``.
        x: Tokens ``(B, N, C)``.
        hw: Map size ``(H, W)``, ``H * W == N``.
        slots: ``(B, S)`` token indices, distinct per image (:func:`choose_slots`).
        valid: ``(B, S)`` bool: slots whose output is kept; the others are
            padding, computed and dropped.
        checkpoint: ``checkpoint(fn, *args)`` runs each block (activation
            checkpointing); default: called directly.
        dwconv: ``'taps'`` or ``'map'`` (see :data:`DWCONV`, the default).

    Returns:
        ``(B, N, C)``: tokens at valid slots updated, all others unchanged.
    """
    B, N, C = x.shape
    dwconv = DWCONV if dwconv is None else dwconv
    # flat rows: gathers and scatters of whole rows (ONNX Gather / ScatterND)
    rows = (slots + (torch.arange(B, device=x.device) * N).unsqueeze(1)).reshape(-1)
    keep = valid.reshape(-1, 1)
    nbr = None if dwconv == 'map' else neighbour_slots(slots, valid, hw)
    where = SlotIndex(rows, keep, nbr, hw, B)
    base = x.reshape(B * N, C)
    t0 = base.index_select(0, rows)
    t = t0
    for blk in blocks:
        t = _slot_block(blk, t, t0, base, where) if checkpoint is None else checkpoint(
            _slot_block, blk, t, t0, base, where)
    return base.index_put((rows,), torch.where(keep, norm(t), t0)).view(B, N, C)

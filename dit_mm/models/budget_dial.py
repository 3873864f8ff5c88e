"""The budget dial: one logit offset for every learned gate, and the spend
curve that maps a budget to it.

The budget loss pulls the *expected* training cost toward ``mu``; at inference
the deterministic EMA gates spend what they spend. Calibration
(``tools/calibrate_budget.py``, :mod:`dit_mm.engine.calibration`) measures
the real backbone FLOPs / ``C_base`` of a trained model on real images as a
function of one offset ``o`` added to the keep logit ``delta`` of every
learned gate (row and column): a gate keeps when ``delta + o > 0``, so the
spend falls monotonically as ``o`` falls. It stores:

* ``offset``: the offset in use (0: the model as trained, exactly);
* ``curve``: ``(2, K)``: offsets (ascending) and the mean spend measured at
  each, so that any budget inside the curve's range maps to an offset by
  interpolation, without retraining or recalibrating;
* ``keep``: ``(nodes, K)``: the mean kept-token fraction of every grid node
  (in ``GridSpec.nodes`` order) at each point of the curve: the per-node
  *capacities* of static-shape routing (:mod:`dit_mm.models.slots`) at any
  budget on the curve. Empty in checkpoints calibrated before it existed.

Both are buffers of the backbone (``backbone.dial.offset``,
``backbone.dial.curve``), so a calibrated checkpoint carries them. A
checkpoint written before the dial existed loads with offset 0 and no curve.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

CALIBRATE_HINT = ('calibrate the checkpoint first: python tools/calibrate_budget.py CONFIG '
                  'CHECKPOINT --mu M --out CALIBRATED.pth')


class BudgetDial(nn.Module):
    """Holds the gate logit offset and the measured spend curve."""

    #: state-dict entries that may be absent from a checkpoint (written before
    #: the dial existed): they load as offset 0 and an empty curve
    optional_keys = ('offset', 'curve', 'keep')

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer('offset', torch.zeros(()))
        self.register_buffer('curve', torch.zeros(2, 0))
        self.register_buffer('keep', torch.zeros(0, 0))
        #: bumped by every change of the offset, curve or keep table (through
        #: these methods or a state dict), so that models can cache what
        #: they read off the dial without reading its tensors again
        self.version = 0

    # ------------------------------------------------------------- curve
    @property
    def has_curve(self) -> bool:
        return self.curve.shape[1] >= 2

    def spend_range(self) -> Tuple[float, float]:
        """Smallest and largest spend (x ``C_base``) on the stored curve."""
        if not self.has_curve:
            raise RuntimeError(f'DiT has no spend curve; {CALIBRATE_HINT}')
        spend = self.curve[1]
        return float(spend.min()), float(spend.max())

    @property
    def has_capacities(self) -> bool:
        """Whether per-node keep fractions were stored with the curve."""
        return self.has_curve and self.keep.shape[1] == self.curve.shape[1] \
            and self.keep.shape[0] > 0

    @torch.no_grad()
    def clear(self) -> None:
        """Offset 0 and no curve: the gates as trained."""
        self.offset.zero_()
        self.curve = self.curve.new_zeros(2, 0)
        self.keep = self.keep.new_zeros(0, 0)
        self.version += 1

    @torch.no_grad()
    def set_curve(self, offsets: Sequence[float], spends: Sequence[float],
                  keep: Optional[Sequence[Sequence[float]]] = None) -> None:
        """Stores the measured ``(offset, spend)`` points, sorted by offset,
        and optionally each point's per-node keep fractions ``keep[point][node]``.

        Raises:
            ValueError: for fewer than two points, mismatched lengths or
                non-finite values.
        """
        if len(offsets) != len(spends) or len(offsets) < 2:
            raise ValueError('a spend curve needs two or more (offset, spend) points, got '
                             f'{len(offsets)} offsets and {len(spends)} spends')
        pts = torch.tensor([list(map(float, offsets)), list(map(float, spends))],
                           dtype=torch.float32)
        if not torch.isfinite(pts).all():
            raise ValueError('the spend curve has non-finite values')
        order = pts[0].argsort()
        self.curve = pts[:, order].to(self.offset.device)
        table = torch.zeros(0, 0)
        if keep is not None:
            table = torch.tensor([list(map(float, k)) for k in keep], dtype=torch.float32)
            if table.dim() != 2 or table.shape[0] != len(offsets) \
                    or not torch.isfinite(table).all():
                raise ValueError('keep needs one row of finite per-node fractions per curve '
                                 f'point ({len(offsets)}), got shape {tuple(table.shape)}')
            table = table[order].t().contiguous()
        self.keep = table.to(self.offset.device)
        self.version += 1

    def keep_at(self, offset: float) -> List[float]:
        """Per-node keep fractions at ``offset``, interpolated linearly
        between the curve's points (clamped at its ends).

        Raises:
            RuntimeError: if the dial stores no keep fractions.
        """
        if not self.has_capacities:
            raise RuntimeError('this checkpoint has no per-node capacities (calibrated before '
                               f'static-shape routing existed, or never); {CALIBRATE_HINT}')
        offsets = self.curve[0].tolist()
        rows = self.keep.tolist()
        o = min(max(float(offset), offsets[0]), offsets[-1])
        k = max(i for i in range(len(offsets)) if offsets[i] <= o)
        if k == len(offsets) - 1:
            return [r[k] for r in rows]
        t = (o - offsets[k]) / (offsets[k + 1] - offsets[k])
        return [r[k] + t * (r[k + 1] - r[k]) for r in rows]

    def offset_for(self, budget: float) -> float:
        """The offset at which the stored curve spends ``budget`` x ``C_base``.

        The curve is made monotone (running maximum of the spend over
        ascending offsets: the measured mean can dip by a hair where one
        skipped token changes later decisions) and inverted by linear
        interpolation; in a flat stretch the middle offset is used.

        Raises:
            RuntimeError: without a curve.
            ValueError: for a budget outside the curve's range.
        """
        lo, hi = self.spend_range()
        if not isinstance(budget, (int, float)) or not lo - 1e-6 <= budget <= hi + 1e-6:
            raise ValueError(
                f'budget={budget!r} is outside the calibrated range [{lo:.3f}, {hi:.3f}] '
                "(x C_base, the spends measured when the checkpoint was calibrated). Pick a "
                'budget inside it, or recalibrate: python tools/calibrate_budget.py CONFIG '
                'CHECKPOINT --mu M --out CALIBRATED.pth')
        offsets = self.curve[0].tolist()
        spends = torch.cummax(self.curve[1], dim=0).values.tolist()
        return _invert(offsets, spends, float(budget))

    @torch.no_grad()
    def set_offset(self, value: float) -> None:
        self.offset.fill_(float(value))
        self.version += 1

    # ------------------------------------------------------- state dict
    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: Any,
                              strict: bool, missing_keys: List[str],
                              unexpected_keys: List[str], error_msgs: List[str]) -> None:
        for name in ('curve', 'keep'):  # curves differ in length
            value = state_dict.get(prefix + name)
            if value is not None and value.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(value, device=self.offset.device))
        before = set(missing_keys)
        self.version += 1
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        absent = [k for k in missing_keys if k not in before
                  and k[len(prefix):] in self.optional_keys]
        for k in absent:  # an older checkpoint: the model as trained, no curve
            missing_keys.remove(k)
            if k.endswith('offset'):
                self.offset.zero_()
            elif k.endswith('keep'):
                self.keep = torch.zeros(0, 0, device=self.offset.device)
            else:
                self.curve = torch.zeros(2, 0, device=self.offset.device)


def _invert(offsets: List[float], spends: List[float], budget: float) -> float:
    """Offset of a monotone piecewise-linear ``offset -> spend`` curve at
    ``spend = budget`` (the middle of a flat stretch at that spend)."""
    hits = [o for o, s in zip(offsets, spends) if abs(s - budget) <= 1e-9]
    if hits:
        return 0.5 * (hits[0] + hits[-1])
    for k in range(len(offsets) - 1):
        s0, s1 = spends[k], spends[k + 1]
        if s0 <= budget <= s1 and s1 > s0:
            t = (budget - s0) / (s1 - s0)
            return offsets[k] + t * (offsets[k + 1] - offsets[k])
    # within the 1e-6 tolerance of an end
    return offsets[0] if budget <= spends[0] else offsets[-1]


def dial_state(dial: Optional[BudgetDial]) -> dict:
    """A printable summary of a dial: offset and curve range."""
    if dial is None:
        return {}
    out: dict = dict(offset=float(dial.offset))
    if dial.has_curve:
        out['curve_points'] = int(dial.curve.shape[1])
        out['spend_range'] = list(dial.spend_range())
        out['capacities'] = dial.has_capacities
    return out

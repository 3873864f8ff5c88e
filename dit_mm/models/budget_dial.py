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
  interpolation, without retraining or recalibrating.

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
    optional_keys = ('offset', 'curve')

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer('offset', torch.zeros(()))
        self.register_buffer('curve', torch.zeros(2, 0))

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

    @torch.no_grad()
    def set_curve(self, offsets: Sequence[float], spends: Sequence[float]) -> None:
        """Stores the measured ``(offset, spend)`` points, sorted by offset.

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

    # ------------------------------------------------------- state dict
    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: Any,
                              strict: bool, missing_keys: List[str],
                              unexpected_keys: List[str], error_msgs: List[str]) -> None:
        curve = state_dict.get(prefix + 'curve')
        if curve is not None and curve.shape != self.curve.shape:  # curves differ in length
            self.curve = torch.empty_like(curve, device=self.curve.device)
        before = set(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        absent = [k for k in missing_keys if k not in before
                  and k[len(prefix):] in self.optional_keys]
        for k in absent:  # an older checkpoint: the model as trained, no curve
            missing_keys.remove(k)
            if k.endswith('offset'):
                self.offset.zero_()
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
    return out

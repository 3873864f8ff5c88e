"""Calibration: the gate offset at which a trained DiT spends a budget.

The spend is the mean over images of the real backbone FLOPs of the routes
taken, as a fraction of ``C_base`` (PVTv2's static cost at that image's
input size): what ``tools/get_flops.py`` reports as ``real/C_base``. Every
image runs alone, in eval mode, as inference sees it. :func:`calibrate`
bisects on the gates' logit offset (:mod:`dit_mm.models.budget_dial`) and
measures the spend curve around it; :func:`apply_calibration` writes the
result into the backbone's dial, so a saved checkpoint keeps it.

Used by ``BudgetLossHook`` at the end of training (:mod:`.hooks`) and by
``tools/calibrate_budget.py`` / ``tools/budget_sweep.py``
(:mod:`dit_mm.analysis.calibration`).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.backbone import DiT
from .backbone import find_dit

Progress = Callable[[str], None]


@contextlib.contextmanager
def offset_applied(backbone: DiT, offset: float) -> Iterator[DiT]:
    """Temporarily runs the learned gates with ``offset`` (``budget`` unset)."""
    old_budget, old_offset = backbone.budget, float(backbone.dial.offset)
    backbone.budget = None
    backbone.dial.set_offset(offset)
    try:
        yield backbone
    finally:
        backbone.dial.set_offset(old_offset)
        backbone.budget = old_budget


@torch.no_grad()
def spends(backbone: DiT, inputs: Sequence[torch.Tensor],
           keeps: list[list[float]] | None = None) -> list[float]:
    """Real backbone FLOPs / ``C_base`` of each input batch (averaged over
    its images), as the model is set, in eval mode. With a list ``keeps``,
    also appends each batch's mean kept-token fraction of every grid node
    (``spec.nodes`` order; 0 for a node that did not run)."""
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for x in inputs:
            backbone(x)
            f = backbone.flops(per_image=True)
            out.append(float(f['real'].sum()) / f['static'] / x.shape[0])
            if keeps is not None:
                rows = backbone.last_record.rows
                keeps.append([float(rows[n][1].mean()) if n in rows else 0.0
                              for n in backbone.spec.nodes])
    finally:
        backbone.train(was_training)
    return out


def spend(backbone: DiT, inputs: Sequence[torch.Tensor]) -> float:
    """Mean real backbone FLOPs / ``C_base`` over ``inputs``, as the model is set."""
    per_input = spends(backbone, inputs)
    return sum(per_input) / len(per_input)


def spend_at(backbone: DiT, inputs: Sequence[torch.Tensor], offset: float) -> float:
    """:func:`spend` with the gates' logit offset set to ``offset``."""
    with offset_applied(backbone, offset):
        return spend(backbone, inputs)


def spend_and_keep_at(backbone: DiT, inputs: Sequence[torch.Tensor],
                      offset: float) -> tuple[float, list[float]]:
    """The mean spend at ``offset`` and the mean kept-token fraction of
    every grid node there (the static-shape capacities at that spend)."""
    keeps: list[list[float]] = []
    with offset_applied(backbone, offset):
        per_input = spends(backbone, inputs, keeps)
    means = [sum(col) / len(col) for col in zip(*keeps)]
    return sum(per_input) / len(per_input), means


@dataclass
class Calibration:
    """The result of :func:`calibrate`.

    Attributes:
        mu: Target spend (x ``C_base``).
        offset: Offset found.
        spend: Spend at ``offset`` on the calibration images.
        spend_before: Spend at offset 0 (the model as trained).
        points: Every ``(offset, spend)`` measured (the spend curve).
        seconds: Wall time.
        keeps: Offset -> mean kept-token fraction of every grid node there
            (``spec.nodes`` order): the static-shape capacities.
    """

    mu: float
    offset: float
    spend: float
    spend_before: float
    points: list[tuple[float, float]] = field(default_factory=list)
    seconds: float = 0.0
    keeps: dict[float, list[float]] = field(default_factory=dict)

    @property
    def curve(self) -> tuple[list[float], list[float]]:
        pts = sorted(dict(self.points).items())
        return [o for o, _ in pts], [s for _, s in pts]

    @property
    def keep_table(self) -> list[list[float]] | None:
        """Per-node keep fractions at each offset of :attr:`curve`, or
        ``None`` if some point has none."""
        offsets, _ = self.curve
        if not all(o in self.keeps for o in offsets):
            return None
        return [self.keeps[o] for o in offsets]

    def spend_range(self) -> tuple[float, float]:
        spends = [s for _, s in self.points]
        return min(spends), max(spends)


class _Meter:
    """Measures the spend at offsets, once each, and reports progress."""

    def __init__(self, backbone: DiT, inputs: Sequence[torch.Tensor],
                 progress: Progress | None) -> None:
        self.backbone, self.inputs, self.progress = backbone, inputs, progress
        self.points: dict[float, float] = {}
        self.keeps: dict[float, list[float]] = {}

    def __call__(self, offset: float, why: str) -> float:
        offset = round(float(offset), 6)
        if offset not in self.points:
            t0 = time.perf_counter()
            self.points[offset], self.keeps[offset] = spend_and_keep_at(
                self.backbone, self.inputs, offset)
            if self.progress is not None:
                self.progress(f'  {why:<9} offset {offset:+8.4f}: spend '
                              f'{self.points[offset]:.4f} x C_base '
                              f'({time.perf_counter() - t0:.1f} s, {len(self.inputs)} images)')
        return self.points[offset]


def _saturated_ends(meter: _Meter, limit: float = 64.0) -> tuple[float, float]:
    """Offsets below / above which the spend no longer changes (every
    learned gate closed / open), found by doubling from +-1."""
    ends = []
    for sign in (-1.0, 1.0):
        step, prev = 1.0, meter(0.0, 'start')
        while True:
            cur = meter(sign * step, 'range')
            if abs(cur - prev) < 1e-4 or step >= limit:
                ends.append(sign * step)
                break
            prev, step = cur, step * 2
    return ends[0], ends[1]


def _refine(meter: _Meter, max_gap: float, max_points: int) -> None:
    """Adds midpoints where neighbouring curve points differ by more than
    ``max_gap`` in spend, until none does or ``max_points`` are measured."""
    while len(meter.points) < max_points:
        pts = sorted(meter.points.items())
        gaps = [(b[1] - a[1], a[0], b[0]) for a, b in zip(pts, pts[1:])
                if abs(b[1] - a[1]) > max_gap and b[0] - a[0] > 1e-3]
        if not gaps:
            return
        _, lo, hi = max(gaps, key=lambda g: abs(g[0]))
        meter(0.5 * (lo + hi), 'curve')


def calibrate(model: nn.Module, inputs: Sequence[torch.Tensor], mu: float, *,
              tol: float = 0.01, max_iters: int = 40, curve_gap: float = 0.02,
              max_curve_points: int = 48, progress: Progress | None = print) -> Calibration:
    """Finds the gate offset at which ``inputs`` spend ``mu`` x ``C_base``,
    and measures the spend curve around it.

    Bisection on the offset: the spend falls monotonically (up to a hair,
    where a skipped token changes later decisions) as the offset falls. It
    stops when the mean spend is within ``tol * mu`` of ``mu``. The curve
    spans the offsets at which every learned gate is closed to where every
    one is open, refined until neighbouring points differ by at most
    ``curve_gap`` in spend.

    Args:
        model: Detector / segmentor / classifier with a DiT backbone (or a
            DiT), with ``routing='dynamic'`` and learned gates.
        inputs: Preprocessed backbone inputs (:func:`collect_inputs`).
        mu: Target spend, x ``C_base``.
        tol: Relative tolerance on ``mu``.
        progress: Callable for one line per measurement (``None``: quiet).

    Returns:
        A :class:`Calibration`; the backbone is left as it was.

    Raises:
        ValueError: for a model that has nothing to calibrate, or a budget
            outside what its gates can spend on these images.
    """
    backbone = find_dit(model)
    if backbone.routing != 'dynamic' or backbone.gate_type != 'learned':
        raise ValueError(f"calibration needs routing='dynamic' with learned gates; this DiT "
                         f'has routing={backbone.routing!r}, gate={backbone.gate_type!r}')
    if backbone.keep_ratio is not None:
        raise ValueError('calibration needs keep_ratio=None: a fixed keep ratio overrides the '
                         'row gates, so the offset would only move the column gates')
    if not isinstance(mu, (int, float)) or not mu > 0:
        raise ValueError(f'mu={mu!r} must be a positive fraction of C_base')
    if not inputs:
        raise ValueError('calibration needs at least one image')
    t0 = time.perf_counter()
    meter = _Meter(backbone, inputs, progress)
    before = meter(0.0, 'start')
    lo, hi = _saturated_ends(meter)
    s_lo, s_hi = meter.points[round(lo, 6)], meter.points[round(hi, 6)]
    if not s_lo - tol * mu <= mu <= s_hi + tol * mu:
        raise ValueError(f'mu={mu} is outside what the gates can spend on these images: '
                         f'[{s_lo:.3f}, {s_hi:.3f}] x C_base (every learned gate closed .. '
                         'open)')
    best = min(meter.points.items(), key=lambda p: abs(p[1] - mu))
    for _ in range(max_iters):
        if abs(best[1] - mu) <= tol * mu:
            break
        # the tightest bracket among the points measured so far
        below = max((o for o, s in meter.points.items() if s < mu), default=lo)
        above = min((o for o, s in meter.points.items() if s >= mu and o > below), default=hi)
        mid = 0.5 * (below + above)
        s = meter(mid, 'bisect')
        if abs(s - mu) < abs(best[1] - mu):
            best = (round(mid, 6), s)
    _refine(meter, curve_gap, max_curve_points)
    return Calibration(mu=float(mu), offset=best[0], spend=best[1], spend_before=before,
                       points=sorted(meter.points.items()), seconds=time.perf_counter() - t0,
                       keeps=dict(meter.keeps))


def apply_calibration(model: nn.Module, cal: Calibration) -> DiT:
    """Writes ``cal``'s offset, curve and per-node keep fractions (the
    static-shape capacities) into the backbone's dial buffers."""
    backbone = find_dit(model)
    offsets, spends = cal.curve
    backbone.dial.set_curve(offsets, spends, cal.keep_table)
    backbone.dial.set_offset(cal.offset)
    backbone.budget = None
    return backbone

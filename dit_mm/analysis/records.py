"""Per-image routing and cost records of routed batches, and their summary
(the report of ``tools/routing_stats.py`` and ``tools/get_flops.py``).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine.hooks import find_dit
from ..models.backbone import RoutingRecord
from ..models.grid import Node, node_key
from .data import Batch
from .flops import count_flops, count_neck_heads
from .routing import grid_nodes, routing_mode


@dataclass
class ImageRecord:
    """Routing and cost of one image (GFLOPs per image).

    Attributes:
        size: Padded input ``(H, W)``.
        keep: Node -> ``(expected, real)`` kept-token fraction; nodes whose
            row edge did not run are absent.
        gated: Nodes whose tokens were gated (others ran densely).
        col_open: Gated column edge -> ``(expected, real)`` open fraction.
        backbone: ``expected``, ``real``, ``static``, ``full`` (analytic).
        backbone_counted: ``static`` (and ``real`` with ``count_backbone``)
            from the jit counter.
        neck_heads: ``routed`` / ``static``: counted neck + heads on the
            routed / PVTv2 features (empty when not counted).
    """

    size: tuple[int, int]
    keep: dict[Node, tuple[float, float]]
    gated: list[Node]
    col_open: dict[Node, tuple[float, float]]
    backbone: dict[str, float]
    backbone_counted: dict[str, float] = field(default_factory=dict)
    neck_heads: dict[str, float] = field(default_factory=dict)

    @property
    def whole(self) -> dict[str, float]:
        """Whole-model GFLOPs (empty when the neck and heads were not counted)."""
        if 'routed' not in self.neck_heads:
            return {}
        out = {'expected': self.backbone['expected'] + self.neck_heads['routed'],
               'real': self.backbone['real'] + self.neck_heads['routed']}
        if 'static' in self.neck_heads:
            out['static'] = self.backbone['static'] + self.neck_heads['static']
        return out


def _records_from(rec: RoutingRecord, flops: dict[str, Any]) -> list[ImageRecord]:
    out = []
    for b in range(rec.batch):
        keep = {n: (float(e[b]), float(r[b])) for n, (e, r) in rec.rows.items()}
        cols = {n: (float(rec.embeds[n][0][b]), float(rec.embeds[n][1][b]))
                for n in rec.col_gates}
        bb = {'expected': float(flops['expected'][b]), 'real': float(flops['real'][b]),
              'static': float(flops['static']), 'full': float(flops['full'])}
        out.append(ImageRecord(size=tuple(rec.size), keep=keep, gated=list(rec.masks),
                               col_open=cols, backbone=bb))
    return out


@torch.no_grad()
def analyse_batch(model: nn.Module, batch: Batch, *, whole_model: bool = True,
                  count_backbone: bool = False,
                  static_cache: dict[tuple[int, int], float] | None = None
                  ) -> list[ImageRecord]:
    """Routes one preprocessed batch and measures it (see :mod:`dit_mm.analysis.flops`).

    Args:
        model: Detector / segmentor with a DiT backbone, in eval mode.
        batch: ``{'inputs', 'data_samples'}`` from the data preprocessor.
        whole_model: Also count neck + heads on the routed and on PVTv2's
            features (two jit traces per batch).
        count_backbone: Also trace the routed backbone with the counter.
        static_cache: Input size -> counted static backbone GFLOPs, filled
            on first use of a size (one trace per size).

    Returns:
        One :class:`ImageRecord` per image. With a batch of ``B > 1`` the
        counted neck/head FLOPs are the batch total divided by ``B``.
    """
    backbone = find_dit(model)
    inputs, samples = batch['inputs'], batch.get('data_samples')
    B = inputs.shape[0]
    feats = backbone(inputs)
    rec = backbone.last_record
    records = _records_from(rec, backbone.flops(per_image=True))
    size = tuple(rec.size)
    cache = {} if static_cache is None else static_cache
    if size not in cache:
        with routing_mode(backbone, 'static'):
            cache[size] = count_flops(backbone, (inputs[:1],)) / 1e9
    extra: dict[str, dict[str, float]] = {'backbone_counted': {'static': cache[size]},
                                          'neck_heads': {}}
    if count_backbone:  # the packed path as executed, not the masked dense form of a trace
        backbone.trace_packed = True
        try:
            extra['backbone_counted']['real'] = count_flops(backbone, (inputs,)) / 1e9 / B
        finally:
            backbone.trace_packed = False
    if whole_model:
        extra['neck_heads']['routed'] = count_neck_heads(model, inputs, samples, feats) / 1e9 / B
        with routing_mode(backbone, 'static'):
            static_feats = backbone(inputs)
        extra['neck_heads']['static'] = count_neck_heads(model, inputs, samples,
                                                         static_feats) / 1e9 / B
    backbone.last_record = rec  # the routed forward's record, not the baseline's
    for r in records:
        r.backbone_counted = dict(extra['backbone_counted'])
        r.neck_heads = dict(extra['neck_heads'])
    return records


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


def summarize(records: Sequence[ImageRecord], mu: float | None = None) -> dict[str, Any]:
    """Aggregates per-image records into a JSON-able report.

    Returns:
        dict with ``num_images``, ``input_sizes`` (``'HxW'`` -> count),
        ``nodes`` (``node_key`` -> scale, stage, stride, diagonal,
        ``evaluated`` (row edge ran on some image), ``gated``,
        ``ran_frac`` (images where the node computed >= 1 token),
        ``skip_real`` / ``skip_real_std`` / ``skip_expected``: mean skipped
        fraction over images, 1 where the node did not run),
        ``column_edges`` (``node_key`` -> ``open_real``, ``open_expected``),
        ``gflops`` (``backbone``: expected, real, static, full,
        static_counted [, real_counted]; ``neck_heads``: routed, static;
        ``whole``: expected, real, static; per-image means) and ``ratios``
        (``real/C_base``, ``expected/C_base`` with ``C_base`` = backbone
        static; ``whole_real/whole_static``, ``whole_expected/whole_static``)
        and ``mu``.
    """
    if not records:
        raise ValueError('no images were analysed (empty data set or --num-images 0)')
    n = len(records)
    nodes: dict[str, Any] = {}
    for (i, j) in grid_nodes():
        keep = [r.keep.get((i, j)) for r in records]
        real = [1.0 - k[1] if k is not None else 1.0 for k in keep]
        exp = [1.0 - k[0] if k is not None else 1.0 for k in keep]
        mean, std = _mean_std(real)
        nodes[node_key(i, j)] = {
            'scale': i, 'stage': j, 'stride': 4 * 2 ** i, 'diagonal': i == j,
            'evaluated': any(k is not None for k in keep),
            'gated': any((i, j) in r.gated for r in records),
            'ran_frac': sum(1 for k in keep if k is not None and k[1] > 0) / n,
            'skip_real': mean, 'skip_real_std': std, 'skip_expected': _mean_std(exp)[0]}
    cols: dict[str, Any] = {}
    edges = sorted({e for r in records for e in r.col_open}, key=lambda e: (e[1], e[0]))
    for e in edges:
        vals = [r.col_open[e] for r in records if e in r.col_open]
        cols[node_key(*e)] = {'scale': e[0], 'stage': e[1],
                              'open_expected': _mean_std([v[0] for v in vals])[0],
                              'open_real': _mean_std([v[1] for v in vals])[0]}

    def avg(get: Callable[[ImageRecord], float | None]) -> float | None:
        vals = [get(r) for r in records]
        return None if any(v is None for v in vals) else sum(vals) / n

    bb = {k: avg(lambda r, k=k: r.backbone[k]) for k in ('expected', 'real', 'static', 'full')}
    bb['static_counted'] = avg(lambda r: r.backbone_counted.get('static'))
    real_counted = avg(lambda r: r.backbone_counted.get('real'))
    if real_counted is not None:
        bb['real_counted'] = real_counted
    gflops: dict[str, Any] = {'backbone': bb}
    heads = {k: avg(lambda r, k=k: r.neck_heads.get(k)) for k in ('routed', 'static')}
    if heads['routed'] is not None:
        gflops['neck_heads'] = heads
        gflops['whole'] = {k: avg(lambda r, k=k: r.whole.get(k))
                           for k in ('expected', 'real', 'static')}
    # ratios per image, then averaged (images of different sizes weigh the same)
    ratios = {'real/C_base': avg(lambda r: r.backbone['real'] / r.backbone['static']),
              'expected/C_base': avg(lambda r: r.backbone['expected'] / r.backbone['static'])}
    if 'whole' in gflops and gflops['whole']['static'] is not None:
        ratios['whole_real/whole_static'] = avg(lambda r: r.whole['real'] / r.whole['static'])
        ratios['whole_expected/whole_static'] = avg(
            lambda r: r.whole['expected'] / r.whole['static'])
    sizes = Counter(f'{r.size[0]}x{r.size[1]}' for r in records)
    return {'num_images': n, 'input_sizes': dict(sizes), 'nodes': nodes, 'column_edges': cols,
            'gflops': gflops, 'ratios': ratios, 'mu': mu}


def routing_stats(model: nn.Module, batches: Iterable[Batch], *, whole_model: bool = False,
                  count_backbone: bool = False, mu: float | None = None,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Routes every batch and summarises routing and cost.

    Args:
        model: Detector / segmentor with a DiT backbone (eval mode).
        batches: Preprocessed batches (:func:`iter_dataset_images`).
        whole_model: Count neck + heads too (see :mod:`dit_mm.analysis.flops`); slower.
        count_backbone: Trace the routed backbone with the counter too.
        mu: Budget to report next to the ratios.
        progress: Called with the number of images after each batch.

    Returns:
        The dict of :func:`summarize` (per node mean skip ratio, mean
        expected / real / static GFLOPs per image, ...), plus ``routing``.
    """
    backbone = find_dit(model)
    records: list[ImageRecord] = []
    cache: dict[tuple[int, int], float] = {}
    for batch in batches:
        new = analyse_batch(model, batch, whole_model=whole_model,
                            count_backbone=count_backbone, static_cache=cache)
        records.extend(new)
        if progress is not None:
            progress(len(new))
    out = summarize(records, mu=mu)
    out['routing'] = backbone.routing
    return out

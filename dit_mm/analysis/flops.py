"""FLOPs of a DiT model: what is counted how (GFLOPs *per image*, where one
FLOP is one multiply-accumulate, the fvcore / mmengine ``FlopAnalyzer``
convention the PVTv2 and DiT papers use):

* **Backbone, analytic** -- :meth:`dit_mm.models.backbone.DiT.flops` of the routed
  forward: ``real`` from the hard gate decisions of that image (kept tokens,
  open column edges, evaluated gates), ``expected`` from the gate
  probabilities (the quantity the budget loss trains), ``static`` = PVTv2's
  own path at the same input size (``C_base``) and ``full`` = the whole grid.
* **Backbone, counted (cross-check)** -- ``FlopAnalyzer`` (a jit trace) on the
  backbone with ``routing='static'`` at the same input, with every timm
  ``Attention`` switched to its explicit (non-fused) kernel so that ``QK^T``
  and ``AV`` are visible to the counter. It equals the analytic ``static``
  exactly; :func:`dit_mm.analysis.records.routing_stats` records it per
  input size. Optionally (``count_backbone=True``) the routed backbone is
  traced as well: the counter then sees the packed sparse path actually
  executed, which runs the MLP's 3x3 depthwise conv over the whole map (the
  analytic model charges it per kept token) and ``norm1`` on the kept
  queries as well as on the K/V map, so it lies a little above the analytic
  ``real`` (by exactly those two terms).
* **Neck + heads, counted** -- ``FlopAnalyzer`` on the model's tensor-mode
  ``_forward`` with the backbone replaced by a stub that returns the features
  the backbone produced for this image. It is counted twice per image: on the
  routed features (used for the DiT whole-model numbers) and on PVTv2's
  features (``routing='static'``, used for the baseline), because two-stage
  heads depend on the features through the number of proposals. Ops the
  counter does not know (RoIAlign, NMS, element-wise ops) count 0, as in
  mmdet's own ``get_flops.py``.
* **Whole model** = backbone (analytic) + neck and heads (counted), i.e.
  ``whole.real = backbone.real + neck_heads.routed``,
  ``whole.expected = backbone.expected + neck_heads.routed`` and
  ``whole.static = backbone.static + neck_heads.static`` (this last one is
  exactly what ``FlopAnalyzer`` gives for the whole PVTv2 model in tensor
  mode).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

COUNTING_METHOD = {
    'unit': 'GFLOPs per image, 1 FLOP = 1 multiply-accumulate (fvcore / mmengine convention)',
    'backbone': 'analytic DiT.flops() of each image\'s routing: real = hard gate decisions, '
                'expected = gate probabilities, static = PVTv2 path (C_base), full = whole grid',
    'backbone.static_counted': 'mmengine FlopAnalyzer (jit trace) on the backbone with '
                               "routing='static' and explicit (non-fused) attention",
    'neck_heads': 'mmengine FlopAnalyzer on model._forward (tensor mode) with the backbone '
                  'replaced by its features: routed = DiT features of the image, static = '
                  'PVTv2 features; unknown ops (RoIAlign, NMS, element-wise) count 0',
    'whole': 'backbone (analytic) + neck_heads (counted): expected/real use neck_heads.routed, '
             'static uses neck_heads.static',
}
"""What the numbers of :func:`dit_mm.analysis.records.routing_stats` /
``tools/get_flops.py`` count."""


@contextlib.contextmanager
def countable_attention(module: nn.Module) -> Iterator[None]:
    """Sets ``fused_attn = False`` on every (timm) attention module inside
    ``module`` so that a jit-trace counter sees ``QK^T`` and ``AV`` as
    matmuls (``scaled_dot_product_attention`` counts 0); restores after."""
    changed = [m for m in module.modules() if getattr(m, 'fused_attn', False) is True]
    for m in changed:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in changed:
            m.fused_attn = True


def count_flops(module: nn.Module, inputs: tuple[Any, ...]) -> float:
    """FLOPs (multiply-accumulates) of ``module(*inputs)`` by mmengine's
    ``FlopAnalyzer``, with explicit attention and all counter warnings off."""
    from mmengine.analysis import FlopAnalyzer
    with torch.no_grad(), countable_attention(module), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        analyzer = FlopAnalyzer(module, inputs)
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        analyzer.tracer_warnings('none')
        return float(analyzer.total())


class _FeatureStub(nn.Module):
    """Stands in for the backbone: returns features set from outside."""

    def __init__(self) -> None:
        super().__init__()
        self.feats: tuple[torch.Tensor, ...] = ()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.feats


class _NeckAndHeads(nn.Module):
    """``model._forward`` (tensor mode) with given backbone features; its
    traced inputs are ``(inputs, *features)``."""

    def __init__(self, model: nn.Module, data_samples: Any) -> None:
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor, *feats: torch.Tensor) -> Any:
        model = self.model
        backbone = model.backbone
        stub = _FeatureStub()
        stub.feats = tuple(feats)
        model._modules['backbone'] = stub
        try:
            if not hasattr(model, '_forward'):  # mmpretrain's ImageClassifier
                return model(inputs, self.data_samples, mode='tensor')
            return model._forward(inputs, self.data_samples)
        finally:
            model._modules['backbone'] = backbone


def count_neck_heads(model: nn.Module, inputs: torch.Tensor, data_samples: Any,
                     feats: Sequence[torch.Tensor]) -> float:
    """FLOPs of everything after the backbone (neck, RPN, RoI / decode
    heads) in tensor mode, on the given backbone features, for the batch."""
    return count_flops(_NeckAndHeads(model, data_samples), (inputs, *feats))

"""Deployment: export a DiT model (or its backbone) with real skipping.

The engine of ``tools/export.py`` (see ``docs/deployment.md``). By default a
routed DiT is exported in its static-shape form (``DiT.static_shapes``,
:mod:`dit_mm.models.slots`): every gated node runs on its capacity's token
slots, so the graph costs what the capacity costs. ``dense=True`` keeps the
masked dense form (the whole grid, the same decisions).

Formats:

* ``'torch-export'``: a ``torch.export`` program (``.pt2``) with a free batch
  dimension; load it with ``torch.export.load``;
* ``'onnx'``: an ONNX file (TorchScript-based exporter, opset 17) with a
  fixed batch, checked in onnxruntime when it is installed;
* ``'aoti'``: an AOTInductor package (``.pt2``, the ``torch.export``
  program compiled ahead of time to a shared library; free batch), loaded
  with ``torch._inductor.aoti_load_package``. Compiling takes minutes.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from ..engine.hooks import find_dit
from ..models.backbone import DiT
from .flops import countable_attention

FORMATS = ('onnx', 'torch-export', 'aoti')


@dataclass
class ExportReport:
    """What :func:`export` wrote and checked.

    Attributes:
        path: The file written.
        format: ``'onnx'`` or ``'torch-export'``.
        max_diff: Largest absolute difference between the exported graph and
            eager PyTorch on a second random input.
        gflops: Analytic backbone GFLOPs per image of the exported form.
        counted_gflops: Backbone GFLOPs per image that an op-level counter
            (``torch.utils.flop_counter``) reads off the graph: its matmuls,
            convs and attention (norms and the depthwise taps are element-wise).
        c_base: ``C_base`` at the export size (PVTv2's cost), GFLOPs.
        c_full: The whole grid's cost (what the masked dense form computes).
        static_shapes: Whether the static-shape form was exported.
        slots: Slots per image of every gated node (``'s{i}_t{j}'``).
    """

    path: str
    format: str
    max_diff: float
    gflops: float
    counted_gflops: float | None
    c_base: float
    c_full: float
    static_shapes: bool
    slots: dict[str, int]

    def lines(self) -> list[str]:
        """A human summary, one fact a line."""
        form = 'static-shape' if self.static_shapes else 'masked dense (whole grid)'
        out = [f'wrote {self.path} ({self.format}, {form} form)',
               f'max |exported - eager| on a second random input: {self.max_diff:.2e}',
               f'backbone: {self.gflops:.3f} GFLOPs per image = '
               f'{self.gflops / self.c_base:.3f} x C_base ({self.c_base:.3f} GFLOPs)']
        if self.counted_gflops is not None:
            out.append(f'  counted on the graph (matmuls, convs, attention): '
                       f'{self.counted_gflops:.3f} GFLOPs')
        if self.slots:
            out.append('slots per image: ' + ', '.join(f'{k} {v}' for k, v in self.slots.items()))
        return out


class _Tensors(nn.Module):
    """A model's tensor-mode forward as a module of images only (the neck
    and heads of a detector or segmentor, a classifier's logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> Any:
        return self.model(inputs, mode='tensor')


def set_routing(backbone: DiT, *, budget: float | None = None,
                keep_ratio: float | None = None, capacity: float | None = None,
                slot_policy: str | None = None, dense: bool = False) -> None:
    """Sets the backbone up for export: a budget, keep ratio or capacity,
    and the static-shape form unless ``dense``.

    Raises:
        ValueError: for more than one of budget, keep ratio and capacity, or
            for a value out of range.
        RuntimeError: for ``gate='random'``, or for static shapes at a budget
            from a checkpoint without calibrated capacities (naming the
            calibration command).
    """
    given = [n for n, v in (('budget', budget), ('keep_ratio', keep_ratio),
                            ('capacity', capacity)) if v is not None]
    if len(given) > 1:
        raise ValueError(f'give one of budget, keep_ratio and capacity, not {given}')
    if backbone.gate_type == 'random' and backbone.routing == 'dynamic':
        raise RuntimeError("DiT with gate='random' cannot be exported: its decisions come from "
                           "a seeded generator; export a model with gate='learned' or "
                           "'attention'")
    if budget is not None:
        backbone.budget = budget
    if keep_ratio is not None:
        backbone.keep_ratio = keep_ratio
    if capacity is not None:
        backbone.capacity = capacity
    if slot_policy is not None:
        backbone.slot_policy = slot_policy
    backbone.static_shapes = not dense
    if not dense:
        backbone.capacity_fractions()  # resolved eagerly: export cannot read the dial
    elif budget is not None:
        backbone.gate_offset()  # a budget outside the curve fails here, not in the export


def _module(model: nn.Module, backbone_only: bool) -> nn.Module:
    return find_dit(model) if backbone_only or isinstance(model, DiT) else _Tensors(model)


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    return []


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b):
        raise RuntimeError(f'the exported graph returns {len(b)} tensors, eager {len(a)}')
    return max((float((x.float() - y.float()).abs().max()) for x, y in zip(a, b)),
               default=0.0)


def _counted_backbone(backbone: DiT, x: torch.Tensor) -> float:
    """Op-level GFLOPs per image of the backbone's exported graph (exported
    again with explicit attention, which the counter reads)."""
    from torch.utils.flop_counter import FlopCounterMode
    with countable_attention(backbone), torch.no_grad():
        ep = torch.export.export(backbone, (x[:1],))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ep.module()(x[:1])
    return counter.get_total_flops() / 2 / 1e9


def _free_batch() -> tuple:
    return ({0: Dim('batch', min=1, max=1024)},)


def export(model: nn.Module, fmt: str, out: str, shape: tuple[int, int] = (512, 512),
           batch: int = 1, backbone_only: bool = False, count: bool = True,
           seed: int = 0) -> ExportReport:
    """Exports ``model`` (routing already set, :func:`set_routing`) and
    checks the result against eager PyTorch on a second random input.

    Args:
        model: A DiT, or a detector / segmentor / classifier with a DiT
            backbone, in eval mode.
        fmt: ``'onnx'``, ``'torch-export'`` or ``'aoti'``.
        out: Output file.
        shape: Input ``(H, W)``.
        batch: Batch of the ONNX graph and of the check (``torch-export``
            and ``aoti`` keep the batch free; they trace with at least 2).
        backbone_only: Export ``model.backbone`` alone.
        count: Also count the backbone graph's FLOPs with an op-level counter.

    Raises:
        ValueError: for an unknown format or a bad shape or batch.
        RuntimeError: when the exporter fails (a whole detector's heads may
            not export; ``backbone_only`` does).
    """
    if fmt not in FORMATS:
        raise ValueError(f'format {fmt!r} is not one of {FORMATS}')
    if batch < 1:
        raise ValueError(f'batch={batch} must be >= 1')
    backbone = find_dit(model)
    H, W = int(shape[0]), int(shape[1])
    if min(H, W) < backbone.min_size:
        raise ValueError(f'shape {H}x{W}: DiT needs at least {backbone.min_size}x'
                         f'{backbone.min_size}')
    module = _module(model, backbone_only).eval()
    gen = torch.Generator().manual_seed(seed)
    device = next(backbone.parameters()).device
    trace_batch = batch if fmt == 'onnx' else max(2, batch)  # batch 1 would specialise
    x = torch.randn(trace_batch, backbone.in_channels, H, W, generator=gen).to(device)
    x2 = torch.randn(batch, backbone.in_channels, H, W, generator=gen).to(device)
    with torch.no_grad():
        module(x)  # resolves capacities and budgets eagerly
        want = _flatten(module(x2))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer's notes on shapes read as Python ints: fixed on purpose
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            if fmt == 'onnx':
                torch.onnx.export(module, (x,), out, dynamo=False, opset_version=17,
                                  input_names=['inputs'])
                got = _run_onnx(out, x2)
            elif fmt == 'torch-export':
                program = torch.export.export(module, (x,), dynamic_shapes=_free_batch())
                torch.export.save(program, out)
                got = _flatten(torch.export.load(out).module()(x2))
            else:
                program = torch.export.export(module, (x,), dynamic_shapes=_free_batch())
                torch._inductor.aoti_compile_and_package(program, package_path=out)
                got = _flatten(torch._inductor.aoti_load_package(out)(x2))
    except Exception as e:  # the exporters raise many types
        hint = '' if backbone_only else ' (whole models may not export: try --backbone-only)'
        raise RuntimeError(f'{fmt} export failed{hint}: {type(e).__name__}: '
                           f'{str(e).splitlines()[0] if str(e) else ""}') from e
    if got is None:  # onnxruntime not installed: check the ONNX file's structure only
        diff = float('nan')
    else:
        diff = _max_diff(want, got)
    cost = backbone.static_shape_cost((H, W))  # the masked dense form: every token
    counted = _counted_backbone(backbone, x) if count else None
    slots = {f's{i}_t{j}': n for (i, j), n in backbone.slot_counts((H, W)).items()} \
        if backbone.static_shapes else {}
    return ExportReport(path=out, format=fmt, max_diff=diff, gflops=cost['total'] / 1e9,
                        counted_gflops=counted, c_base=cost['static'] / 1e9,
                        c_full=cost['full'] / 1e9,
                        static_shapes=backbone.static_shapes, slots=slots)


def _run_onnx(path: str, x: torch.Tensor) -> list[torch.Tensor] | None:
    """The ONNX file's outputs for ``x`` in onnxruntime (CPU), or ``None``
    without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    name = sess.get_inputs()[0].name
    return [torch.from_numpy(o) for o in sess.run(None, {name: x.cpu().numpy()})]

"""The dispatch seam: the one place where the model meets its executors.

The model (:mod:`dit_mm.models`) computes in plain PyTorch. It hands this
module two kinds of work, and for each call the seam picks the executor
registered for the input's device (:data:`EXECUTORS`) if that executor
takes the input's dtype, else it runs the plain-PyTorch reference
(:mod:`.reference`) or lets the model run its own path:

======================================  ====================================
operation                               without an executor
======================================  ====================================
``run_node``: a grid node's blocks on   ``None``: the model runs its own
its kept tokens (or on every token)     path (slots, :mod:`dit_mm.models.slots`)
``linear``, ``linear_module``           ``F.linear``
``conv2d``                              the module (or ``F.conv2d``), + GELU
``masked_linear``                       ``F.linear(x) * mask``
``held_norm``                           ``LayerNorm``, then ``lerp``
``forget``                              always runs (it only drops caches)
======================================  ====================================

``run_node`` is the unit of execution: an executor gets a whole node
(:class:`dit_mm.models.blocks.RoutedStage`) and its kept tokens, and may
run it any way that gives the same values (the CPU executor: a C++
program, or a packed path with its own training tricks,
:mod:`.cpu.packed`). The op-level entries serve the dense and masked
forwards, which the model writes out itself.

**Tracers and exporters see the reference.** While ``torch.jit.trace``
(also the TorchScript-based ``torch.onnx.export``), ``torch.export`` or
``torch.compile`` records (:func:`recording`), every operation takes its
reference, as with acceleration off: a graph holds plain ATen ops, never an
executor's reordered weights or C++ calls, and no weight is prepared from a
traced or fake tensor.

**One switch runs the reference everywhere.** ``DIT_MM_ACCEL=0`` in the
environment (read once, when :mod:`dit_mm` is imported), or
``dit_mm.accel.set_enabled(False)``, also a context manager
(``with dit_mm.accel.set_enabled(False): ...``). Every operation above then
takes its reference, on every device: no executor is entered, no weight is
prepared or folded. Outputs agree with the accelerated ones within 1e-5
(``tests/test_accel.py``). The setting is process-wide, not per thread.

Finer switches, read by the CPU executor (:mod:`.cpu`), so they act only
where the seam hands it the input: ``DIT_MM_NO_PACKED=1`` (no oneDNN
reordered weights), ``DIT_MM_NO_NATIVE=1`` or ``RoutedStage.native = False``
(no C++ stage program), ``DIT_MM_NO_EXT=1`` (no C++ extension: neither the
stage program nor the sparse kernels), ``DIT_MM_NO_FUSED_TRAINING=1`` (the
training paths' conv + GELU as a conv, then PyTorch's GELU, instead of the
fused kernel).

**Where a new executor plugs in.** A package next to :mod:`.cpu` (say
``dit_mm/accel/cuda/``) whose ``__init__`` defines the names in
:data:`EXECUTOR_API` with the signatures of :mod:`.cpu`, registered in
:data:`EXECUTORS` under its device type (``EXECUTORS['cuda'] = cuda``). It
may import :mod:`.reference`, :mod:`.cache`, :mod:`.folding` and
:mod:`dit_mm.utils`, never :mod:`dit_mm.models` (``tests/test_layout.py``),
and is tested against the reference through the model
(``tests/test_accel.py``).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn as nn

from . import cpu, reference
from .cache import forget_prepared as _forget_prepared

#: Device type -> executor (a module with the names of :data:`EXECUTOR_API`).
EXECUTORS = {'cpu': cpu}

#: What an executor provides: the dtypes it takes, and one function per
#: dispatched operation (same signatures as :mod:`dit_mm.accel.cpu`).
EXECUTOR_API = ('DTYPES', 'run_node', 'linear', 'linear_module', 'conv2d', 'masked_linear',
                'held_norm', 'forget')

_enabled = os.environ.get('DIT_MM_ACCEL', '1') != '0'

__all__ = ['EXECUTORS', 'EXECUTOR_API', 'enabled', 'set_enabled', 'recording', 'executor',
           'run_node', 'linear', 'linear_module', 'conv2d', 'masked_linear', 'held_norm', 'forget']


# ------------------------------------------------------------------ switch
def enabled() -> bool:
    """Whether the executors run (``False``: the reference everywhere)."""
    return _enabled


def recording() -> bool:
    """Whether a tracer (``torch.jit.trace``), an exporter (``torch.export``,
    which ``torch.onnx.export(..., dynamo=True)`` runs) or ``torch.compile``
    records the ops now: then the seam runs the reference only (the
    executors' prepared weights and C++ calls are no graph ops)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _dispatching() -> bool:
    """Whether executors may run now: enabled, and no tracer or exporter."""
    return _enabled and not recording()


class set_enabled:
    """``set_enabled(False)`` turns acceleration off for the whole process
    (as ``DIT_MM_ACCEL=0``), ``set_enabled(True)`` on again. Like
    ``torch.set_grad_enabled`` it also works as a context manager that
    restores the previous setting on exit::

        with dit_mm.accel.set_enabled(False):
            reference_out = model(x)
    """

    def __init__(self, flag: bool) -> None:
        global _enabled
        self.previous, _enabled = _enabled, bool(flag)

    def __enter__(self) -> set_enabled:
        return self

    def __exit__(self, *exc) -> None:
        global _enabled
        _enabled = self.previous


def executor(t: torch.Tensor):
    """The executor that takes ``t`` (by device type and dtype), or ``None``
    for the reference."""
    if not _dispatching():
        return None
    # is_cpu first: Tensor.device builds a torch.device object on every call
    ex = EXECUTORS.get('cpu' if t.is_cpu else t.device.type)
    return ex if ex is not None and t.dtype in ex.DTYPES else None


# ------------------------------------------------------- dispatched ops
def run_node(stage: nn.Module, x: torch.Tensor, hw: Tuple[int, int],
             keep: Optional[torch.Tensor] = None,
             gate: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """A grid node run by the executor that takes ``x``, or ``None``: then
    the model computes it itself, with the same values.

    Args:
        stage: A :class:`dit_mm.models.blocks.RoutedStage`.
        x: Tokens ``(B, N, C)``.
        hw: Map size ``(H, W)``, ``H * W == N``.
        keep: Boolean ``(B, N)``: the tokens whose blocks run (images may
            keep different numbers, none or all); ``None``: every token
            (:meth:`~dit_mm.models.blocks.RoutedStage.forward_dense`).
        gate: Sparse training: the hard 0/1 gate behind ``keep``, carrying
            its straight-through gradient; the output is then
            ``x + gate * (B(x) - x)``.

    Returns:
        ``(B, N, C)`` with kept tokens updated and the others unchanged, or
        ``None``.
    """
    ex = executor(x)
    return None if ex is None else ex.run_node(stage, x, hw, keep, gate)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           owner: Optional[nn.Module] = None, key: str = 'linear',
           rows_vary: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; an executor may keep a prepared copy
    of ``weight`` under ``(owner, key)``. ``rows_vary``: a hint that the row
    count changes from call to call (packed kept tokens), for executors
    whose kernels are built per shape."""
    ex = executor(x)
    if ex is None:
        return reference.linear(x, weight, bias)
    return ex.linear(x, weight, bias, owner, key, rows_vary=rows_vary)


def linear_module(layer: nn.Linear, x: torch.Tensor, rows_vary: bool = False) -> torch.Tensor:
    """``layer(x)`` (its weight prepared under ``layer``); ``rows_vary`` as
    in :func:`linear`."""
    ex = executor(x)
    if ex is None:
        return reference.linear(x, layer.weight, layer.bias)
    return ex.linear_module(layer, x, rows_vary=rows_vary)


def conv2d(conv: nn.Conv2d, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None, key: str = 'conv',
           gelu: bool = False) -> torch.Tensor:
    """``conv(x)``, with ``weight`` / ``bias`` in place of the module's if
    given (cached by an executor under ``key``), and the exact GELU after it
    with ``gelu=True``."""
    ex = executor(x)
    if ex is None:
        return reference.conv2d(conv, x, weight, bias, gelu)
    return ex.conv2d(conv, x, weight, bias, key, gelu)


def masked_linear(fc: nn.Linear, x: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """``fc(x) * hard`` for a 0/1 mask ``hard (B, N, 1)`` (the masked path's
    MLP input: zero at held tokens)."""
    ex = executor(x)
    if ex is None:
        return reference.masked_linear(fc, x, hard)
    return ex.masked_linear(fc, x, hard)


def held_norm(norm: nn.Module, x: torch.Tensor, x0: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """The masked training path's node output ``x0 + mask * (norm(x) - x0)``
    per token, for a 0/1 ``mask (B, N)`` that may carry a straight-through
    gradient and the last block's output ``x (B, N, C)``, which equals the
    node input ``x0`` where the mask is 0 and passes its gradient there on
    to ``x0`` unchanged (an executor may return the gradient of those rows
    as the gradient of ``x``, and none for ``x0``)."""
    ex = executor(x)
    if ex is None:
        return reference.held_norm(norm, x, x0, mask)
    return ex.held_norm(norm, x, x0, mask)


def forget(module: nn.Module) -> None:
    """Drops what the executors keep for ``module`` and its submodules:
    prepared weights (:mod:`.cache`) and each node's executor state (the CPU
    stage program's plan). Call when weights change without a version bump
    (``p.data.copy_``) or move."""
    _forget_prepared(module)
    for ex in EXECUTORS.values():
        for m in module.modules():
            ex.forget(m)

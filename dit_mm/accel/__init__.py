"""The dispatch seam: the one place where the model meets its executors.

:mod:`dit_mm.models` computes in plain PyTorch except for the operations
below, which it calls through this module and nothing else in
:mod:`dit_mm.accel`. For each call the seam picks the executor registered
for the input's device (:data:`EXECUTORS`) if that executor takes the
input's dtype, and otherwise runs the plain-PyTorch reference
(:mod:`.reference`):

======================================  ====================================
operation                               reference
======================================  ====================================
``linear``, ``linear_module``           ``F.linear``
``conv2d``                              the module (or ``F.conv2d``), + GELU
``bucket_rows``                         the row count itself
``write_rows``                          ``index_copy_``
``held_norm``                           ``LayerNorm``, then ``lerp``
``kernel_applies``                      ``False``: the model's dense
                                        depthwise conv on a zero-filled map
``neighbour_table``,                    :mod:`.reference` (the model calls
``sparse_dwconv_gelu``                  them only where ``kernel_applies``)
``native_applies``, ``packed_forward``  ``False`` / ``None``: the model's
                                        packed forward in Python
``prepared``                            ``fn(*params)``, not cached
``foldable``                            ``False``: ``norm1`` is computed,
                                        not folded into the weights
``forget_prepared``, ``forget_stage``   always run (they only drop caches)
======================================  ====================================

**Tracers and exporters see the reference.** While ``torch.jit.trace``
(also the TorchScript-based ``torch.onnx.export``) or ``torch.export``
records (:func:`recording`), every operation takes its reference, as with
acceleration off: a graph holds plain ATen ops, never an executor's
reordered weights or C++ calls, and no weight is prepared from a traced or
fake tensor.

``fold_conv``, ``fold_linear``, ``fusable`` and ``exact_gelu``
(:mod:`.folding`) are re-exported as they are.

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
from .cache import prepared as _prepared
from .folding import exact_gelu, fold_conv, fold_linear, fusable
from .folding import foldable as _foldable

#: Device type -> executor (a module with the names of :data:`EXECUTOR_API`).
EXECUTORS = {'cpu': cpu}

#: What an executor provides: the dtypes it takes, and one function per
#: dispatched operation (same signatures as :mod:`dit_mm.accel.cpu`).
EXECUTOR_API = ('DTYPES', 'bucket_rows', 'linear', 'linear_module', 'conv2d', 'write_rows',
                'held_norm', 'kernel_applies', 'neighbour_table', 'sparse_dwconv_gelu',
                'native_applies', 'packed_forward', 'forget')

_enabled = os.environ.get('DIT_MM_ACCEL', '1') != '0'

__all__ = ['EXECUTORS', 'EXECUTOR_API', 'enabled', 'set_enabled', 'recording', 'executor',
           'bucket_rows', 'linear', 'linear_module', 'conv2d', 'write_rows', 'held_norm',
           'kernel_applies', 'neighbour_table', 'sparse_dwconv_gelu', 'native_applies',
           'packed_forward', 'forget_stage', 'prepared', 'forget_prepared', 'foldable', 'fold_conv',
           'fold_linear', 'fusable', 'exact_gelu']


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


def bucket_rows(rows: int, x: torch.Tensor) -> int:
    """The row count, ``>= rows``, at which the packed path runs ``rows``
    kept tokens of ``x``: an executor whose kernels are built per shape may
    pad them to a few repeating sizes (sparse training on the CPU:
    :func:`dit_mm.accel.cpu.onednn.bucket_rows`). The padding rows are the
    model's to isolate; the reference pads nothing."""
    ex = executor(x)
    return rows if ex is None else ex.bucket_rows(rows, x)


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


def write_rows(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.index_copy_(0, idx, src)`` for distinct rows ``idx``."""
    ex = executor(dst)
    if ex is None:
        return reference.write_rows(dst, idx, src)
    return ex.write_rows(dst, idx, src)


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


def kernel_applies(h: torch.Tensor) -> bool:
    """Whether an executor runs :func:`sparse_dwconv_gelu` on the packed
    hidden rows ``h`` (else the model's dense conv on a zero-filled map)."""
    ex = executor(h)
    return ex is not None and ex.kernel_applies(h)


def neighbour_table(idx: torch.Tensor, batch: int, hw: Tuple[int, int]) -> torch.Tensor:
    """Packed rows of the 3x3 neighbours of the kept tokens
    (:func:`dit_mm.accel.reference.neighbour_table`)."""
    ex = EXECUTORS.get(idx.device.type) if _dispatching() else None
    if ex is None:
        return reference.neighbour_table(idx, batch, hw)
    return ex.neighbour_table(idx, batch, hw)


def sparse_dwconv_gelu(h: torch.Tensor, nbr: torch.Tensor, conv: nn.Conv2d,
                       gelu: bool = True, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``GELU(dwconv3x3)`` at the kept tokens (call where :func:`kernel_applies`)."""
    ex = executor(h)
    if ex is None:
        return reference.sparse_dwconv_gelu(h, nbr, conv, gelu, out)
    return ex.sparse_dwconv_gelu(h, nbr, conv, gelu, out)


def native_applies(stage: nn.Module, x: torch.Tensor) -> bool:
    """Whether an executor may run the whole packed forward of ``stage``
    (a :class:`dit_mm.models.blocks.RoutedStage`) on ``x``."""
    ex = executor(x)
    return ex is not None and ex.native_applies(stage, x)


def packed_forward(stage: nn.Module, x: torch.Tensor, hw: Tuple[int, int],
                   idx: torch.Tensor) -> Optional[torch.Tensor]:
    """The executor's packed forward of ``stage`` at the sorted kept rows
    ``idx`` (call where :func:`native_applies`), or ``None`` where it does
    not cover the stage: then the model runs its own packed forward."""
    ex = executor(x)
    return None if ex is None else ex.packed_forward(stage, x, hw, idx)


def forget_stage(stage: nn.Module) -> None:
    """Drops every executor's state of ``stage`` (its stage program's plan)."""
    for ex in EXECUTORS.values():
        ex.forget(stage)


# ---------------------------------------------------- prepared weights
def prepared(owner: nn.Module, key: str, fn, *params: Optional[torch.Tensor]):
    """``fn(*params)``, cached per weight version (:mod:`.cache`) while
    acceleration is on and nothing is recorded (:func:`recording`)."""
    if not _dispatching():
        return fn(*params)
    return _prepared(owner, key, fn, *params)


def forget_prepared(module: nn.Module) -> None:
    """Drops the prepared weights of ``module`` and its submodules."""
    _forget_prepared(module)


def foldable(blk: nn.Module, eps: float) -> bool:
    """Whether the packed forward folds ``blk.norm1``'s affine part into the
    weights that read it (:func:`dit_mm.accel.folding.foldable`); never with
    acceleration off or under a tracer or exporter."""
    return _dispatching() and _foldable(blk, eps)


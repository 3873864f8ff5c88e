"""Float32 CPU GEMMs and convolutions through oneDNN, with prepared weights.

PyTorch's CPU ``F.linear`` calls MKL, which takes its AVX2 path on non-Intel
processors, and its convolutions hand oneDNN plain weights that oneDNN
reorders into its blocked layout on every call. For the small products of a
routed backbone (a stage-3 node keeps 49 of 196 tokens at r = 0.25, 224²)
that per-call weight pass costs as much as the product itself. This module:

* :func:`linear`: at inference (no autograd) runs ``x @ W^T + b`` through
  oneDNN with ``W`` reordered once (``torch.ops.mkldnn._linear_pointwise``,
  the kernel TorchInductor's CPU backend uses); with autograd, through
  oneDNN's 1x1 convolution on a channels-last view (plain weights, AVX-512),
  and elsewhere through ``F.linear``;
* :func:`conv2d`: an ``nn.Conv2d`` at inference with its weight reordered
  once (``torch.ops.mkldnn._convolution_pointwise``), else the module itself;
* both keep their reordered weights in :func:`dit_mm.accel.cache.prepared`
  (as do the folded weights of :mod:`dit_mm.models.blocks` and the
  transposed taps of :mod:`dit_mm.accel.cpu.sparse_ops`).

With each weight reordered once, such products ran 1.2-3.5x faster than
through either plain path (AMD EPYC; per-call timings in ``docs/design.md``,
"GEMMs and convolutions through oneDNN").
Reordered weights are opaque oneDNN tensors: they are cached outside the
module (a deep copy or pickle of the model never sees them), keyed on the
parameter's storage and version, so ``load_state_dict``, optimiser steps and
moves invalidate them. ``DIT_MM_NO_PACKED=1`` turns the reordered path off.
"""
from __future__ import annotations

import os
import platform
from functools import cache
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import reference
from ..cache import prepared
from .strict import executor_unavailable


def onednn_applies(x: torch.Tensor) -> bool:
    """Whether :func:`linear` with autograd sends ``x`` to oneDNN's 1x1
    convolution: float32 CPU tensors of more than 20480 elements (below that
    PyTorch runs a 1x1 convolution of batch 1 through its own im2col path,
    slower than ``F.linear``)."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and x.numel() > 20480
            and torch.backends.mkldnn.is_available())


@cache
def packed_ops_available() -> bool:
    """Whether oneDNN's reordered-weight ops exist in this build and agree
    with ``F.linear`` / ``F.conv2d`` on a small case (checked once)."""
    if os.environ.get('DIT_MM_NO_PACKED') == '1':
        return False
    what = "oneDNN's reordered-weight ops"
    if not torch.backends.mkldnn.is_available():
        executor_unavailable(what, 'this torch build has no oneDNN')
        return False
    try:
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(5, 8, generator=g)
            w, b = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
            y = torch.ops.mkldnn._linear_pointwise(x, _pack_linear(w), b, 'none', [], '')
            conv = nn.Conv2d(8, 6, 2, stride=2)
            m = torch.randn(1, 8, 4, 6, generator=g).contiguous(memory_format=torch.channels_last)
            z = _packed_conv(conv, m, conv.weight, conv.bias)
            agree = (torch.allclose(y, F.linear(x, w, b), atol=1e-5)
                     and torch.allclose(z, conv(m), atol=1e-5))
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        executor_unavailable(what, f'{type(exc).__name__}: {str(exc).splitlines()[0][:300]}')
        return False
    if not agree:
        executor_unavailable(what, 'they disagree with F.linear / F.conv2d beyond 1e-5')
    return agree


def packed_applies(x: torch.Tensor) -> bool:
    """Whether :func:`linear` / :func:`conv2d` use reordered weights for
    ``x``: float32 CPU inference (no autograd) with the ops available, not
    under CPU autocast (whose ops choose their own dtype) and not under a
    tracer (FLOP counters and compilers read the plain ATen ops; a reordered
    weight cannot be a traced constant)."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled('cpu')
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and packed_ops_available())


#: :func:`linear` calls ``F.linear`` instead of the reordered oneDNN GEMM
#: when ``rows * weight.numel() <= PLAIN_MACS`` and the weight has at most
#: ``PLAIN_WEIGHT`` elements or there are at most 2 rows: a oneDNN call costs
#: ~16 us whatever its size, and MKL's small GEMMs beat it there (per-shape
#: timings in ``docs/design.md``, "GEMMs and convolutions through oneDNN").
PLAIN_MACS = 2 ** 19
PLAIN_WEIGHT = 2 ** 15


def plain_is_faster(rows: int, weight: torch.Tensor) -> bool:
    """Whether ``F.linear`` beats the reordered GEMM for ``rows`` rows."""
    n = weight.numel()
    return rows * n <= PLAIN_MACS and (n <= PLAIN_WEIGHT or rows <= 2)


@cache
def mkl_is_native() -> bool:
    """Whether ``F.linear`` runs MKL on an Intel processor (where MKL takes
    its own fastest kernels; on other vendors' processors it takes its AVX2
    path)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open('/proc/cpuinfo') as f:
            return any(line.startswith('vendor_id') and 'GenuineIntel' in line for line in f)
    except OSError:
        return 'intel' in platform.processor().lower()


def _pack_linear(weight: torch.Tensor) -> torch.Tensor:
    # the batch size is a layout hint; any row count gives the same values
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 64)


#: :func:`bucket_rows` pads packed row counts from this many rows up (at
#: least 2 rows a bucket): low enough that the stride-16 and stride-32
#: nodes of DiT-b2 at 512² (a few hundred to two thousand kept rows) repeat
#: their counts too. Unpadded, they built new oneDNN primitives at every
#: step and ran 4-6 % slower (AMD EPYC; ``docs/design.md``, "Skipped tokens
#: cost nothing at inference", the bullet on padded row counts).
BUCKET_FROM = 64

#: Where MKL runs natively, oneDNN beats it on bucketed packed rows only up
#: to this many channels on the narrow side of the GEMM: by about a quarter
#: at stride 4, while from stride 8 up the two are close and a whole
#: stride-8 node was no faster on oneDNN (Intel Xeon; timings in
#: ``docs/design.md``, "GEMMs and convolutions through oneDNN").
ONEDNN_PACKED_UP_TO = 64


#: Under autograd, :func:`linear` appends its bias to the weight as one more
#: input channel (and a column of ones to the input) when the input has at
#: most this many channels and the output at least 4x as many: oneDNN's
#: bias gradient, a reduction over the wide output, cost more than the
#: concatenations: the joined GEMM saves about a fifth of fc1's forward and
#: backward at stride 4 (Intel Xeon; ``docs/design.md``, "GEMMs and
#: convolutions through oneDNN").
BIAS_AS_INPUT_UP_TO = 128


def _bucket(rows: int) -> int:
    """1/32 to 1/64 of ``rows``, as a power of two."""
    return 1 << (rows.bit_length() - 6)


def bucket_rows(rows: int, x: torch.Tensor) -> int:
    """The row count, ``>= rows``, at which sparse training runs the packed
    token-wise layers of ``rows`` kept tokens of ``x``: rounded up to a
    multiple of :func:`_bucket` (at most 3 % more rows) under autograd,
    from :data:`BUCKET_FROM` rows up, where :func:`linear` then runs them on
    oneDNN (float32 CPU; where MKL runs natively, for stages of at most
    :data:`ONEDNN_PACKED_UP_TO` channels); else ``rows``.

    oneDNN builds a primitive per shape, so a count that changes at every
    step would build new ones at every step, or run on MKL (``rows_vary``),
    which is slower at these shapes. Bucketed counts repeat between steps
    (measured in ``docs/design.md``, "Skipped tokens cost nothing at
    inference", the bullet on padded row counts)."""
    if rows < BUCKET_FROM or not torch.is_grad_enabled() or not onednn_applies(x) \
            or (mkl_is_native() and x.shape[-1] > ONEDNN_PACKED_UP_TO):
        return rows
    step = _bucket(rows)
    return -(-rows // step) * step


def _bucketed(rows: int, weight: torch.Tensor) -> bool:
    """Whether ``rows`` is a count :func:`bucket_rows` pads to, for a GEMM
    with ``weight`` that oneDNN runs faster than native MKL."""
    return rows >= BUCKET_FROM and rows % _bucket(rows) == 0 \
        and min(weight.shape) <= ONEDNN_PACKED_UP_TO


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           owner: Optional[nn.Module] = None, key: str = 'linear',
           rows_vary: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, fast on float32 CPU tensors.

    Args:
        x: Input ``(..., C_in)``.
        weight: ``(C_out, C_in)``.
        bias: ``(C_out,)`` or None.
        owner: Module whose cache keeps the reordered ``weight`` under
            ``key`` (inference only); without it no weight is reordered.
        key: Cache key, unique per weight of ``owner``.
        rows_vary: The row count changes from call to call (the packed
            kept tokens of sparse training). oneDNN builds a convolution
            primitive per shape, so a new row count at every step pays
            that build on every call (``docs/design.md``, "GEMMs and
            convolutions through oneDNN"). Where MKL runs its
            native kernels (:func:`mkl_is_native`) these calls go to
            ``F.linear`` under autograd: no per-shape kernels, though slower
            than oneDNN at a fixed shape (see :func:`bucket_rows`). Elsewhere
            MKL's AVX2 path is the slower of the two (2.2x on an AMD EPYC)
            and they stay on oneDNN. Row counts
            padded by :func:`bucket_rows` repeat between steps and stay on
            oneDNN everywhere. No effect at inference.
    """
    if owner is not None and packed_applies(x):
        if plain_is_faster(x.numel() // max(x.shape[-1], 1), weight):
            return F.linear(x, weight, bias)
        packed = prepared(owner, key, _pack_linear, weight)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, 'none', [], '')
    if not onednn_applies(x):
        return F.linear(x, weight, bias)
    lead, c_in = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, c_in)
    m = rows.shape[0]
    if rows_vary and mkl_is_native() and not _bucketed(m, weight):
        return F.linear(x, weight, bias)
    if bias is not None and bias.requires_grad and torch.is_grad_enabled() \
            and c_in <= BIAS_AS_INPUT_UP_TO and weight.shape[0] >= 4 * c_in:
        # the bias as one more input channel: its gradient comes out of the
        # weight-gradient GEMM instead of a reduction over the wide output
        rows = torch.cat([rows, rows.new_ones(m, 1)], dim=1)
        weight, bias, c_in = torch.cat([weight, bias.unsqueeze(1)], dim=1), None, c_in + 1
    y = F.conv2d(rows.view(1, m, 1, c_in).permute(0, 3, 1, 2),
                 weight.view(weight.shape[0], c_in, 1, 1), bias)
    return y.permute(0, 2, 3, 1).reshape(*lead, weight.shape[0])


def linear_module(layer: nn.Linear, x: torch.Tensor, rows_vary: bool = False) -> torch.Tensor:
    """``layer(x)`` through :func:`linear`."""
    return linear(x, layer.weight, layer.bias, owner=layer, rows_vary=rows_vary)


def _conv_packable(conv: nn.Conv2d) -> bool:
    return conv.padding_mode == 'zeros' and not isinstance(conv.padding, str)


def _pack_conv(weight: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    # the input size is a layout hint; any map size gives the same values
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.detach().contiguous().to_mkldnn(), list(conv.padding), list(conv.stride),
        list(conv.dilation), conv.groups, [1, weight.shape[1] * conv.groups, 32, 32])


def _packed_conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor], key: str = 'conv',
                 gelu: bool = False) -> torch.Tensor:
    packed = prepared(conv, key, lambda w: _pack_conv(w, conv), weight)
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, list(conv.padding), list(conv.stride), list(conv.dilation),
        conv.groups, 'gelu' if gelu else 'none', [], 'none' if gelu else '')


def conv2d(conv: nn.Conv2d, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None, key: str = 'conv',
           gelu: bool = False) -> torch.Tensor:
    """``conv(x)``, or the same convolution with ``weight`` / ``bias`` in
    place of the module's (e.g. folded ones), with the weight reordered once
    at float32 CPU inference; ``gelu=True`` applies the exact GELU to the
    result, fused into the convolution there (one pass and one buffer fewer:
    about half the time of the conv and a separate GELU on a stride-4 hidden
    map at 512²; ``docs/design.md``, "GEMMs and convolutions through
    oneDNN").

    Args:
        conv: The convolution (its stride, padding, dilation and groups).
        x: Input map ``(B, C, H, W)``, best channels-last.
        weight: Weight to use instead of ``conv.weight``; its cache entry is
            ``key``, which must then differ from the default.
        bias: Bias to use with ``weight``.
        key: Cache key of the reordered weight.
        gelu: Apply the exact (erf) GELU to the output.
    """
    if weight is None:
        weight, bias = conv.weight, conv.bias
    if packed_applies(x) and _conv_packable(conv):
        return _packed_conv(conv, x, weight, bias, key, gelu)
    return reference.conv2d(conv, x, weight, bias, gelu)

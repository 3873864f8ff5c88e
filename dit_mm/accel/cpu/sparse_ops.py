"""Depthwise 3x3 conv (+ GELU) evaluated at the kept tokens only.

PVTv2's MLP runs a 3x3 depthwise conv on its hidden map (8x the channels at
strides 4 and 8). Run densely, it costs the same whether 100 % or 25 % of the
tokens are kept, and it is memory-bound: at 512x512, batch 4, it was a quarter
of the packed backbone's time (``docs/design.md``, "Skipped tokens cost
nothing at inference"). This module evaluates it on the packed hidden
rows of the kept tokens only, through a neighbour table (the GELU that
follows then also runs on kept rows only):

* :func:`neighbour_table` maps every kept token to the packed rows of its 3x3
  neighbours (``-1`` where the neighbour is skipped or outside the image:
  both read as zero, as in the dense path);
* :func:`sparse_dwconv_gelu` runs a small C++ kernel (compiled once per
  machine with ``torch.utils.cpp_extension.load_inline``, parallel through
  ``at::parallel_for``) on float32 CPU tensors. Under autograd (sparse
  training) it is an autograd function: the forward is the same kernel
  with GELU, keeping only its input; the backward recomputes the conv,
  forms the GELU's and the taps' gradients in one pass, and runs the same
  kernel with the taps mirrored for the input gradient;
* :func:`dwconv_gelu_map` runs that autograd function on every token of
  a map: the dense training paths (static, full grid, masked routing) use
  it for their MLPs' conv + GELU (:data:`FUSED_TRAINING`). Elsewhere
  (other devices or dtypes, no compiler, or ``DIT_MM_NO_EXT=1``) the
  packed blocks fall back to the dense conv on a zero-filled hidden map,
  and the dense paths to the conv and PyTorch's GELU;
* :func:`write_rows` writes packed rows back into a token map, with the same
  kernel build (4-6x faster than ``index_copy_``, ``docs/design.md``),
  else ``index_copy_``.

The C++ sources are ``dit_mm/accel/cpu/csrc/sparse_kernels.cpp`` and, in the same
build, ``packed_stage.cpp`` (:mod:`dit_mm.accel.cpu.native_stage`). The build is named
after a hash of the sources, so an edited source is compiled anew.
"""
from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ...utils.profiling import scope
from .. import reference
from ..cache import prepared
from .strict import executor_unavailable

#: C++ sources of the extension in ``dit_mm/accel/cpu/csrc``, in this order (the stage
#: program calls the kernels).
SOURCES = ('sparse_kernels.cpp', 'packed_stage.cpp')
_FUNCTIONS = ['dwconv', 'dwconv_weight_grad', 'dwconv_gelu_backward', 'neighbours',
              'scatter_rows', 'held_norm_forward', 'held_norm_backward', 'packed_stage']
_CFLAGS = ['-O3', '-march=native', '-fopenmp']

#: Whether training runs the fused conv + GELU kernel (:class:`_SparseDWConvGELU`):
#: on the whole map in the dense training paths, on the kept rows in sparse
#: training. ``DIT_MM_NO_FUSED_TRAINING=1`` (read at import), or setting this
#: to ``False``, runs the conv (oneDNN, or :class:`_SparseDWConv`) and then
#: PyTorch's GELU instead: the A/B of ``docs/benchmarks.md``, "The fused
#: depthwise-conv + GELU training kernel".
FUSED_TRAINING = os.environ.get('DIT_MM_NO_FUSED_TRAINING') != '1'

_lock = threading.Lock()
_ext = None
_ext_failed = False


def _extension():
    """The compiled kernel, or ``None`` if it cannot be built here."""
    global _ext, _ext_failed
    if _ext is not None or _ext_failed:
        return _ext
    if os.environ.get('DIT_MM_NO_EXT') == '1':
        _ext_failed = True
        return None
    with _lock:
        if _ext is None and not _ext_failed:
            try:
                from torch.utils.cpp_extension import load_inline
                # -fopenmp: at::parallel_for is a '#pragma omp parallel' in
                # the header, so without it the kernel ran on one thread (the
                # process already holds torch's libgomp, which this reuses)
                sources = [(Path(__file__).parent / 'csrc' / f).read_text() for f in SOURCES]
                _ext = load_inline(name=_build_name(sources), cpp_sources=sources,
                                   functions=_FUNCTIONS, extra_cflags=_CFLAGS,
                                   extra_ldflags=['-fopenmp'], verbose=False)
            except Exception as exc:  # no compiler, no headers: fall back, but say so
                _ext_failed = True
                executor_unavailable('the C++ extension (the sparse depthwise kernel and '
                                     'the stage program)', str(exc).splitlines()[0][:300])
    return _ext


def _build_name(sources) -> str:
    """Extension name: a hash of the sources and flags (an edited source is
    rebuilt, not loaded stale from torch's extension cache) and of the CPU."""
    import hashlib
    digest = hashlib.sha1('\0'.join([*sources, *_FUNCTIONS, *_CFLAGS]).encode()).hexdigest()
    return f'dit_mm_ops_{digest[:10]}_{_cpu_tag()}'


def _cpu_tag() -> str:
    """Short hash of this CPU's model and flags: the kernel is built with
    ``-march=native``, so a cached build must not be reused on another CPU."""
    import hashlib
    import platform
    info = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            info += ''.join(ln for ln in f if ln.startswith(('model name', 'flags')))
    except OSError:
        pass
    return hashlib.sha1(info.encode()).hexdigest()[:8]


def extension_available() -> bool:
    """Whether the compiled kernel is (or can be) used."""
    return _extension() is not None


def neighbour_table(idx: torch.Tensor, batch: int, hw: Tuple[int, int]) -> torch.Tensor:
    """Packed-row indices ``(K, 9)`` of the 3x3 neighbours of the kept tokens.

    Args:
        idx: Sorted flat positions ``b * H * W + y * W + x`` of the ``K`` kept
            tokens (their packed order).
        batch: Batch size.
        hw: ``(H, W)``.

    Returns:
        ``int64 (K, 9)``, row-major taps ``(dy, dx)`` in ``{-1, 0, 1}^2``;
        ``-1`` where the neighbour is skipped or outside the image.
    """
    if idx.device.type == 'cpu' and _extension() is not None:
        return _extension().neighbours(idx.contiguous(), batch, hw[0], hw[1])
    return reference.neighbour_table(idx, batch, hw)


def training_dwconv_applies(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether :func:`dwconv_gelu_map` runs ``GELU(conv(x))`` for a map ``x``
    under autograd: PVTv2's depthwise 3x3 conv (stride 1, zero padding 1),
    float32 CPU, the kernel built."""
    return (FUSED_TRAINING and torch.is_grad_enabled() and kernel_applies(x) and x.dim() == 4
            and conv.groups == conv.in_channels == conv.out_channels == x.shape[1]
            and tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (1, 1) and tuple(conv.dilation) == (1, 1)
            and conv.padding_mode == 'zeros')


@functools.lru_cache(maxsize=32)
def _grid_table(batch: int, h: int, w: int) -> torch.Tensor:
    """:func:`neighbour_table` of every token of a ``(batch, h, w)`` map."""
    return neighbour_table(torch.arange(batch * h * w), batch, (h, w))


def dwconv_gelu_map(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``GELU(conv(x))`` on a whole map ``(B, C, H, W)`` (best channels-last)
    through the fused training kernel (:class:`_SparseDWConvGELU`, every
    token kept); the result is a channels-last ``(B, C, H, W)``.

    The dense training path (full grid, masked routing, the static path)
    runs its MLPs' conv + GELU here: forward and backward it is 6-14 %
    faster than oneDNN's conv and PyTorch's GELU on the stride-4 hidden
    maps, and it keeps one hidden map less for the backward
    (``docs/design.md``, "Skipped tokens cost nothing at inference"; whole
    steps: ``docs/benchmarks.md``, "The fused depthwise-conv + GELU training
    kernel"). Check :func:`training_dwconv_applies` first."""
    B, C, H, W = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(B * H * W, C)
    y = _SparseDWConvGELU.apply(rows, _grid_table(B, H, W), conv.weight, conv.bias)
    return y.view(B, H, W, C).permute(0, 3, 1, 2)


def kernel_applies(h: torch.Tensor) -> bool:
    """Whether :func:`sparse_dwconv_gelu` can run on ``h``: float32 CPU
    tensors with the kernel built, at inference or under autograd."""
    return h.device.type == 'cpu' and h.dtype == torch.float32 and _extension() is not None


def inference_kernel_applies(h: torch.Tensor) -> bool:
    """:func:`kernel_applies` without autograd (the in-place kernels: row
    writes, the stage program)."""
    return kernel_applies(h) and not torch.is_grad_enabled()


def write_rows(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.index_copy_(0, idx, src)`` for ``dst (N, C)``, ``src (K, C)``
    and distinct row indices ``idx`` (as ``nonzero`` gives them): through the
    kernel for contiguous float32 CPU tensors without autograd. Returns
    ``dst``."""
    if (inference_kernel_applies(src) and dst.dtype == torch.float32 and dst.device.type == 'cpu'
            and dst.is_contiguous() and src.is_contiguous() and idx.dtype == torch.long):
        return _extension().scatter_rows(dst, idx.contiguous(), src)
    return reference.write_rows(dst, idx, src)


def _taps(weight: torch.Tensor, bias: Optional[torch.Tensor]
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Depthwise weights ``(C, 1, 3, 3)`` as contiguous taps ``(9, C)``, and
    the bias (zeros if there is none)."""
    taps = weight.reshape(weight.shape[0], 9).t().contiguous()
    return taps, (bias if bias is not None else weight.new_zeros(weight.shape[0])).contiguous()


def sparse_dwconv_gelu(h: torch.Tensor, nbr: torch.Tensor, conv: torch.nn.Conv2d,
                       gelu: bool = True, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``GELU(dwconv3x3(hidden))`` at the kept tokens (C++ kernel; check
    :func:`kernel_applies` first). Under autograd, differentiable in ``h``
    and the conv's weight and bias, with the exact GELU.

    Args:
        h: Packed hidden rows ``(K, C)`` of the kept tokens.
        nbr: Neighbour table from :func:`neighbour_table`.
        conv: The depthwise ``Conv2d(C, C, 3, padding=1, groups=C)``.
        gelu: Apply the (erf) GELU after the conv, inside the kernel (a
            rational erf, within 3.6e-7 of the exact one).
        out: Optional ``(K, C)`` buffer for the result (overwritten), so that
            the blocks of a stage reuse one buffer; not used under autograd.
    """
    if torch.is_grad_enabled():  # sparse training: out is not reused (autograd keeps h)
        with scope('dit::sparse_dwconv'):
            if gelu and FUSED_TRAINING:
                return _SparseDWConvGELU.apply(h, nbr, conv.weight, conv.bias)
            z = _SparseDWConv.apply(h, nbr, conv.weight, conv.bias)
        return F.gelu(z) if gelu else z
    weight, bias = prepared(conv, 'taps', _taps, conv.weight, conv.bias)
    if out is None or out.shape != h.shape:
        out = torch.empty_like(h)
    with scope('dit::sparse_dwconv'):
        return _extension().dwconv(h.contiguous(), nbr, weight, bias, out, gelu)


def _input_grad(gz: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The conv's input gradient from its output gradient ``gz (K, C)``: the
    same kernel with the taps mirrored (see :class:`_SparseDWConv`)."""
    C = gz.shape[1]
    mirrored = weight.detach().reshape(C, 9).flip(1).t().contiguous()
    return _extension().dwconv(gz, nbr, mirrored, gz.new_zeros(C), torch.empty_like(gz), False)


class _SparseDWConv(torch.autograd.Function):
    """``dwconv3x3`` at the kept tokens (no GELU) with its backward in C++:
    ``dh = dwconv(dz)`` with the taps mirrored (tap ``t`` of row ``k`` reads
    row ``j`` exactly when tap ``8 - t`` of row ``j`` reads row ``k``: both
    are kept tokens), ``dw[t] = sum_k dz[k] * h[nbr[k, t]]``, ``db = sum_k dz[k]``."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        h = h.contiguous()
        taps, b = _taps(weight.detach(), None if bias is None else bias.detach())
        ctx.save_for_backward(h, nbr, weight)
        ctx.has_bias = bias is not None
        return _extension().dwconv(h, nbr, taps, b, torch.empty_like(h), False)

    @staticmethod
    @once_differentiable  # the C++ backward is not itself differentiable
    def backward(ctx, gz: torch.Tensor):
        h, nbr, weight = ctx.saved_tensors
        gz = gz.contiguous()
        gh = gw = gb = None
        if ctx.needs_input_grad[0]:
            gh = _input_grad(gz, nbr, weight)
        if ctx.needs_input_grad[2]:
            chunks = max(1, min(h.shape[0], 4 * torch.get_num_threads()))
            gw = _extension().dwconv_weight_grad(gz, h, nbr, chunks).t().reshape(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = gz.sum(0)
        return gh, None, gw, gb


class _SparseDWConvGELU(torch.autograd.Function):
    """``GELU(dwconv3x3(h))`` at the kept tokens, forward and backward in
    C++. The forward is the inference kernel (rational erf) and saves only
    ``h``; the backward recomputes the conv output row by row, forms
    ``dz = dy * GELU'(z)`` and the taps' and bias gradients in one pass
    over the neighbour rows, then ``dh = dwconv(dz)`` with the taps mirrored
    (see :class:`_SparseDWConv`). Against the conv output kept for a
    separate GELU, this writes and reads one hidden map less in the forward
    and keeps one less for the backward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        h = h.contiguous()
        taps, b = _taps(weight.detach(), None if bias is None else bias.detach())
        ctx.save_for_backward(h, nbr, weight, taps, b)
        ctx.has_bias = bias is not None
        return _extension().dwconv(h, nbr, taps, b, torch.empty_like(h), True)

    @staticmethod
    @once_differentiable  # the C++ backward is not itself differentiable
    def backward(ctx, gy: torch.Tensor):
        h, nbr, weight, taps, b = ctx.saved_tensors
        chunks = max(1, min(h.shape[0], 4 * torch.get_num_threads()))
        gz, gwb = _extension().dwconv_gelu_backward(gy.contiguous(), h, nbr, taps, b, chunks)
        gh = gw = gb = None
        if ctx.needs_input_grad[0]:
            gh = _input_grad(gz, nbr, weight)
        if ctx.needs_input_grad[2]:
            gw = gwb[:9].t().reshape(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = gwb[9].clone()
        return gh, None, gw, gb

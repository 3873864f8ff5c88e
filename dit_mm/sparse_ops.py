"""Depthwise 3x3 conv (+ GELU) evaluated at the kept tokens only.

PVTv2's MLP runs a 3x3 depthwise conv on its hidden map (8x the channels at
strides 4 and 8). Run densely, it costs the same whether 100 % or 25 % of the
tokens are kept, and it is memory-bound: at 512x512, batch 4, it was a quarter
of the packed backbone's time. This module evaluates it on the packed hidden
rows of the kept tokens only, through a neighbour table (the GELU that
follows then also runs on kept rows only):

* :func:`neighbour_table` maps every kept token to the packed rows of its 3x3
  neighbours (``-1`` where the neighbour is skipped or outside the image:
  both read as zero, as in the dense path);
* :func:`sparse_dwconv_gelu` runs a small C++ kernel (compiled once per
  machine with ``torch.utils.cpp_extension.load_inline``, parallel through
  ``at::parallel_for``) on float32 CPU tensors at inference. Elsewhere (other
  devices or dtypes, autograd, no compiler, or ``DIT_MM_NO_EXT=1``) the
  packed blocks fall back to the dense conv on a zero-filled hidden map;
* :func:`write_rows` writes packed rows back into a token map, with the same
  kernel build (4-6x faster than ``index_copy_`` here), else ``index_copy_``.
"""
from __future__ import annotations

import os
import threading
from typing import Optional, Tuple

import torch
from mmengine.logging import print_log

from .onednn import prepared
from .profiling import scope

_CPP = r'''
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>

// erf(x) = x * P(x^2) / Q(x^2) on [-4, 4], +-1 beyond (max abs error
// 3.6e-7 against double-precision erf). gelu_vec below is the same formula
// on vectors; this scalar one serves channels beyond the last full vector.
static inline float erf_rational(float x) {
  x = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

// Vector helpers: AVX-512 or AVX2+FMA, whichever -march=native enables.
#if defined(__AVX512F__)
#include <immintrin.h>
#define VW 16
typedef __m512 vec;
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vset(float x) { return _mm512_set1_ps(x); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
#define DIT_VEC 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VW 8
typedef __m256 vec;
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vset(float x) { return _mm256_set1_ps(x); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
#define DIT_VEC 1
#endif

#ifdef DIT_VEC
// GELU with erf_rational, VW lanes at a time.
static inline vec gelu_vec(vec v) {
  vec x = vmul(v, vset(0.70710678118654752f));
  x = vmax(vmin(x, vset(4.0f)), vset(-4.0f));
  const vec x2 = vmul(x, x);
  vec p = vset(-2.72614225801306e-10f);
  p = vfma(p, x2, vset(2.77068142495902e-08f));
  p = vfma(p, x2, vset(-2.10102402082508e-06f));
  p = vfma(p, x2, vset(-5.69250639462346e-05f));
  p = vfma(p, x2, vset(-7.34990630326855e-04f));
  p = vfma(p, x2, vset(-2.95459980854025e-03f));
  p = vfma(p, x2, vset(-1.60960333262415e-02f));
  vec q = vset(-1.45660718464996e-05f);
  q = vfma(q, x2, vset(-2.13374055278905e-04f));
  q = vfma(q, x2, vset(-1.68282697438203e-03f));
  q = vfma(q, x2, vset(-7.37332916720468e-03f));
  q = vfma(q, x2, vset(-1.42647390514189e-02f));
  const vec half = vmul(v, vset(0.5f));
  return vfma(half, vdiv(vmul(x, p), q), half);
}
#endif

static inline float gelu_scalar(float v) {
  return 0.5f * v * (1.0f + erf_rational(v * 0.70710678118654752f));
}

// out[k] = bias + sum_t w[t] * h[nbr[k, t]]  (rows with nbr = -1 read as zero),
// then GELU(x) = x (1 + erf(x / sqrt 2)) / 2 if `gelu`, with erf_rational.
// Per row, the taps that are present are listed once; then 4 vectors of
// channels at a time are accumulated over them in registers, GELU'd and
// stored once (a plain loop over taps re-read and re-wrote the output row
// per tap: 1.6x slower at 512x512, batch 4).
// out: a (K, C) float buffer to write into (reused across blocks: a fresh
// buffer of this size is page-faulted in on every call).
torch::Tensor dwconv(torch::Tensor h, torch::Tensor nbr, torch::Tensor w, torch::Tensor b,
                     torch::Tensor out, bool gelu) {
  TORCH_CHECK(h.is_contiguous() && nbr.is_contiguous() && w.is_contiguous() && b.is_contiguous());
  const int64_t K = h.size(0), C = h.size(1);
  TORCH_CHECK(out.is_contiguous() && out.size(0) == K && out.size(1) == C &&
              out.scalar_type() == h.scalar_type() && nbr.size(0) == K &&
              nbr.size(1) == 9 && w.numel() == 9 * C && b.numel() == C);
  const float* __restrict__ hp = h.data_ptr<float>();
  const int64_t* __restrict__ np = nbr.data_ptr<int64_t>();
  const float* __restrict__ wp = w.data_ptr<float>();
  const float* __restrict__ bp = b.data_ptr<float>();
  float* __restrict__ op = out.data_ptr<float>();
  at::parallel_for(0, K, 16, [&](int64_t begin, int64_t end) {
    const float* srcs[9];
    const float* wts[9];
    for (int64_t k = begin; k < end; ++k) {
      int n = 0;
      for (int t = 0; t < 9; ++t) {
        const int64_t j = np[k * 9 + t];
        if (j >= 0) { srcs[n] = hp + j * C; wts[n] = wp + t * C; ++n; }
      }
      float* __restrict__ o = op + k * C;
      int64_t c = 0;
#ifdef DIT_VEC
      for (; c + 4 * VW <= C; c += 4 * VW) {
        vec a0 = vload(bp + c), a1 = vload(bp + c + VW);
        vec a2 = vload(bp + c + 2 * VW), a3 = vload(bp + c + 3 * VW);
        for (int i = 0; i < n; ++i) {
          const float* s = srcs[i] + c;
          const float* wt = wts[i] + c;
          a0 = vfma(vload(wt), vload(s), a0);
          a1 = vfma(vload(wt + VW), vload(s + VW), a1);
          a2 = vfma(vload(wt + 2 * VW), vload(s + 2 * VW), a2);
          a3 = vfma(vload(wt + 3 * VW), vload(s + 3 * VW), a3);
        }
        if (gelu) { a0 = gelu_vec(a0); a1 = gelu_vec(a1); a2 = gelu_vec(a2); a3 = gelu_vec(a3); }
        vstore(o + c, a0); vstore(o + c + VW, a1);
        vstore(o + c + 2 * VW, a2); vstore(o + c + 3 * VW, a3);
      }
#endif
      for (; c < C; ++c) {
        float acc = bp[c];
        for (int i = 0; i < n; ++i) acc += wts[i][c] * srcs[i][c];
        o[c] = gelu ? gelu_scalar(acc) : acc;
      }
    }
  });
  return out;
}

// dst[idx[k]] = src[k] for the K rows of src (dst: (N, C), src: (K, C)).
torch::Tensor scatter_rows(torch::Tensor dst, torch::Tensor idx, torch::Tensor src) {
  TORCH_CHECK(dst.is_contiguous() && idx.is_contiguous() && src.is_contiguous() &&
              dst.dim() == 2 && src.dim() == 2 && dst.size(1) == src.size(1) &&
              idx.numel() == src.size(0) && idx.scalar_type() == torch::kLong &&
              dst.scalar_type() == torch::kFloat && src.scalar_type() == torch::kFloat);
  const int64_t K = src.size(0), C = src.size(1), N = dst.size(0);
  const int64_t* __restrict__ ip = idx.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) TORCH_CHECK(ip[k] >= 0 && ip[k] < N, "row index out of range");
  const float* __restrict__ sp = src.data_ptr<float>();
  float* __restrict__ dp = dst.data_ptr<float>();
  at::parallel_for(0, K, 2048 / (C + 1) + 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      std::memcpy(dp + ip[k] * C, sp + k * C, C * sizeof(float));
  });
  return dst;
}

// Packed rows of the 3x3 neighbours of the kept tokens (see neighbour_table).
torch::Tensor neighbours(torch::Tensor idx, int64_t batch, int64_t H, int64_t W) {
  TORCH_CHECK(idx.is_contiguous() && idx.scalar_type() == torch::kLong);
  const int64_t K = idx.size(0), n = H * W;
  auto packed = torch::full({batch * n}, -1, idx.options());
  auto out = torch::empty({K, 9}, idx.options());
  const int64_t* __restrict__ ip = idx.data_ptr<int64_t>();
  int64_t* __restrict__ pp = packed.data_ptr<int64_t>();
  int64_t* __restrict__ op = out.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(ip[k] >= 0 && ip[k] < batch * n, "token index out of range");
    pp[ip[k]] = k;
  }
  at::parallel_for(0, K, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i = ip[k], base = (i / n) * n, y = (i % n) / W, x = i % W;
      int64_t* __restrict__ o = op + k * 9;
      for (int64_t dy = -1; dy <= 1; ++dy)
        for (int64_t dx = -1; dx <= 1; ++dx) {
          const int64_t yy = y + dy, xx = x + dx;
          const bool inside = yy >= 0 && yy < H && xx >= 0 && xx < W;
          *o++ = inside ? pp[base + yy * W + xx] : -1;
        }
    }
  });
  return out;
}
'''

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
                _ext = load_inline(name=f'dit_mm_sparse_ops_v10_{_cpu_tag()}', cpp_sources=_CPP,
                                   functions=['dwconv', 'neighbours', 'scatter_rows'],
                                   extra_cflags=['-O3', '-march=native', '-fopenmp'],
                                   extra_ldflags=['-fopenmp'], verbose=False)
            except Exception as exc:  # no compiler, no headers: fall back, but say so
                _ext_failed = True
                print_log(f'dit_mm: sparse depthwise-conv kernel unavailable ({exc}); '
                          'using the PyTorch fallback', logger='current', level=30)
    return _ext


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
    return neighbour_table_reference(idx, batch, hw)


def neighbour_table_reference(idx: torch.Tensor, batch: int, hw: Tuple[int, int]
                              ) -> torch.Tensor:
    """:func:`neighbour_table` in PyTorch ops (any device; the C++ version
    is one call instead of ~60 small ops)."""
    H, W = hw
    n = H * W
    packed = torch.full((batch * n,), -1, dtype=torch.long, device=idx.device)
    packed[idx] = torch.arange(idx.numel(), device=idx.device)
    b, rest = idx // n, idx % n
    y, x = rest // W, rest % W
    taps = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            yy, xx = y + dy, x + dx
            inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            flat = b * n + yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)
            taps.append(torch.where(inside, packed[flat], torch.full_like(flat, -1)))
    return torch.stack(taps, dim=1).contiguous()


def kernel_applies(h: torch.Tensor) -> bool:
    """Whether :func:`sparse_dwconv_gelu` can run on ``h``: float32 CPU
    inference (no autograd) with the kernel built."""
    return (h.device.type == 'cpu' and h.dtype == torch.float32
            and not torch.is_grad_enabled() and _extension() is not None)


def write_rows(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.index_copy_(0, idx, src)`` for ``dst (N, C)``, ``src (K, C)``
    and distinct row indices ``idx`` (as ``nonzero`` gives them): through the
    kernel for contiguous float32 CPU tensors without autograd. Returns
    ``dst``."""
    if (kernel_applies(src) and dst.dtype == torch.float32 and dst.device.type == 'cpu'
            and dst.is_contiguous() and src.is_contiguous() and idx.dtype == torch.long):
        return _extension().scatter_rows(dst, idx.contiguous(), src)
    return dst.index_copy_(0, idx, src)


def _taps(weight: torch.Tensor, bias: Optional[torch.Tensor]
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Depthwise weights ``(C, 1, 3, 3)`` as contiguous taps ``(9, C)``, and
    the bias (zeros if there is none)."""
    taps = weight.reshape(weight.shape[0], 9).t().contiguous()
    return taps, (bias if bias is not None else weight.new_zeros(weight.shape[0])).contiguous()


def sparse_dwconv_gelu(h: torch.Tensor, nbr: torch.Tensor, conv: torch.nn.Conv2d,
                       gelu: bool = True, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``GELU(dwconv3x3(hidden))`` at the kept tokens (C++ kernel; check
    :func:`kernel_applies` first).

    Args:
        h: Packed hidden rows ``(K, C)`` of the kept tokens.
        nbr: Neighbour table from :func:`neighbour_table`.
        conv: The depthwise ``Conv2d(C, C, 3, padding=1, groups=C)``.
        gelu: Apply the (erf) GELU after the conv, inside the kernel (a
            rational erf, within 3.6e-7 of the exact one).
        out: Optional ``(K, C)`` buffer for the result (overwritten), so that
            the blocks of a stage reuse one buffer.
    """
    weight, bias = prepared(conv, 'taps', _taps, conv.weight, conv.bias)
    if out is None or out.shape != h.shape:
        out = torch.empty_like(h)
    with scope('dit::sparse_dwconv'):
        return _extension().dwconv(h.contiguous(), nbr, weight, bias, out, gelu)

// Kernels of the packed path (dit_mm/accel/cpu/sparse_ops.py): sparse 3x3 depthwise
// conv + GELU and the gradient of its taps, row scatter, neighbour table; and of the
// masked training path (dit_mm/accel/cpu/masked_ops.py): a node's final norm with its
// held rows. Built once per machine by
// torch.utils.cpp_extension.load_inline, together with packed_stage.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
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
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vround(vec a) {
  return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vec vpow2i(vec n) {  // 2^n for integral n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
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
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vround(vec a) {
  return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vec vpow2i(vec n) {  // 2^n for integral n in [-126, 127]
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#define DIT_VEC 1
#endif

#ifdef DIT_VEC
// erf_rational(v / sqrt 2), VW lanes at a time.
static inline vec erf_vec(vec v) {
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
  return vdiv(vmul(x, p), q);
}

// GELU with erf_rational, VW lanes at a time.
static inline vec gelu_vec(vec v) {
  const vec half = vmul(v, vset(0.5f));
  return vfma(half, erf_vec(v), half);
}

// exp(v) for v in [-87, 0] (the GELU derivative's Gaussian): 2^n e^r with
// |r| <= ln2 / 2 and a degree-6 Taylor polynomial (truncation error < 1.3e-7).
static inline vec exp_neg_vec(vec v) {
  v = vmax(v, vset(-87.0f));
  const vec n = vround(vmul(v, vset(1.44269504088896341f)));
  const vec r = vfma(n, vset(-1.42860676533018e-6f), vfma(n, vset(-0.693145751953125f), v));
  vec p = vset(1.0f / 720);
  p = vfma(p, r, vset(1.0f / 120));
  p = vfma(p, r, vset(1.0f / 24));
  p = vfma(p, r, vset(1.0f / 6));
  p = vfma(p, r, vset(0.5f));
  p = vfma(p, r, vset(1.0f));
  p = vfma(p, r, vset(1.0f));
  return vmul(p, vpow2i(n));
}

// GELU'(v) = Phi(v) + v phi(v), with erf_rational for Phi (as gelu_vec).
static inline vec gelu_grad_vec(vec v) {
  const vec cdf = vfma(vset(0.5f), erf_vec(v), vset(0.5f));
  const vec pdf = vmul(vset(0.39894228040143268f), exp_neg_vec(vmul(vmul(v, v), vset(-0.5f))));
  return vfma(v, pdf, cdf);
}
#endif

static inline float gelu_grad_scalar(float v) {
  return 0.5f * (1.0f + erf_rational(v * 0.70710678118654752f)) +
         v * 0.39894228040143268f * std::exp(-0.5f * v * v);
}

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

// Gradient of the depthwise taps for sparse training (the backward of `dwconv`
// without GELU): gw[t, c] = sum_k gz[k, c] * h[nbr[k, t], c], rows with
// nbr = -1 adding nothing. Each of `chunks` row ranges sums into its own
// (9, C) slice of the result, which the caller adds up (no atomics, and the
// sum does not depend on how many threads ran).
torch::Tensor dwconv_weight_grad(torch::Tensor gz, torch::Tensor h, torch::Tensor nbr,
                                 int64_t chunks) {
  TORCH_CHECK(gz.is_contiguous() && h.is_contiguous() && nbr.is_contiguous());
  const int64_t K = gz.size(0), C = gz.size(1);
  TORCH_CHECK(h.size(1) == C && nbr.size(0) == K && nbr.size(1) == 9 && chunks >= 1 &&
              gz.scalar_type() == torch::kFloat && h.scalar_type() == torch::kFloat &&
              nbr.scalar_type() == torch::kLong);
  auto partial = torch::zeros({chunks, 9, C}, gz.options());
  const float* __restrict__ gp = gz.data_ptr<float>();
  const float* __restrict__ hp = h.data_ptr<float>();
  const int64_t* __restrict__ np = nbr.data_ptr<int64_t>();
  float* __restrict__ pp = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      float* __restrict__ acc = pp + ch * 9 * C;
      for (int64_t k = K * ch / chunks; k < K * (ch + 1) / chunks; ++k) {
        const float* __restrict__ g = gp + k * C;
        for (int t = 0; t < 9; ++t) {
          const int64_t j = np[k * 9 + t];
          if (j < 0) continue;
          const float* __restrict__ s = hp + j * C;
          float* __restrict__ a = acc + t * C;
          for (int64_t c = 0; c < C; ++c) a[c] += g[c] * s[c];
        }
      }
    }
  });
  return partial.sum(0);
}

// Backward of GELU(dwconv(h)) (training, dense or sparse): the conv output
// z is recomputed row by row from h (not stored by the forward), then
// gz = gy * GELU'(z) is written out, and the taps' and bias gradients are
// accumulated from the same neighbour rows while they are in cache:
// partial[ch, t, c] += gz[k, c] * h[nbr[k, t], c] (t < 9), partial[ch, 9, c]
// += gz[k, c], one (10, C) slice per chunk of rows, which the caller adds
// up. The input gradient is then `dwconv(gz)` with the taps mirrored.
std::vector<torch::Tensor> dwconv_gelu_backward(torch::Tensor gy, torch::Tensor h,
                                                torch::Tensor nbr, torch::Tensor w,
                                                torch::Tensor b, int64_t chunks) {
  TORCH_CHECK(gy.is_contiguous() && h.is_contiguous() && nbr.is_contiguous() &&
              w.is_contiguous() && b.is_contiguous());
  const int64_t K = h.size(0), C = h.size(1);
  TORCH_CHECK(gy.size(0) == K && gy.size(1) == C && nbr.size(0) == K && nbr.size(1) == 9 &&
              w.numel() == 9 * C && b.numel() == C && chunks >= 1 &&
              gy.scalar_type() == torch::kFloat && h.scalar_type() == torch::kFloat &&
              nbr.scalar_type() == torch::kLong);
  auto gz = torch::empty_like(h);
  auto partial = torch::zeros({chunks, 10, C}, h.options());
  const float* __restrict__ gyp = gy.data_ptr<float>();
  const float* __restrict__ hp = h.data_ptr<float>();
  const int64_t* __restrict__ np = nbr.data_ptr<int64_t>();
  const float* __restrict__ wp = w.data_ptr<float>();
  const float* __restrict__ bp = b.data_ptr<float>();
  float* __restrict__ gzp = gz.data_ptr<float>();
  float* __restrict__ pp = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const float* srcs[9];
    const float* wts[9];
    float* accs[9];
    for (int64_t ch = begin; ch < end; ++ch) {
      float* __restrict__ acc = pp + ch * 10 * C;
      float* __restrict__ gb = acc + 9 * C;
      for (int64_t k = K * ch / chunks; k < K * (ch + 1) / chunks; ++k) {
        int n = 0;
        for (int t = 0; t < 9; ++t) {
          const int64_t j = np[k * 9 + t];
          if (j >= 0) { srcs[n] = hp + j * C; wts[n] = wp + t * C; accs[n] = acc + t * C; ++n; }
        }
        const float* __restrict__ g = gyp + k * C;
        float* __restrict__ o = gzp + k * C;
        int64_t c = 0;
#ifdef DIT_VEC
        for (; c + 2 * VW <= C; c += 2 * VW) {
          vec a0 = vload(bp + c), a1 = vload(bp + c + VW);
          for (int i = 0; i < n; ++i) {
            a0 = vfma(vload(wts[i] + c), vload(srcs[i] + c), a0);
            a1 = vfma(vload(wts[i] + c + VW), vload(srcs[i] + c + VW), a1);
          }
          a0 = vmul(vload(g + c), gelu_grad_vec(a0));
          a1 = vmul(vload(g + c + VW), gelu_grad_vec(a1));
          vstore(o + c, a0); vstore(o + c + VW, a1);
          for (int i = 0; i < n; ++i) {
            float* a = accs[i] + c;
            vstore(a, vfma(a0, vload(srcs[i] + c), vload(a)));
            vstore(a + VW, vfma(a1, vload(srcs[i] + c + VW), vload(a + VW)));
          }
          vstore(gb + c, vadd(vload(gb + c), a0));
          vstore(gb + c + VW, vadd(vload(gb + c + VW), a1));
        }
#endif
        for (; c < C; ++c) {
          float z = bp[c];
          for (int i = 0; i < n; ++i) z += wts[i][c] * srcs[i][c];
          const float d = g[c] * gelu_grad_scalar(z);
          o[c] = d;
          for (int i = 0; i < n; ++i) accs[i][c] += d * srcs[i][c];
          gb[c] += d;
        }
      }
    }
  });
  return {gz, partial.sum(0)};
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

// The masked training path's node output (dit_mm.accel.held_norm): a row r
// of the (R, C) map x is LayerNorm(x[r]) where keep[r] != 0, else the held
// row x0[r] (x equals x0 there). Returns (out, mean, rstd); the statistics
// are of every row, for the gate gradient of held rows in the backward.
std::vector<torch::Tensor> held_norm_forward(torch::Tensor x, torch::Tensor x0,
                                             torch::Tensor keep, torch::Tensor w,
                                             torch::Tensor b, double eps) {
  TORCH_CHECK(x.is_contiguous() && x0.is_contiguous() && keep.is_contiguous() &&
              w.is_contiguous() && b.is_contiguous());
  const int64_t C = x.size(-1), R = x.numel() / C;
  TORCH_CHECK(x0.sizes() == x.sizes() && keep.numel() == R && w.numel() == C &&
              b.numel() == C && x.scalar_type() == torch::kFloat &&
              x0.scalar_type() == torch::kFloat && keep.scalar_type() == torch::kFloat);
  auto out = torch::empty_like(x);
  auto mean = torch::empty({R}, x.options());
  auto rstd = torch::empty({R}, x.options());
  const float* __restrict__ xp = x.data_ptr<float>();
  const float* __restrict__ x0p = x0.data_ptr<float>();
  const float* __restrict__ kp = keep.data_ptr<float>();
  const float* __restrict__ wp = w.data_ptr<float>();
  const float* __restrict__ bp = b.data_ptr<float>();
  float* __restrict__ op = out.data_ptr<float>();
  float* __restrict__ mp = mean.data_ptr<float>();
  float* __restrict__ rp = rstd.data_ptr<float>();
  const float inv_c = 1.0f / static_cast<float>(C);
  at::parallel_for(0, R, 4096 / C + 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict__ xr = xp + r * C;
      float s = 0.0f, v = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < C; ++c) s += xr[c];
      const float m = s * inv_c;
#pragma omp simd reduction(+ : v)
      for (int64_t c = 0; c < C; ++c) v += (xr[c] - m) * (xr[c] - m);
      const float rs = 1.0f / std::sqrt(v * inv_c + static_cast<float>(eps));
      mp[r] = m;
      rp[r] = rs;
      float* __restrict__ o = op + r * C;
      if (kp[r] != 0.0f) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = (xr[c] - m) * rs * wp[c] + bp[c];
      } else {
        std::memcpy(o, x0p + r * C, C * sizeof(float));
      }
    }
  });
  return {out, mean, rstd};
}

// Backward of held_norm_forward in one pass over g, x and x0: the LayerNorm
// backward at kept rows; at held rows the incoming gradient itself (x passes
// it on to x0 there); the gate gradient gm[r] = sum_c g * (LayerNorm(x) - x0)
// at every row (when mask_grad); and the affine gradients of kept rows, one
// (2, C) slice per chunk of rows (the caller adds them up).
std::vector<torch::Tensor> held_norm_backward(torch::Tensor g, torch::Tensor x,
                                              torch::Tensor x0, torch::Tensor keep,
                                              torch::Tensor mean, torch::Tensor rstd,
                                              torch::Tensor w, torch::Tensor b,
                                              bool mask_grad, int64_t chunks) {
  TORCH_CHECK(g.is_contiguous() && x.is_contiguous() && x0.is_contiguous() &&
              keep.is_contiguous() && mean.is_contiguous() && rstd.is_contiguous() &&
              w.is_contiguous() && b.is_contiguous() && chunks >= 1);
  const int64_t C = x.size(-1), R = x.numel() / C;
  TORCH_CHECK(g.sizes() == x.sizes() && x0.sizes() == x.sizes() && keep.numel() == R &&
              mean.numel() == R && rstd.numel() == R && w.numel() == C && b.numel() == C &&
              g.scalar_type() == torch::kFloat);
  auto gx = torch::empty_like(x);
  auto gm = torch::empty({mask_grad ? R : 0}, x.options());
  auto partial = torch::zeros({chunks, 2, C}, x.options());
  const float* __restrict__ gp = g.data_ptr<float>();
  const float* __restrict__ xp = x.data_ptr<float>();
  const float* __restrict__ x0p = x0.data_ptr<float>();
  const float* __restrict__ kp = keep.data_ptr<float>();
  const float* __restrict__ mp = mean.data_ptr<float>();
  const float* __restrict__ rp = rstd.data_ptr<float>();
  const float* __restrict__ wp = w.data_ptr<float>();
  const float* __restrict__ bp = b.data_ptr<float>();
  float* __restrict__ gxp = gx.data_ptr<float>();
  float* __restrict__ gmp = gm.data_ptr<float>();
  float* __restrict__ pp = partial.data_ptr<float>();
  const float inv_c = 1.0f / static_cast<float>(C);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      float* __restrict__ dw = pp + ch * 2 * C;
      float* __restrict__ db = dw + C;
      for (int64_t r = R * ch / chunks; r < R * (ch + 1) / chunks; ++r) {
        const float* __restrict__ gr = gp + r * C;
        const float* __restrict__ xr = xp + r * C;
        const float m = mp[r], rs = rp[r];
        float* __restrict__ o = gxp + r * C;
        if (mask_grad) {
          const float* __restrict__ x0r = x0p + r * C;
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t c = 0; c < C; ++c) s += gr[c] * ((xr[c] - m) * rs * wp[c] + bp[c] - x0r[c]);
          gmp[r] = s;
        }
        if (kp[r] == 0.0f) {
          std::memcpy(o, gr, C * sizeof(float));
          continue;
        }
        float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t c = 0; c < C; ++c) {
          const float gy = gr[c] * wp[c];
          sg += gy;
          sgx += gy * (xr[c] - m) * rs;
        }
        sg *= inv_c;
        sgx *= inv_c;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float xh = (xr[c] - m) * rs;
          o[c] = rs * (gr[c] * wp[c] - sg - xh * sgx);
          dw[c] += gr[c] * xh;
          db[c] += gr[c];
        }
      }
    }
  });
  return {gx, gm, partial.sum(0)};
}

// The packed forward of one grid node (dit_mm/accel/cpu/native_stage.py), in one call.
//
// It runs the ops of RoutedStage.forward_sparse's kernel path in the same
// order on the same tensors, so it gives the same values. What it removes
// is the per-op cost of the interpreter and the Python bindings: a block
// is ~150 ATen ops, and at 32x32 input (no real work) DiT-b2's full grid
// took 20 ms through Python.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>

namespace {
using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// Entries per block in packed_stage's `params` (see BLOCK_PARAMS in
// dit_mm/accel/cpu/native_stage.py) and per block in `ints` / `eps`.
constexpr int64_t kParams = 23, kInts = 3, kEps = 3;

// Runs a dispatcher op on boxed arguments; returns its single tensor output.
Tensor call_boxed(const c10::OperatorHandle& op, torch::jit::Stack args) {
  op.callBoxed(&args);
  return args[0].toTensor();
}

c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// torch.ops.mkldnn._linear_pointwise(x, packed, b, 'none', [], '')
Tensor onednn_linear(const Tensor& x, const Tensor& packed, const OptTensor& b) {
  static const c10::OperatorHandle op = find_op("mkldnn::_linear_pointwise");
  return call_boxed(op,
                    {x, packed, b, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                     std::string("")});
}

// torch.ops.mkldnn._convolution_pointwise for a padding-free, ungrouped conv
Tensor onednn_conv(const Tensor& x, const Tensor& packed, const OptTensor& b,
                   int64_t sy, int64_t sx) {
  static const c10::OperatorHandle op = find_op("mkldnn::_convolution_pointwise");
  return call_boxed(op,
                    {x, packed, b, std::vector<int64_t>{0, 0}, std::vector<int64_t>{sy, sx},
                     std::vector<int64_t>{1, 1}, int64_t(1), std::string("none"),
                     c10::List<std::optional<at::Scalar>>(), std::string("")});
}

struct Linear {
  const Tensor& w;
  const OptTensor& packed;
  const OptTensor& b;
};

// dit_mm.onednn.linear: F.linear where onednn.plain_is_faster says so (or
// without a reordered weight), else the reordered oneDNN GEMM.
Tensor linear(const Tensor& x, const Linear& l, int64_t plain_macs, int64_t plain_weight) {
  const int64_t rows = x.numel() / x.size(-1), n = l.w.numel();
  if (!l.packed.has_value() || (rows * n <= plain_macs && (n <= plain_weight || rows <= 2)))
    return at::linear(x, l.w, l.b);
  return onednn_linear(x, *l.packed, l.b);
}
}  // namespace

// x: (B, N, C) tokens, N = H * W. idx: strictly increasing flat positions
// of the K kept tokens. params: kParams per block (BLOCK_PARAMS), then the
// stage norm's weight and bias. ints: per block heads and the SR conv's
// stride (0, 0 without one), then onednn.PLAIN_MACS and PLAIN_WEIGHT. eps:
// per block norm1, the SR norm and norm2, then the stage norm. Returns a new
// (B, N, C) map: kept tokens through the blocks and the stage norm, skipped
// tokens as in x. With every token kept it is PVTv2's dense stage (folded
// norms, the kernel's depthwise conv).
torch::Tensor packed_stage(torch::Tensor x, torch::Tensor idx, int64_t H, int64_t W,
                           std::vector<std::optional<torch::Tensor>> params,
                           std::vector<int64_t> ints, std::vector<double> eps) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.scalar_type() == torch::kFloat &&
              x.device().is_cpu(), "packed_stage: x must be a contiguous float32 CPU (B, N, C)");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(N == H * W, "packed_stage: N != H * W");
  TORCH_CHECK(idx.dim() == 1 && idx.is_contiguous() && idx.scalar_type() == torch::kLong,
              "packed_stage: idx must be a contiguous int64 vector");
  const int64_t depth = (int64_t(params.size()) - 2) / kParams;
  TORCH_CHECK(depth > 0 && int64_t(params.size()) == depth * kParams + 2 &&
              int64_t(ints.size()) == depth * kInts + 2 &&
              int64_t(eps.size()) == depth * kEps + 1,
              "packed_stage: malformed parameter lists");
  const int64_t plain_macs = ints[depth * kInts], plain_weight = ints[depth * kInts + 1];
  // no Python object is touched below: other Python threads (a data loader,
  // a memory sampler) run meanwhile
  pybind11::gil_scoped_release no_gil;
  const int64_t K = idx.size(0);
  // every token kept (idx = 0..B*N-1): no gather/scatter, batched attention
  const bool all = K == B * N;
  Tensor nbr, t, base = x.view({B * N, C});
  std::vector<int64_t> counts(B, 0);
  {
    RECORD_FUNCTION("dit::gather", std::vector<c10::IValue>());
    const int64_t* ip = idx.data_ptr<int64_t>();
    for (int64_t k = 0; k < K; ++k) {
      TORCH_CHECK(ip[k] >= 0 && ip[k] < B * N && (k == 0 || ip[k] > ip[k - 1]),
                  "packed_stage: idx must be strictly increasing positions in the map");
      counts[ip[k] / N] += 1;
    }
    nbr = neighbours(idx, B, H, W);
    t = all ? base : base.index_select(0, idx);  // t is never written in place
  }
  auto P = [&](int64_t blk, int64_t i) -> const OptTensor& { return params[blk * kParams + i]; };
  auto L = [&](int64_t blk, int64_t i) { return Linear{*P(blk, i), P(blk, i + 1), P(blk, i + 2)}; };
  for (int64_t blk = 0; blk < depth; ++blk)  // the tensors dereferenced below
    for (int64_t i : {0, 7, 10, 13, 14, 15, 18, 19, 20})
      TORCH_CHECK(P(blk, i).has_value(), "packed_stage: missing parameter ", i, " of block ", blk);
  // LayerNorm without affine through the affine kernel (2x faster here)
  const Tensor ones = at::ones({C}, x.options()), zeros = at::zeros({C}, x.options());
  Tensor normed = all ? Tensor() : at::layer_norm(base, {C}, ones, zeros, eps[0]);
  Tensor hidden;
  for (int64_t blk = 0; blk < depth; ++blk) {
    const int64_t heads = ints[blk * kInts], sy = ints[blk * kInts + 1], sx = ints[blk * kInts + 2];
    TORCH_CHECK(heads > 0 && C % heads == 0, "packed_stage: bad head count");
    const int64_t hd = C / heads;
    Tensor t_hat = at::layer_norm(t, {C}, ones, zeros, eps[blk * kEps]);
    if (all) {
      normed = t_hat;
    } else {
      RECORD_FUNCTION("dit::scatter", std::vector<c10::IValue>());
      scatter_rows(normed, idx, t_hat);
    }
    // norm1's affine is folded into the query, SR conv and kv weights
    Tensor q = linear(t_hat, L(blk, 0), plain_macs, plain_weight);
    Tensor kv;
    if (sy > 0) {
      TORCH_CHECK(P(blk, 3).has_value(), "packed_stage: block ", blk, " has no SR conv weight");
      Tensor y = onednn_conv(normed.view({B, H, W, C}).permute({0, 3, 1, 2}), *P(blk, 3),
                             P(blk, 4), sy, sx);
      Tensor reduced = at::layer_norm(y.permute({0, 2, 3, 1}).reshape({B, -1, C}), {C},
                                      P(blk, 5), P(blk, 6), eps[blk * kEps + 1]);
      kv = linear(reduced, L(blk, 7), plain_macs, plain_weight);
    } else {
      kv = linear(normed.view({B, N, C}), L(blk, 7), plain_macs, plain_weight);
    }
    kv = kv.reshape({B, -1, 2, heads, hd}).permute({2, 0, 3, 1, 4});
    const Tensor k = kv.select(0, 0), v = kv.select(0, 1);
    Tensor o;
    if (B == 1 || all) {
      o = at::scaled_dot_product_attention(q.view({B, K / B, heads, hd}).transpose(1, 2), k, v)
              .transpose(1, 2).reshape({K, C});
    } else {  // per image: its queries against its keys
      std::vector<Tensor> outs;
      int64_t start = 0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t n = counts[b];
        if (n == 0) continue;
        Tensor qb = q.narrow(0, start, n).view({1, n, heads, hd}).transpose(1, 2);
        outs.push_back(at::scaled_dot_product_attention(qb, k.narrow(0, b, 1), v.narrow(0, b, 1))
                           .transpose(1, 2).reshape({n, C}));
        start += n;
      }
      o = outs.size() == 1 ? outs[0] : at::cat(outs);
    }
    t = t + linear(o, L(blk, 10), plain_macs, plain_weight);
    Tensor h = linear(at::layer_norm(t, {C}, P(blk, 13), P(blk, 14), eps[blk * kEps + 2]),
                      L(blk, 15), plain_macs, plain_weight);
    if (!hidden.defined()) hidden = at::empty_like(h);
    {
      RECORD_FUNCTION("dit::sparse_dwconv", std::vector<c10::IValue>());
      dwconv(h.contiguous(), nbr, *P(blk, 18), *P(blk, 19), hidden, true);
    }
    t = t + linear(hidden, L(blk, 20), plain_macs, plain_weight);
  }
  t = at::layer_norm(t, {C}, params[depth * kParams], params[depth * kParams + 1],
                     eps[depth * kEps]);
  if (all) return t.view({B, N, C});
  RECORD_FUNCTION("dit::scatter", std::vector<c10::IValue>());
  Tensor out = base.clone(at::MemoryFormat::Contiguous);
  scatter_rows(out, idx, t);
  return out.view({B, N, C});
}

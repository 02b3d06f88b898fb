// CPU kernels of prefix_flash_fwd / prefix_flash_bwd: prefix_attention as one fused flash pass
// (same arguments and returns as prefix_attention_fwd / prefix_attention_bwd).
//
// Forward: one task per (row b, KV head g, block of queries). The task packs the block's queries
// of the G query heads sharing g (GQA) into one matrix, scaled by softmax_scale, and runs an
// online softmax in fp32 (fp64 for fp64) over: the row's prefix slots read from the bank (the first
// lens[t] slots of entry t = index[b]; nothing for -1 rows), then its sequence keys in blocks, only
// up to the block's last causal key (bottom-right aligned: key j visible to query i iff
// j <= i + Lk - Lq). Masked scores are selected to -inf and padded values selected to 0, so NaN or
// Inf stored in a masked slot never enters a sum. Tile products run on torch's BLAS.
// Backward (FlashAttention-2): one task per (b, g) recomputes P = exp(S - lse) per key block,
// dS = P * (dP - rowsum(dO * O)); dq, dk, dv of (b, g) belong to that task alone, and each task's
// prefix grads go to its own scratch slot, summed per bank entry over its rows in ascending order
// afterwards (deterministic).
#include "prefix_flash_core.h"
#include "prefix_host_args.h"
#include "direct_call.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace peft_kernels {
namespace {

using flash_core::acc_type;
using flash_core::last_dim_dense;

// Host-side description of one call.
struct Problem {
  int64_t B, Hq, Hkv, G, Lq, Lk, D, T, P;
  bool causal;
  double scale;
  std::vector<int64_t> entry;      // [B]: the row's bank entry, -1 when it sees no prefix slot
  std::vector<int64_t> lens;       // [T]
  std::vector<uint8_t> keep;       // [B * Lk] real-key flags; empty = no padding anywhere
  std::vector<int64_t> key_count;  // [B * (Lk + 1)]: real keys in [0, j); empty = no padding
  flash_core::KeyMask key_mask(int64_t b) const {
    if (key_count.empty()) return {};
    return {keep.data() + b * Lk, key_count.data() + b * (Lk + 1)};
  }
};

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                  const at::Tensor& prefix_v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && prefix_k.dim() == 4 && prefix_v.dim() == 4,
              "prefix_flash: q, k, v, prefix_k, prefix_v must be 4-D, got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes(), ", ", prefix_k.sizes(), ", ", prefix_v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "prefix_flash: q must be float32/float64/float16/bfloat16, got ", dtype);
  for (const at::Tensor* t : {&q, &k, &v, &prefix_k, &prefix_v}) {
    TORCH_CHECK(t->scalar_type() == dtype, "prefix_flash: k, v, prefix_k, prefix_v must have q's dtype ", dtype,
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "prefix_flash (CPU kernel): tensors must be on the CPU, got ", t->device());
  }
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && v.sizes() == k.sizes() && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0,
              "prefix_flash: k, v must be [B, Hkv, Lk, D] with Hq % Hkv == 0 (q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes(), ")");
  TORCH_CHECK(prefix_k.size(1) == k.size(1) && prefix_k.size(3) == q.size(3) && prefix_v.sizes() == prefix_k.sizes(),
              "prefix_flash: prefix_k, prefix_v must be [T, Hkv, P, D] (k ", k.sizes(), ", prefix_k ",
              prefix_k.sizes(), ", prefix_v ", prefix_v.sizes(), ")");
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& prefix_k,
                     const std::optional<at::Tensor>& prefix_index, const std::optional<at::Tensor>& prefix_lens,
                     const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale) {
  Problem p;
  p.B = q.size(0), p.Hq = q.size(1), p.Lq = q.size(2), p.D = q.size(3);
  p.Hkv = k.size(1), p.Lk = k.size(2), p.T = prefix_k.size(0), p.P = prefix_k.size(2);
  p.G = p.Hq / p.Hkv;
  p.causal = causal;
  p.scale = scale;
  p.lens = prefix_lengths(prefix_lens, p.T, p.P, "prefix_flash");
  p.entry = prefix_entry_per_row(prefix_index, p.B, p.T, "prefix_flash");
  for (int64_t b = 0; b < p.B; ++b) {
    if (p.entry[b] >= 0 && p.lens[p.entry[b]] == 0) p.entry[b] = -1;
  }
  p.key_count = real_key_counts(key_padding_mask, p.B, p.Lk, "prefix_flash");
  if (!p.key_count.empty()) {
    p.keep.resize(p.B * p.Lk);
    for (int64_t b = 0; b < p.B; ++b) {
      const int64_t* c = p.key_count.data() + b * (p.Lk + 1);
      for (int64_t j = 0; j < p.Lk; ++j) p.keep[b * p.Lk + j] = c[j + 1] > c[j] ? 1 : 0;
    }
  }
  return p;
}

// Strides of a 4-D tensor with unit last stride.
struct View {
  int64_t s0, s1, s2;
  explicit View(const at::Tensor& t) : s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
};

struct Blocks {
  int64_t q, k;
};

Blocks forward_blocks(const Problem& p) {
  if (p.Lq <= 16) return {p.Lq, 256};  // decode-like: every query of the group in one block
  return {32, 128};
}

// out [B, Hq, Lq, D] (contiguous, scalar_t) and lse [B, Hq, Lq] (contiguous, acc_t).
template <typename scalar_t, typename acc_t>
void forward_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& prefix_k, const at::Tensor& prefix_v, at::Tensor& out, at::Tensor& lse) {
  const Blocks bs = forward_blocks(p);
  const int64_t nqb = (p.Lq + bs.q - 1) / bs.q;
  const View qv(q), kv(k), vv(v), pkv(prefix_k), pvv(prefix_v);
  const flash_core::InputPointers<scalar_t> in(q, k, v, prefix_k, prefix_v);
  scalar_t* od = out.mutable_data_ptr<scalar_t>();
  acc_t* ld_out = lse.mutable_data_ptr<acc_t>();
  const int64_t D = p.D, G = p.G, Lq = p.Lq;

  at::parallel_for(0, p.B * p.Hkv * nqb, 1, [&](int64_t begin, int64_t end) {
    flash_core::ForwardScratch<acc_t> w(G * bs.q, bs.k, D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (p.Hkv * nqb), g = (task / nqb) % p.Hkv, qb = task % nqb;
      const int64_t i0 = qb * bs.q, nq = std::min(Lq, i0 + bs.q) - i0, head0 = b * p.Hq + g * G;
      flash_core::ForwardTile<scalar_t, acc_t> tile(w, {in.q + b * qv.s0 + g * G * qv.s1 + i0 * qv.s2, qv.s1, qv.s2}, G,
                                                   nq, D, i0, p.Lk - Lq, p.causal, static_cast<acc_t>(p.scale));
      const int64_t t = p.entry[b];
      if (t >= 0) {
        tile.keys(in.pk + t * pkv.s0 + g * pkv.s1, pkv.s2, in.pv + t * pvv.s0 + g * pvv.s1, pvv.s2, p.lens[t], bs.k,
                  false);
      }
      tile.keys(in.k + b * kv.s0 + g * kv.s1, kv.s2, in.v + b * vv.s0 + g * vv.s1, vv.s2, tile.visible_keys(p.Lk), bs.k,
                true, p.key_mask(b));
      tile.store({od + (head0 * Lq + i0) * D, Lq * D, D}, {ld_out + head0 * Lq + i0, Lq, 1});
    }
  });
}

// out in q's dtype, lse in the accumulation dtype (fp64 for fp64).
std::tuple<at::Tensor, at::Tensor> forward(const Problem& p, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& prefix_k,
                                           const at::Tensor& prefix_v) {
  return flash_core::run_forward(q, q.sizes(), {p.B, p.Hq, p.Lq}, "prefix_flash_fwd",
                                 [&](auto types, at::Tensor& out, at::Tensor& lse) {
                                   using T = decltype(types);
                                   forward_kernel<typename T::scalar, typename T::acc>(p, q, k, v, prefix_k, prefix_v,
                                                                                       out, lse);
                                 });
}

// grad_out, out: [B, Hq, Lq, D] contiguous in scalar_t; lse [B, Hq, Lq] contiguous acc_t with +inf where a
// query sees nothing. dq [B, Hq, Lq, D], dk, dv [B, Hkv, Lk, D] contiguous scalar_t; dprefix [B, Hkv, P, D]
// contiguous acc_t scratch (row b's contribution to its entry), written for rows with an entry.
template <typename scalar_t, typename acc_t>
void backward_kernel(const Problem& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& out,
                     const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dpk_rows,
                     at::Tensor& dpv_rows) {
  const View qv(q), kv(k), vv(v), pkv(prefix_k), pvv(prefix_v);
  const flash_core::InputPointers<scalar_t> in(q, k, v, prefix_k, prefix_v);
  const flash_core::BackwardPointers<scalar_t, acc_t> bp(grad_out, out, lse, dq, dk, dv, dpk_rows, dpv_rows);
  const int64_t D = p.D, G = p.G, Lq = p.Lq;

  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    flash_core::BackwardScratch<acc_t> w(G * Lq, D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.Hkv, g = task % p.Hkv, head0 = b * p.Hq + g * G, kv_row = b * p.Hkv + g;
      flash_core::BackwardTile<scalar_t, acc_t> tile(
          w, {in.q + b * qv.s0 + g * G * qv.s1, qv.s1, qv.s2}, {bp.grad_out + head0 * Lq * D, Lq * D, D},
          {bp.out + head0 * Lq * D, Lq * D, D}, {bp.lse + head0 * Lq, Lq, 1}, G, Lq, D, p.Lk - Lq, p.causal,
          static_cast<acc_t>(p.scale));
      const int64_t t = p.entry[b];
      if (t >= 0) {
        tile.prefix(in.pk + t * pkv.s0 + g * pkv.s1, pkv.s2, in.pv + t * pvv.s0 + g * pvv.s1, pvv.s2, p.lens[t],
                    bp.dpk + kv_row * p.P * D, bp.dpv + kv_row * p.P * D);
      }
      tile.keys(in.k + b * kv.s0 + g * kv.s1, kv.s2, in.v + b * vv.s0 + g * vv.s1, vv.s2, p.Lk, p.key_mask(b),
                bp.dk + kv_row * p.Lk * D, bp.dv + kv_row * p.Lk * D, D);
      tile.store_dq({bp.dq + head0 * Lq * D, Lq * D, D});
    }
  });
}

std::tuple<at::Tensor, at::Tensor> prefix_flash_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& prefix_k_in,
    const at::Tensor& prefix_v_in, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double softmax_scale) {
  check_inputs(q_in, k_in, v_in, prefix_k_in, prefix_v_in);
  const at::Tensor q = last_dim_dense(q_in), k = last_dim_dense(k_in), v = last_dim_dense(v_in);
  const at::Tensor prefix_k = last_dim_dense(prefix_k_in), prefix_v = last_dim_dense(prefix_v_in);
  const Problem p = make_problem(q, k, prefix_k, prefix_index, prefix_lens, key_padding_mask, causal, softmax_scale);
  auto [out, lse] = forward(p, q, k, v, prefix_k, prefix_v);
  return {out, lse.scalar_type() == at::kFloat ? lse : lse.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_flash_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& prefix_k_in, const at::Tensor& prefix_v_in, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double softmax_scale, const at::Tensor& out_in, const at::Tensor& lse_in) {
  check_inputs(q_in, k_in, v_in, prefix_k_in, prefix_v_in);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), "prefix_flash_bwd: grad_out ",
              grad_out_in.sizes(), " and out ", out_in.sizes(), " must be like q ", q_in.sizes());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.sizes() == q_in.sizes().slice(0, 3), "prefix_flash_bwd: lse ",
              lse_in.sizes(), " must be [B, Hq, Lq] of q ", q_in.sizes());
  const auto dtype = q_in.scalar_type();
  const auto acc = acc_type(dtype);
  const at::Tensor q = last_dim_dense(q_in), k = last_dim_dense(k_in), v = last_dim_dense(v_in);
  const at::Tensor prefix_k = last_dim_dense(prefix_k_in), prefix_v = last_dim_dense(prefix_v_in);
  const Problem p = make_problem(q, k, prefix_k, prefix_index, prefix_lens, key_padding_mask, causal, softmax_scale);
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  at::Tensor dpk = at::zeros(prefix_k.sizes(), prefix_k.options());
  at::Tensor dpv = at::zeros(prefix_v.sizes(), prefix_v.options());
  if (p.B == 0 || p.Lq == 0 || p.D == 0 || p.Hq == 0) return {dq, dk, dv, dpk, dpv};

  at::Tensor out, lse;
  std::tie(out, lse) =
      flash_core::saved_for_backward(dtype, out_in, lse_in, [&] { return forward(p, q, k, v, prefix_k, prefix_v); });
  out = out.contiguous();  // the kernel reads out and grad_out as contiguous
  const at::Tensor grad_out = grad_out_in.to(dtype).contiguous();
  at::Tensor dpk_rows = at::zeros({p.B, p.Hkv, p.P, p.D}, q.options().dtype(acc));
  at::Tensor dpv_rows = at::zeros({p.B, p.Hkv, p.P, p.D}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "prefix_flash_bwd", [&] {
    using acc_t = flash_core::acc_of<scalar_t>;
    backward_kernel<scalar_t, acc_t>(p, grad_out, q, k, v, prefix_k, prefix_v, out, lse, dq, dk, dv, dpk_rows,
                                     dpv_rows);
    const auto row_slot = [](int64_t b) { return b; };
    flash_core::reduce_prefix_grads<scalar_t, acc_t>(dpk_rows, dpk, p.entry, p.lens, p.Hkv, p.P, p.D, row_slot);
    flash_core::reduce_prefix_grads<scalar_t, acc_t>(dpv_rows, dpv, p.entry, p.lens, p.Hkv, p.P, p.D, row_slot);
  });
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace
}  // namespace peft_kernels

TORCH_LIBRARY_FRAGMENT(peft_kernels, m) {
  m.def(
      "prefix_flash_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? prefix_index, "
      "Tensor? prefix_lens, Tensor? key_padding_mask, bool causal, float softmax_scale) -> (Tensor, Tensor)");
  m.def(
      "prefix_flash_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? prefix_index, Tensor? prefix_lens, Tensor? key_padding_mask, bool causal, float softmax_scale, "
      "Tensor out, Tensor lse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("prefix_flash_fwd", &peft_kernels::prefix_flash_fwd_cpu);
  m.impl("prefix_flash_bwd", &peft_kernels::prefix_flash_bwd_cpu);
}

PK_DIRECT_CALL(prefix_flash_fwd, peft_kernels::prefix_flash_fwd_cpu);
PK_DIRECT_CALL(prefix_flash_bwd, peft_kernels::prefix_flash_bwd_cpu);

// CPU kernels of prefix_attention_fwd / prefix_attention_bwd: a cascade over ATen's CPU flash
// attention, merged by log-sum-exp (the way FlashInfer's cascade attention merges partial states).
//
// Query i of row b attends [its row's prefix: bank entry t = index[b], slots < lens[t] ; the row's
// own keys]. Each part runs through ATen's flash kernel (it returns out and lse), and every part is
// merged into the output in place:
//  * sequence keys: one call; two when causal with 1 < Lq < Lk (bottom-right alignment = the first
//    Lk - Lq keys, seen by every query, plus a square causal block); the last Lk queries only when
//    Lq > Lk (the others see no sequence key). Padded keys get an additive [B, 1, 1, Lk] mask, and
//    their K/V are replaced by 0 first so that NaN/Inf there never enter a product.
//  * prefix keys: one call per bank entry over the rows that use it: those rows of q as a strided
//    view when they form an arithmetic progression (T == 1, T == B, b % T, ...), else gathered; the
//    entry's first lens[t] slots expanded over the rows (stride 0: the bank is never copied, and
//    slots past lens[t], entries no row uses and -1 rows are never read).
// Backward: ATen's flash backward per part, handed the final out and lse, so that its recomputed
// probabilities and rowsum(dO * O) are those of the whole softmax; dq sums the parts, and each
// entry's prefix grads sum its rows (a fixed-order reduction: deterministic).
#include "prefix_host_args.h"
#include "direct_call.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace peft_kernels {
namespace {

// Queries [q0, q1) against sequence keys [k0, k1); causal = ATen's top-left aligned causal mask
// inside that block (the blocks below make it the op's bottom-right aligned one).
struct Piece {
  int64_t q0, q1, k0, k1;
  bool causal;
};

std::vector<Piece> sequence_pieces(int64_t Lq, int64_t Lk, bool causal) {
  if (Lq == 0 || Lk == 0) return {};
  if (!causal || Lq == 1) return {{0, Lq, 0, Lk, false}};  // Lq == 1: bottom-right causal sees every key
  const int64_t offset = Lk - Lq;
  if (offset == 0) return {{0, Lq, 0, Lk, true}};
  if (offset > 0) return {{0, Lq, 0, offset, false}, {0, Lq, offset, Lk, true}};
  return {{-offset, Lq, 0, Lk, true}};
}

struct Rows {
  std::vector<int64_t> ids;  // batch rows, ascending
  at::Tensor ids_tensor;     // the same as int64 (for gathers)
  int64_t step = 0;          // > 0: ids[r] = ids[0] + r * step (a strided view selects them)
};

Rows make_rows(std::vector<int64_t> ids) {
  Rows r;
  r.ids = std::move(ids);
  const int64_t n = static_cast<int64_t>(r.ids.size());
  r.step = n == 1 ? 1 : r.ids[1] - r.ids[0];
  for (int64_t i = 2; i < n && r.step > 0; ++i) {
    if (r.ids[i] - r.ids[i - 1] != r.step) r.step = 0;
  }
  if (r.step == 0) r.ids_tensor = at::tensor(r.ids, at::TensorOptions().dtype(at::kLong));
  return r;
}

// Rows `rows` of x (dim 0): a view when they are evenly spaced, else a gathered copy.
at::Tensor take_rows(const at::Tensor& x, const Rows& rows) {
  if (rows.step > 0) return x.slice(0, rows.ids.front(), rows.ids.back() + 1, rows.step);
  return x.index_select(0, rows.ids_tensor);
}

// Host-side description of one call: which rows use which bank entry, and how many slots.
struct Plan {
  int64_t B, Hq, Hkv, Lq, Lk, D, T, P;
  std::vector<int64_t> lens;      // [T]
  std::vector<Rows> entry_rows;   // [T]: rows of each entry (empty: unused)
  std::vector<int64_t> key_count; // [B * (Lk + 1)]: real keys in [0, j) of row b; empty = no padding
  // Row b uses entry b % T (T == 1, T == B, or B a multiple of T cycling through the bank) and
  // every entry has the same length: all entries go through one call, the bank folded into heads.
  bool periodic = false;
};

Plan make_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& prefix_k,
               const std::optional<at::Tensor>& prefix_index, const std::optional<at::Tensor>& prefix_lens,
               const std::optional<at::Tensor>& key_padding_mask) {
  Plan p{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), prefix_k.size(0), prefix_k.size(2),
         {}, {}, {}};
  const std::vector<int64_t> index = prefix_entry_per_row(prefix_index, p.B, p.T, "prefix_attention");
  p.lens = prefix_lengths(prefix_lens, p.T, p.P, "prefix_attention");
  std::vector<std::vector<int64_t>> ids(p.T);
  for (int64_t b = 0; b < p.B; ++b) {
    if (index[b] >= 0 && p.lens[index[b]] > 0) ids[index[b]].push_back(b);
  }
  p.periodic = p.T > 0 && p.B % p.T == 0 && p.lens[0] > 0;
  for (int64_t b = 0; b < p.B && p.periodic; ++b) {
    p.periodic = index[b] == b % p.T && p.lens[index[b]] == p.lens[0];
  }
  p.entry_rows.resize(p.T);
  for (int64_t t = 0; t < p.T; ++t) {
    if (!ids[t].empty()) p.entry_rows[t] = make_rows(std::move(ids[t]));
  }
  p.key_count = real_key_counts(key_padding_mask, p.B, p.Lk, "prefix_attention");
  return p;
}

// alive[b * nq + i]: query q0 + i of row b sees at least one real key of the piece (padding only).
std::vector<uint8_t> piece_alive(const Plan& p, const Piece& s) {
  const int64_t nq = s.q1 - s.q0;
  std::vector<uint8_t> alive(p.B * nq);
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t* c = p.key_count.data() + b * (p.Lk + 1);
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t hi = s.causal ? s.k0 + i + 1 : s.k1;
      alive[b * nq + i] = c[hi] - c[s.k0] > 0;
    }
  }
  return alive;
}

// Merge a partial attention state (part_out [n, Hq, nq, D], part_lse [n, Hq, nq]; row r of it is
// batch row rows[r], query q0 + i) into out [B, Hq, Lq, D] / lse [B, Hq, Lq] (contiguous) in place.
// A partial with lse -inf (or not alive) is skipped and never read; an empty state takes the partial.
template <typename scalar_t, typename acc_t>
void merge_state(at::Tensor& out, at::Tensor& lse, const at::Tensor& part_out, const at::Tensor& part_lse,
                 const int64_t* rows, int64_t n, int64_t q0, const uint8_t* alive) {
  const int64_t Hq = out.size(1), Lq = out.size(2), D = out.size(3), nq = part_out.size(2);
  TORCH_INTERNAL_ASSERT(part_out.stride(3) == 1 && out.is_contiguous() && lse.is_contiguous());
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  acc_t* l = lse.mutable_data_ptr<acc_t>();
  const scalar_t* po = part_out.const_data_ptr<scalar_t>();
  const acc_t* pl = part_lse.const_data_ptr<acc_t>();
  const int64_t os0 = part_out.stride(0), os1 = part_out.stride(1), os2 = part_out.stride(2);
  const int64_t ls0 = part_lse.stride(0), ls1 = part_lse.stride(1), ls2 = part_lse.stride(2);
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, n * Hq * nq, grain, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t r = w / (Hq * nq), h = (w / nq) % Hq, i = w % nq;
      if (alive != nullptr && !alive[r * nq + i]) continue;
      const acc_t lp = pl[r * ls0 + h * ls1 + i * ls2];
      if (lp == neg_inf) continue;
      const int64_t dst = (rows[r] * Hq + h) * Lq + q0 + i;
      const scalar_t* src = po + r * os0 + h * os1 + i * os2;
      scalar_t* od = o + dst * D;
      const acc_t la = l[dst];
      if (la == neg_inf) {
        for (int64_t d = 0; d < D; ++d) od[d] = src[d];
        l[dst] = lp;
        continue;
      }
      const acc_t m = std::max(la, lp);
      const acc_t wa = std::exp(la - m), wp = std::exp(lp - m), sum = wa + wp;
      const acc_t ca = wa / sum, cp = wp / sum;
      for (int64_t d = 0; d < D; ++d) {
        od[d] = static_cast<scalar_t>(ca * static_cast<acc_t>(od[d]) + cp * static_cast<acc_t>(src[d]));
      }
      l[dst] = m + std::log(sum);
    }
  });
}

void merge(at::Tensor& out, at::Tensor& lse, const at::Tensor& part_out, const at::Tensor& part_lse,
           const int64_t* rows, int64_t n, int64_t q0, const uint8_t* alive) {
  const at::Tensor po = part_out.stride(3) == 1 ? part_out : part_out.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "prefix_attention_merge", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    merge_state<scalar_t, acc_t>(out, lse, po, part_lse, rows, n, q0, alive);
  });
}

at::Tensor last_dim_dense(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                  const at::Tensor& prefix_v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && prefix_k.dim() == 4 && prefix_v.dim() == 4,
              "prefix_attention: q, k, v, prefix_k, prefix_v must be 4-D, got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes(), ", ", prefix_k.sizes(), ", ", prefix_v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "prefix_attention: q must be float32/float64/float16/bfloat16, got ", dtype);
  for (const at::Tensor* t : {&k, &v, &prefix_k, &prefix_v}) {
    TORCH_CHECK(t->scalar_type() == dtype, "prefix_attention: k, v, prefix_k, prefix_v must have q's dtype ",
                dtype, ", got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "prefix_attention_fwd (CPU kernel): tensors must be on the CPU");
  }
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && v.sizes() == k.sizes() && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0,
              "prefix_attention: k, v must be [B, Hkv, Lk, D] with Hq % Hkv == 0 (q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes(), ")");
  TORCH_CHECK(prefix_k.size(1) == k.size(1) && prefix_k.size(3) == q.size(3) && prefix_v.sizes() == prefix_k.sizes(),
              "prefix_attention: prefix_k, prefix_v must be [T, Hkv, P, D] (k ", k.sizes(), ", prefix_k ",
              prefix_k.sizes(), ", prefix_v ", prefix_v.sizes(), ")");
}

// Sequence K/V with padded keys zeroed, and the additive mask; (k, v, undefined) without padding.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_kv(const Plan& p, const at::Tensor& k, const at::Tensor& v,
                                                           const std::optional<at::Tensor>& key_padding_mask) {
  if (p.key_count.empty()) return {k, v, at::Tensor()};
  const at::Tensor padded = key_padding_mask->to(at::kBool).logical_not();
  const at::Tensor rows = padded.view({p.B, 1, p.Lk, 1});
  at::Tensor mask = at::zeros({p.B, 1, 1, p.Lk}, k.options());
  mask.masked_fill_(padded.view({p.B, 1, 1, p.Lk}), -std::numeric_limits<double>::infinity());
  return {k.masked_fill(rows, 0), v.masked_fill(rows, 0), mask};
}

std::optional<at::Tensor> piece_mask(const at::Tensor& mask, const Piece& s) {
  if (!mask.defined()) return std::nullopt;
  return mask.slice(3, s.k0, s.k1);
}

// The prefix keys of entry t, expanded over n rows (a view of the bank).
std::pair<at::Tensor, at::Tensor> entry_kv(const Plan& p, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                           int64_t t, int64_t n) {
  const std::vector<int64_t> shape{n, p.Hkv, p.lens[t], p.D};
  return {prefix_k[t].slice(1, 0, p.lens[t]).unsqueeze(0).expand(shape),
          prefix_v[t].slice(1, 0, p.lens[t]).unsqueeze(0).expand(shape)};
}

// The periodic layout: batch row j * T + t of x [B, H, L, D] becomes head t * H of [B / T, T * H, L, D]
// (a view when dims 0-1 are dense), so that one call attends every row to its own entry.
bool foldable(const Plan& p, const at::Tensor& x) {
  return p.periodic && x.stride(0) == x.size(1) * x.stride(1);
}

at::Tensor fold_rows(const Plan& p, const at::Tensor& x) {
  return x.view({p.B / p.T, p.T * x.size(1), x.size(2), x.size(3)});
}

// The bank's first lens[0] slots as [B / T, T * Hkv, len, D]: the bank viewed, expanded over row groups.
std::pair<at::Tensor, at::Tensor> folded_bank(const Plan& p, const at::Tensor& prefix_k, const at::Tensor& prefix_v) {
  const int64_t len = p.lens[0];
  auto fold = [&](const at::Tensor& bank) {
    return bank.slice(2, 0, len).reshape({1, p.T * p.Hkv, len, p.D}).expand({p.B / p.T, p.T * p.Hkv, len, p.D});
  };
  return {fold(prefix_k), fold(prefix_v)};
}

// out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] in the accumulation dtype (fp64 for fp64).
std::tuple<at::Tensor, at::Tensor> forward(const Plan& p, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                           const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                           double scale) {
  const auto acc = acc_type(q.scalar_type());
  at::Tensor out, lse;
  const std::vector<Piece> pieces = sequence_pieces(p.Lq, p.Lk, causal);
  std::vector<int64_t> all_rows(p.B);
  for (int64_t b = 0; b < p.B; ++b) all_rows[b] = b;
  if (p.B == 0 || p.Lq == 0 || p.D == 0) {
    return {at::zeros_like(q, at::MemoryFormat::Contiguous), at::full({p.B, p.Hq, p.Lq}, -INFINITY, q.options().dtype(acc))};
  }
  const auto [ks, vs, mask] = sequence_kv(p, k, v, key_padding_mask);
  for (const Piece& s : pieces) {
    auto [po, pl] = at::_scaled_dot_product_flash_attention_for_cpu(
        q.slice(2, s.q0, s.q1), ks.slice(2, s.k0, s.k1), vs.slice(2, s.k0, s.k1), 0.0, s.causal, piece_mask(mask, s),
        scale);
    const bool whole = s.q0 == 0 && s.q1 == p.Lq && p.key_count.empty();
    if (!out.defined() && whole && po.is_contiguous()) {
      out = po;
      lse = pl.contiguous();
      continue;
    }
    if (!out.defined()) {
      out = at::zeros_like(q, at::MemoryFormat::Contiguous);
      lse = at::full({p.B, p.Hq, p.Lq}, -INFINITY, q.options().dtype(acc));
    }
    std::vector<uint8_t> alive;
    if (!p.key_count.empty()) alive = piece_alive(p, s);
    merge(out, lse, po, pl, all_rows.data(), p.B, s.q0, alive.empty() ? nullptr : alive.data());
  }
  if (!out.defined()) {
    out = at::zeros_like(q, at::MemoryFormat::Contiguous);
    lse = at::full({p.B, p.Hq, p.Lq}, -INFINITY, q.options().dtype(acc));
  }
  if (foldable(p, q) && prefix_k.stride(0) == p.Hkv * prefix_k.stride(1)) {
    const auto [pk, pv] = folded_bank(p, prefix_k, prefix_v);
    auto [po, pl] = at::_scaled_dot_product_flash_attention_for_cpu(fold_rows(p, q), pk, pv, 0.0, false,
                                                                    std::nullopt, scale);
    merge(out, lse, po.reshape(q.sizes()), pl.reshape({p.B, p.Hq, p.Lq}), all_rows.data(), p.B, 0, nullptr);
    return {out, lse};
  }
  for (int64_t t = 0; t < p.T; ++t) {
    const Rows& rows = p.entry_rows[t];
    if (rows.ids.empty()) continue;
    const int64_t n = static_cast<int64_t>(rows.ids.size());
    const auto [pk, pv] = entry_kv(p, prefix_k, prefix_v, t, n);
    auto [po, pl] = at::_scaled_dot_product_flash_attention_for_cpu(take_rows(q, rows), pk, pv, 0.0, false,
                                                                    std::nullopt, scale);
    merge(out, lse, po, pl, rows.ids.data(), n, 0, nullptr);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& prefix_k_in,
    const at::Tensor& prefix_v_in, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double softmax_scale) {
  check_inputs(q_in, k_in, v_in, prefix_k_in, prefix_v_in);
  const at::Tensor q = last_dim_dense(q_in), k = last_dim_dense(k_in), v = last_dim_dense(v_in);
  const at::Tensor prefix_k = last_dim_dense(prefix_k_in), prefix_v = last_dim_dense(prefix_v_in);
  const Plan p = make_plan(q, k, prefix_k, prefix_index, prefix_lens, key_padding_mask);
  auto [out, lse] = forward(p, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale);
  return {out, lse.scalar_type() == at::kFloat ? lse : lse.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& prefix_k_in, const at::Tensor& prefix_v_in, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double softmax_scale, const at::Tensor& out_in, const at::Tensor& lse_in) {
  check_inputs(q_in, k_in, v_in, prefix_k_in, prefix_v_in);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "prefix_attention_bwd: grad_out ", grad_out_in.sizes(), " and out ", out_in.sizes(), " must be like q ",
              q_in.sizes());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.sizes() == q_in.sizes().slice(0, 3), "prefix_attention_bwd: lse ",
              lse_in.sizes(), " must be [B, Hq, Lq] of q ", q_in.sizes());
  const auto dtype = q_in.scalar_type();
  const auto acc = acc_type(dtype);
  const at::Tensor q = last_dim_dense(q_in), k = last_dim_dense(k_in), v = last_dim_dense(v_in);
  const at::Tensor prefix_k = last_dim_dense(prefix_k_in), prefix_v = last_dim_dense(prefix_v_in);
  const Plan p = make_plan(q, k, prefix_k, prefix_index, prefix_lens, key_padding_mask);
  at::Tensor dpk = at::zeros_like(prefix_k, at::MemoryFormat::Contiguous);
  at::Tensor dpv = at::zeros_like(prefix_v, at::MemoryFormat::Contiguous);
  if (p.B == 0 || p.Lq == 0 || p.D == 0) {
    return {at::zeros_like(q, at::MemoryFormat::Contiguous), at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous), dpk, dpv};
  }

  at::Tensor out, lse;
  if (dtype == at::kDouble) {
    // The saved lse is fp32 (the op's contract); fp64 gradients need the fp64 one.
    std::tie(out, lse) = forward(p, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale);
  } else {
    out = out_in.to(dtype);
    lse = lse_in.to(acc);
  }
  // A query that sees nothing has lse -inf; +inf makes every recomputed probability exp(s - lse) 0.
  lse = lse.masked_fill(lse == -INFINITY, INFINITY).contiguous();
  const at::Tensor grad_out = grad_out_in.to(dtype).contiguous();

  // dq sums the parts in fp32 (fp64) unless one sequence part covers every query; its dq then
  // takes the prefix part's in place, in q's dtype.
  const std::vector<Piece> pieces = sequence_pieces(p.Lq, p.Lk, causal);
  const bool single = pieces.size() == 1 && pieces[0].q0 == 0 && pieces[0].q1 == p.Lq;
  at::Tensor dq, dk, dv;
  if (!single) {
    dq = at::zeros(q.sizes(), q.options().dtype(acc));
    dk = at::zeros_like(k, at::MemoryFormat::Contiguous);
    dv = at::zeros_like(v, at::MemoryFormat::Contiguous);
  }
  const auto [ks, vs, mask] = sequence_kv(p, k, v, key_padding_mask);
  for (const Piece& s : pieces) {
    auto [gq, gk, gv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.slice(2, s.q0, s.q1), q.slice(2, s.q0, s.q1), ks.slice(2, s.k0, s.k1), vs.slice(2, s.k0, s.k1),
        out.slice(2, s.q0, s.q1), lse.slice(2, s.q0, s.q1), 0.0, s.causal, piece_mask(mask, s), softmax_scale);
    if (single) {
      dq = gq.is_contiguous() ? gq : gq.contiguous();
      dk = gk.contiguous();
      dv = gv.contiguous();
      continue;
    }
    dq.slice(2, s.q0, s.q1).add_(gq);
    dk.slice(2, s.k0, s.k1).add_(gk);
    dv.slice(2, s.k0, s.k1).add_(gv);
  }
  if (!dq.defined()) {  // no sequence key at all
    dq = at::zeros(q.sizes(), q.options().dtype(acc));
    dk = at::zeros_like(k, at::MemoryFormat::Contiguous);
    dv = at::zeros_like(v, at::MemoryFormat::Contiguous);
  }
  if (foldable(p, q) && foldable(p, grad_out) && foldable(p, out) && foldable(p, dq) &&
      prefix_k.stride(0) == p.Hkv * prefix_k.stride(1)) {
    const auto [pk, pv] = folded_bank(p, prefix_k, prefix_v);
    auto [gq, gpk, gpv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        fold_rows(p, grad_out), fold_rows(p, q), pk, pv, fold_rows(p, out),
        lse.view({p.B / p.T, p.T * p.Hq, p.Lq}), 0.0, false, std::nullopt, softmax_scale);
    fold_rows(p, dq).add_(gq);
    const std::vector<int64_t> bank{p.T, p.Hkv, p.lens[0], p.D};
    dpk.slice(2, 0, p.lens[0]).copy_(gpk.sum(0, false, acc).reshape(bank));
    dpv.slice(2, 0, p.lens[0]).copy_(gpv.sum(0, false, acc).reshape(bank));
    return {dq.to(dtype), dk, dv, dpk, dpv};
  }
  for (int64_t t = 0; t < p.T; ++t) {
    const Rows& rows = p.entry_rows[t];
    if (rows.ids.empty()) continue;
    const int64_t n = static_cast<int64_t>(rows.ids.size());
    const auto [pk, pv] = entry_kv(p, prefix_k, prefix_v, t, n);
    auto [gq, gpk, gpv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        take_rows(grad_out, rows), take_rows(q, rows), pk, pv, take_rows(out, rows), take_rows(lse, rows), 0.0, false,
        std::nullopt, softmax_scale);
    if (rows.step > 0) {
      take_rows(dq, rows).add_(gq);
    } else {
      dq.index_add_(0, rows.ids_tensor, gq.to(dq.scalar_type()));
    }
    dpk[t].slice(1, 0, p.lens[t]).copy_(gpk.sum(0, false, acc));
    dpv[t].slice(1, 0, p.lens[t]).copy_(gpv.sum(0, false, acc));
  }
  return {dq.to(dtype), dk, dv, dpk, dpv};
}

}  // namespace
}  // namespace peft_kernels

TORCH_LIBRARY_FRAGMENT(peft_kernels, m) {
  m.def(
      "prefix_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? prefix_index, "
      "Tensor? prefix_lens, Tensor? key_padding_mask, bool causal, float softmax_scale) -> (Tensor, Tensor)");
  m.def(
      "prefix_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? prefix_index, Tensor? prefix_lens, Tensor? key_padding_mask, bool causal, float softmax_scale, "
      "Tensor out, Tensor lse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("prefix_attention_fwd", &peft_kernels::prefix_attention_fwd_cpu);
  m.impl("prefix_attention_bwd", &peft_kernels::prefix_attention_bwd_cpu);
}

PK_DIRECT_CALL(prefix_attention_fwd, peft_kernels::prefix_attention_fwd_cpu);
PK_DIRECT_CALL(prefix_attention_bwd, peft_kernels::prefix_attention_bwd_cpu);

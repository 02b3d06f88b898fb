// CPU kernels of prefix_flash_varlen_fwd / prefix_flash_varlen_bwd: prefix_attention_varlen (packed
// sequences, FlashAttention's varlen layout) as one fused flash pass.
//
// Sequence s owns query rows cu_q[s]..cu_q[s+1] and key rows cu_k[s]..cu_k[s+1]; q, k, v are read
// through their token and head strides (unit last stride), so [1, H, N, D] tensors viewed as
// [N, H, D] are never copied. Forward: one task per (sequence, KV head g, block of queries); a
// sequence of at most 16 queries (decode) is one block, so decode runs one task per (sequence, g).
// The task packs the block's queries of the G query heads sharing g (GQA) into one matrix, scaled by
// softmax_scale, and runs an online softmax in fp32 (fp64 for fp64) over the sequence's prefix slots
// read from the bank (the first lens[t] slots of entry t; nothing for -1), then its own keys in
// blocks, only up to the block's last causal key (bottom-right aligned per sequence: key j visible to
// query i iff j <= i + Lk_s - Lq_s). Masked scores are selected to -inf before the exp.
// Backward (FlashAttention-2): one task per (sequence, g) recomputes P = exp(S - lse) per key block,
// dS = P * (dP - rowsum(dO * O)); dq, dk, dv of (s, g) belong to that task alone, each task's prefix
// grads go to its own scratch slot, summed per bank entry in ascending sequence order afterwards
// (deterministic). Tasks are handed out longest first to whichever thread is free.
#include "prefix_flash_core.h"
#include "prefix_host_args.h"
#include "direct_call.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace peft_kernels {
namespace {

using flash_core::acc_type;
using flash_core::last_dim_dense;

constexpr const char* kOp = "prefix_flash_varlen";

// Host-side description of one call.
struct Varlen {
  int64_t S, Nq, Nk, Hq, Hkv, G, D, T, P;
  bool causal;
  double scale;
  std::vector<int64_t> cq, ck;  // [S + 1] sequence boundaries of q and k
  std::vector<int64_t> entry;   // [S]: the sequence's bank entry, -1 when it sees no prefix slot
  std::vector<int64_t> lens;    // [T]
  std::vector<int64_t> slot;    // [S]: the sequence's prefix-grad scratch slot (-1 without an entry)
  int64_t slots = 0;
  int64_t lq(int64_t s) const { return cq[s + 1] - cq[s]; }
  int64_t lk(int64_t s) const { return ck[s + 1] - ck[s]; }
  int64_t plen(int64_t s) const { return entry[s] >= 0 ? lens[entry[s]] : 0; }
  // Keys of sequence s visible to its query i (causal, bottom-right aligned), prefix excluded.
  int64_t visible(int64_t s, int64_t i) const {
    return causal ? std::clamp<int64_t>(i + 1 + lk(s) - lq(s), 0, lk(s)) : lk(s);
  }
};

std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu, int64_t S, int64_t total, const char* name) {
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) == S + 1, kOp, ": ", name, " must be [S + 1 = ", S + 1, "], got ",
              cu.sizes());
  TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, kOp, ": ", name,
              " must be int32 or int64, got ", cu.scalar_type());
  TORCH_CHECK(cu.device().is_cpu(), kOp, " (CPU kernel): ", name, " must be on the CPU, got ", cu.device());
  const at::Tensor c = cu.to(at::kLong).contiguous();
  const int64_t* d = c.const_data_ptr<int64_t>();
  std::vector<int64_t> out(d, d + S + 1);
  TORCH_CHECK(out[0] == 0, kOp, ": ", name, "[0] must be 0, got ", out[0]);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(out[s + 1] >= out[s], kOp, ": ", name, " must be non-decreasing, but ", name, "[", s + 1, "] = ",
                out[s + 1], " < ", name, "[", s, "] = ", out[s]);
  }
  TORCH_CHECK(out[S] == total, kOp, ": ", name, "[-1] = ", out[S], " must equal the packed rows ", total);
  return out;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                  const at::Tensor& prefix_v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && prefix_k.dim() == 4 && prefix_v.dim() == 4, kOp,
              ": q, k, v must be 3-D and prefix_k, prefix_v 4-D, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes(),
              ", ", prefix_k.sizes(), ", ", prefix_v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              ": q must be float32/float64/float16/bfloat16, got ", dtype);
  for (const at::Tensor* t : {&q, &k, &v, &prefix_k, &prefix_v}) {
    TORCH_CHECK(t->scalar_type() == dtype, kOp, ": k, v, prefix_k, prefix_v must have q's dtype ", dtype, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), kOp, " (CPU kernel): tensors must be on the CPU, got ", t->device());
  }
  TORCH_CHECK(k.size(2) == q.size(2) && v.sizes() == k.sizes() && k.size(1) > 0 && q.size(1) % k.size(1) == 0, kOp,
              ": k, v must be [Nk, Hkv, D] with Hq % Hkv == 0 (q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(),
              ")");
  TORCH_CHECK(prefix_k.size(1) == k.size(1) && prefix_k.size(3) == q.size(2) && prefix_v.sizes() == prefix_k.sizes(),
              kOp, ": prefix_k, prefix_v must be [T, Hkv, P, D] (k ", k.sizes(), ", prefix_k ", prefix_k.sizes(),
              ", prefix_v ", prefix_v.sizes(), ")");
}

Varlen make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& prefix_k, const at::Tensor& cu_q,
                    const at::Tensor& cu_k, const std::optional<at::Tensor>& prefix_index,
                    const std::optional<at::Tensor>& prefix_lens, bool causal, double scale) {
  Varlen p;
  TORCH_CHECK(cu_q.dim() == 1 && cu_q.size(0) >= 1, kOp, ": cu_seqlens_q must be [S + 1], got ", cu_q.sizes());
  p.S = cu_q.size(0) - 1;
  p.Nq = q.size(0), p.Hq = q.size(1), p.D = q.size(2);
  p.Nk = k.size(0), p.Hkv = k.size(1), p.T = prefix_k.size(0), p.P = prefix_k.size(2);
  p.G = p.Hq / p.Hkv;
  p.causal = causal;
  p.scale = scale;
  p.cq = read_cu_seqlens(cu_q, p.S, p.Nq, "cu_seqlens_q");
  p.ck = read_cu_seqlens(cu_k, p.S, p.Nk, "cu_seqlens_k");
  p.lens = prefix_lengths(prefix_lens, p.T, p.P, kOp);
  p.entry = prefix_entry_per_row(prefix_index, p.S, p.T, kOp);
  p.slot.assign(p.S, -1);
  for (int64_t s = 0; s < p.S; ++s) {
    if (p.entry[s] >= 0 && p.lens[p.entry[s]] == 0) p.entry[s] = -1;
    if (p.entry[s] >= 0 && p.lq(s) > 0) p.slot[s] = p.slots++;
  }
  return p;
}

// Runs work(task, scratch) for every task in [0, n), each exactly once, handing the next task to
// whichever thread is free (tasks should come longest first). make_scratch() builds one thread's buffers.
template <typename MakeScratch, typename Work>
void run_tasks(int64_t n, MakeScratch&& make_scratch, Work&& work) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t task = next.fetch_add(1, std::memory_order_relaxed); task < n;
         task = next.fetch_add(1, std::memory_order_relaxed)) {
      work(task, scratch);
    }
  });
}

// A block of one sequence's queries: rows i0 .. i0 + nq of sequence s.
struct QueryBlock {
  int64_t s, i0, nq, cost;
};

constexpr int64_t kDecodeQueries = 16;  // a sequence of at most this many queries is one block
constexpr int64_t kQBlock = 32, kKBlock = 128, kDecodeKBlock = 256;

int64_t key_block(const Varlen& p, int64_t s) { return p.lq(s) <= kDecodeQueries ? kDecodeKBlock : kKBlock; }

// Every sequence's query blocks, costliest first (the order tasks are handed out in).
std::vector<QueryBlock> forward_blocks(const Varlen& p) {
  std::vector<QueryBlock> blocks;
  for (int64_t s = 0; s < p.S; ++s) {
    const int64_t Lq = p.lq(s), bq = Lq <= kDecodeQueries ? Lq : kQBlock;
    for (int64_t i0 = 0; i0 < Lq; i0 += bq) {
      const int64_t nq = std::min(bq, Lq - i0);
      blocks.push_back({s, i0, nq, nq * (p.plen(s) + p.visible(s, i0 + nq - 1) + 8)});
    }
  }
  std::stable_sort(blocks.begin(), blocks.end(),
                   [](const QueryBlock& a, const QueryBlock& b) { return a.cost > b.cost; });
  return blocks;
}

// Token / head strides of a 3-D [N, H, D] tensor (unit last stride), or of a bank's [T, H, P] dims.
struct View {
  int64_t s0, s1, s2;
  explicit View(const at::Tensor& t) : s0(t.stride(0)), s1(t.stride(1)), s2(t.dim() > 3 ? t.stride(2) : 1) {}
};

// out [Nq, Hq, D] (contiguous, scalar_t) and lse [Hq, Nq] (contiguous, acc_t).
template <typename scalar_t, typename acc_t>
void forward_kernel(const Varlen& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& prefix_k, const at::Tensor& prefix_v, at::Tensor& out, at::Tensor& lse) {
  const std::vector<QueryBlock> blocks = forward_blocks(p);
  const View qv(q), kv(k), vv(v), pkv(prefix_k), pvv(prefix_v);
  const flash_core::InputPointers<scalar_t> in(q, k, v, prefix_k, prefix_v);
  scalar_t* od = out.mutable_data_ptr<scalar_t>();
  acc_t* ld_out = lse.mutable_data_ptr<acc_t>();
  const int64_t D = p.D, G = p.G, Hkv = p.Hkv;
  const int64_t max_rows = G * std::max(kQBlock, kDecodeQueries), max_keys = std::max(kKBlock, kDecodeKBlock);

  using Scratch = flash_core::ForwardScratch<acc_t>;
  auto make_scratch = [&] { return Scratch(max_rows, max_keys, D); };
  run_tasks(static_cast<int64_t>(blocks.size()) * Hkv, make_scratch, [&](int64_t task, Scratch& w) {
    const QueryBlock& qb = blocks[task / Hkv];
    const int64_t g = task % Hkv, s = qb.s, i0 = qb.i0, nq = qb.nq;
    const int64_t row0 = p.cq[s] + i0, k0 = p.ck[s], bk = key_block(p, s);
    flash_core::ForwardTile<scalar_t, acc_t> tile(w, {in.q + row0 * qv.s0 + g * G * qv.s1, qv.s1, qv.s0}, G, nq, D, i0,
                                                 p.lk(s) - p.lq(s), p.causal, static_cast<acc_t>(p.scale));
    const int64_t t = p.entry[s];
    if (t >= 0) {
      tile.keys(in.pk + t * pkv.s0 + g * pkv.s1, pkv.s2, in.pv + t * pvv.s0 + g * pvv.s1, pvv.s2, p.lens[t], bk, false);
    }
    tile.keys(in.k + k0 * kv.s0 + g * kv.s1, kv.s0, in.v + k0 * vv.s0 + g * vv.s1, vv.s0, tile.visible_keys(p.lk(s)),
              bk, true);
    tile.store({od + (row0 * p.Hq + g * G) * D, D, p.Hq * D}, {ld_out + g * G * p.Nq + row0, p.Nq, 1});
  });
}

// out in q's dtype [Nq, Hq, D], lse [Hq, Nq] in the accumulation dtype (fp64 for fp64).
std::tuple<at::Tensor, at::Tensor> forward(const Varlen& p, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& prefix_k,
                                           const at::Tensor& prefix_v) {
  return flash_core::run_forward(q, {p.Nq, p.Hq, p.D}, {p.Hq, p.Nq}, "prefix_flash_varlen_fwd",
                                 [&](auto types, at::Tensor& out, at::Tensor& lse) {
                                   using T = decltype(types);
                                   forward_kernel<typename T::scalar, typename T::acc>(p, q, k, v, prefix_k, prefix_v,
                                                                                       out, lse);
                                 });
}

// grad_out, out: [Nq, Hq, D] (any token / head strides) in scalar_t; lse [Hq, Nq] contiguous acc_t with
// +inf where a query sees nothing. dq [Nq, Hq, D], dk, dv [Nk, Hkv, D] contiguous scalar_t, zero-filled;
// dprefix [slots, Hkv, P, D] contiguous acc_t scratch (sequence s's contribution to its entry at slot[s]).
template <typename scalar_t, typename acc_t>
void backward_kernel(const Varlen& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& out,
                     const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dpk_rows,
                     at::Tensor& dpv_rows) {
  const View qv(q), kv(k), vv(v), pkv(prefix_k), pvv(prefix_v), gv(grad_out), ov(out);
  const flash_core::InputPointers<scalar_t> in(q, k, v, prefix_k, prefix_v);
  const flash_core::BackwardPointers<scalar_t, acc_t> bp(grad_out, out, lse, dq, dk, dv, dpk_rows, dpv_rows);
  const int64_t D = p.D, G = p.G, Hkv = p.Hkv;

  // (s, g) tasks of sequences with queries, costliest first.
  std::vector<int64_t> seqs;
  int64_t max_lq = 0;
  for (int64_t s = 0; s < p.S; ++s) {
    if (p.lq(s) == 0) continue;
    seqs.push_back(s);
    max_lq = std::max(max_lq, p.lq(s));
  }
  auto cost = [&](int64_t s) {
    int64_t keys = 0;
    for (int64_t i = 0; i < p.lq(s); ++i) keys += p.visible(s, i);
    return keys + p.lq(s) * (p.plen(s) + 8);
  };
  std::vector<int64_t> costs(p.S, 0);
  for (int64_t s : seqs) costs[s] = cost(s);
  std::stable_sort(seqs.begin(), seqs.end(), [&](int64_t a, int64_t b) { return costs[a] > costs[b]; });

  using Scratch = flash_core::BackwardScratch<acc_t>;
  auto make_scratch = [&] { return Scratch(G * max_lq, D); };
  run_tasks(static_cast<int64_t>(seqs.size()) * Hkv, make_scratch, [&](int64_t task, Scratch& w) {
    const int64_t s = seqs[task / Hkv], g = task % Hkv;
    const int64_t Lq = p.lq(s), Lk = p.lk(s), q0 = p.cq[s], k0 = p.ck[s], head0 = g * G;
    flash_core::BackwardTile<scalar_t, acc_t> tile(
        w, {in.q + q0 * qv.s0 + head0 * qv.s1, qv.s1, qv.s0}, {bp.grad_out + q0 * gv.s0 + head0 * gv.s1, gv.s1, gv.s0},
        {bp.out + q0 * ov.s0 + head0 * ov.s1, ov.s1, ov.s0}, {bp.lse + head0 * p.Nq + q0, p.Nq, 1}, G, Lq, D, Lk - Lq,
        p.causal, static_cast<acc_t>(p.scale));
    const int64_t t = p.entry[s];
    if (t >= 0) {
      const int64_t slab = (p.slot[s] * Hkv + g) * p.P * D;
      tile.prefix(in.pk + t * pkv.s0 + g * pkv.s1, pkv.s2, in.pv + t * pvv.s0 + g * pvv.s1, pvv.s2, p.lens[t],
                  bp.dpk + slab, bp.dpv + slab);
    }
    tile.keys(in.k + k0 * kv.s0 + g * kv.s1, kv.s0, in.v + k0 * vv.s0 + g * vv.s1, vv.s0, Lk, {},
              bp.dk + (k0 * Hkv + g) * D, bp.dv + (k0 * Hkv + g) * D, Hkv * D);
    tile.store_dq({bp.dq + (q0 * p.Hq + head0) * D, D, p.Hq * D});
  });
}

std::tuple<at::Tensor, at::Tensor> prefix_flash_varlen_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& prefix_k_in,
    const at::Tensor& prefix_v_in, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t /*max_seqlen_q*/, int64_t /*max_seqlen_k*/, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, bool causal, double softmax_scale) {
  check_inputs(q_in, k_in, v_in, prefix_k_in, prefix_v_in);
  const at::Tensor q = last_dim_dense(q_in), k = last_dim_dense(k_in), v = last_dim_dense(v_in);
  const at::Tensor prefix_k = last_dim_dense(prefix_k_in), prefix_v = last_dim_dense(prefix_v_in);
  const Varlen p =
      make_problem(q, k, prefix_k, cu_seqlens_q, cu_seqlens_k, prefix_index, prefix_lens, causal, softmax_scale);
  auto [out, lse] = forward(p, q, k, v, prefix_k, prefix_v);
  return {out, lse.scalar_type() == at::kFloat ? lse : lse.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_flash_varlen_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& prefix_k_in, const at::Tensor& prefix_v_in, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t /*max_seqlen_q*/, int64_t /*max_seqlen_k*/,
    const std::optional<at::Tensor>& prefix_index, const std::optional<at::Tensor>& prefix_lens, bool causal,
    double softmax_scale, const at::Tensor& out_in, const at::Tensor& lse_in) {
  check_inputs(q_in, k_in, v_in, prefix_k_in, prefix_v_in);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), kOp, "_bwd: grad_out ",
              grad_out_in.sizes(), " and out ", out_in.sizes(), " must be like q ", q_in.sizes());
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == q_in.size(1) && lse_in.size(1) == q_in.size(0), kOp, "_bwd: lse ",
              lse_in.sizes(), " must be [Hq, Nq] of q ", q_in.sizes());
  const auto dtype = q_in.scalar_type();
  const auto acc = acc_type(dtype);
  const at::Tensor q = last_dim_dense(q_in), k = last_dim_dense(k_in), v = last_dim_dense(v_in);
  const at::Tensor prefix_k = last_dim_dense(prefix_k_in), prefix_v = last_dim_dense(prefix_v_in);
  const Varlen p =
      make_problem(q, k, prefix_k, cu_seqlens_q, cu_seqlens_k, prefix_index, prefix_lens, causal, softmax_scale);
  at::Tensor dq = at::zeros({p.Nq, p.Hq, p.D}, q.options());
  at::Tensor dk = at::zeros({p.Nk, p.Hkv, p.D}, k.options());
  at::Tensor dv = at::zeros({p.Nk, p.Hkv, p.D}, v.options());
  at::Tensor dpk = at::zeros(prefix_k.sizes(), prefix_k.options());
  at::Tensor dpv = at::zeros(prefix_v.sizes(), prefix_v.options());
  if (p.Nq == 0 || p.D == 0 || p.Hq == 0) return {dq, dk, dv, dpk, dpv};

  at::Tensor out, lse;
  std::tie(out, lse) =
      flash_core::saved_for_backward(dtype, out_in, lse_in, [&] { return forward(p, q, k, v, prefix_k, prefix_v); });
  const at::Tensor grad_out = last_dim_dense(grad_out_in.to(dtype));
  at::Tensor dpk_rows = at::zeros({p.slots, p.Hkv, p.P, p.D}, q.options().dtype(acc));
  at::Tensor dpv_rows = at::zeros({p.slots, p.Hkv, p.P, p.D}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "prefix_flash_varlen_bwd", [&] {
    using acc_t = flash_core::acc_of<scalar_t>;
    backward_kernel<scalar_t, acc_t>(p, grad_out, q, k, v, prefix_k, prefix_v, out, lse, dq, dk, dv, dpk_rows,
                                     dpv_rows);
    const auto seq_slot = [&](int64_t s) { return p.slot[s]; };
    flash_core::reduce_prefix_grads<scalar_t, acc_t>(dpk_rows, dpk, p.entry, p.lens, p.Hkv, p.P, p.D, seq_slot);
    flash_core::reduce_prefix_grads<scalar_t, acc_t>(dpv_rows, dpv, p.entry, p.lens, p.Hkv, p.P, p.D, seq_slot);
  });
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace
}  // namespace peft_kernels

TORCH_LIBRARY_FRAGMENT(peft_kernels, m) {
  m.def(
      "prefix_flash_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? prefix_index, Tensor? prefix_lens, "
      "bool causal, float softmax_scale) -> (Tensor, Tensor)");
  m.def(
      "prefix_flash_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? prefix_index, "
      "Tensor? prefix_lens, bool causal, float softmax_scale, Tensor out, Tensor lse) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("prefix_flash_varlen_fwd", &peft_kernels::prefix_flash_varlen_fwd_cpu);
  m.impl("prefix_flash_varlen_bwd", &peft_kernels::prefix_flash_varlen_bwd_cpu);
}

PK_DIRECT_CALL(prefix_flash_varlen_fwd, peft_kernels::prefix_flash_varlen_fwd_cpu);
PK_DIRECT_CALL(prefix_flash_varlen_bwd, peft_kernels::prefix_flash_varlen_bwd_cpu);

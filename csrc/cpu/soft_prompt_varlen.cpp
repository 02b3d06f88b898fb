// Packed (varlen) soft-prompt ops: schemas and CPU kernels of soft_prompt_{embed,concat}_varlen_{fwd,bwd}.
// Arguments and results are those of the reference functions soft_prompt_{embed,concat}_varlen[_backward]
// in peft_kernels.reference, so peft_kernels.ops registers these ops as its "cpp" backend directly.
//
// S sequences lie back to back (cu_seqlens int32 [S + 1]); output sequence s is its entry's first
// prompt_lens[t] prompt rows followed by its tokens (cu_seqlens_out [S + 1] holds the output bounds).
// The boundaries, the index and the lengths are read and checked on the host once, before any output
// byte is written (they must agree with cu_seqlens_out). Then:
// - forward: one parallel pass over the output rows; each row is copied once from its source (a prompt
//   row, an embeds row or a table row), consecutive rows with contiguous sources in one memcpy;
// - dprompts[t, p]: the sum over the sequences using t, in ascending order, in fp32 (fp64 for fp64),
//   one (slot, H chunk) per work item, so the bits do not depend on the thread count; rows past
//   prompt_lens and unused entries are written as zeros;
// - dweight[v]: the sum of the grads of the tokens with id v in token order (a host counting sort of
//   the ids), every row written once (zeros for unused ids): no atomics, no memset pass;
// - dembeds: a gather of the token rows of grad_out.
#include "soft_prompt_common.h"
#include "direct_call.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <type_traits>

namespace peft_kernels {

namespace {

using namespace soft_prompt_cpu;

// The packing of one call, read on the host.
struct Packing {
  int64_t S = 0, N = 0, T = 0, P = 0, total = 0;
  std::vector<int64_t> cu, cu_out;  // [S + 1]: token and output bounds of each sequence
  std::vector<int64_t> entry;       // [S]: bank entry or -1
  std::vector<int64_t> length;      // [T]: prompt length of each entry
  // Sequences using entry t, ascending: order[starts[t] .. starts[t + 1]) (filled when grouped).
  std::vector<int64_t> order, starts;

  int64_t prompt_rows(int64_t s) const { return entry[s] < 0 ? 0 : length[entry[s]]; }
  // Output row of token i of sequence s is i + shift(s).
  int64_t shift(int64_t s) const { return cu_out[s] + prompt_rows(s) - cu[s]; }
};

std::vector<int64_t> bounds(const char* op, const char* name, const at::Tensor& t, int64_t size) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on CPU, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kInt && t.size(0) == size, op, ": ", name,
              " must be int32 [", size, "], got ", t.scalar_type(), " ", t.sizes());
  const at::Tensor c = t.contiguous();
  const int32_t* p = c.const_data_ptr<int32_t>();
  return std::vector<int64_t>(p, p + size);
}

// Reads and checks every host-side argument; `ref` names the tensor whose device the others must share.
Packing packing(const char* op, const at::Tensor& cu_seqlens, const at::Tensor& cu_seqlens_out, int64_t N,
                int64_t total, int64_t T, int64_t P, const std::optional<at::Tensor>& prompt_index,
                const std::optional<at::Tensor>& prompt_lens, const char* ref_name, const at::Tensor& ref,
                bool grouped) {
  Packing k;
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, op, ": cu_seqlens must be [S + 1], got ",
              cu_seqlens.sizes());
  TORCH_CHECK(T >= 0 && P >= 0, op, ": num_prompts (", T, ") and prompt_len (", P, ") must be >= 0");
  k.S = cu_seqlens.size(0) - 1;
  k.N = N;
  k.T = T;
  k.P = P;
  k.total = total;
  k.cu = bounds(op, "cu_seqlens", cu_seqlens, k.S + 1);
  k.cu_out = bounds(op, "cu_seqlens_out", cu_seqlens_out, k.S + 1);
  TORCH_CHECK(k.cu[0] == 0 && k.cu[k.S] == N, op, ": cu_seqlens must run from 0 to N = ", N, ", got ", k.cu[0],
              " .. ", k.cu[k.S]);
  k.entry.resize(k.S);
  if (prompt_index.has_value()) {
    check_index("prompt_index", *prompt_index, k.S, ref.device(), op, ref_name);
    const at::Tensor index = prompt_index->to(at::kLong).contiguous();
    const int64_t* ip = index.const_data_ptr<int64_t>();
    for (int64_t s = 0; s < k.S; ++s) {
      TORCH_CHECK(ip[s] >= -1 && ip[s] < T, op, ": prompt_index[", s, "] = ", ip[s], " is out of range [-1, ", T,
                  ")");
      k.entry[s] = ip[s];
    }
  } else {
    TORCH_CHECK(T == 1 || T == k.S, op, ": prompt_index is None, so T (", T, ") must be 1 or S (", k.S, ")");
    for (int64_t s = 0; s < k.S; ++s) k.entry[s] = T == 1 ? 0 : s;
  }
  k.length.assign(T, P);
  if (prompt_lens.has_value()) {
    check_index("prompt_lens", *prompt_lens, T, ref.device(), op, ref_name);
    const at::Tensor lens = prompt_lens->to(at::kLong).contiguous();
    const int64_t* lp = lens.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(lp[t] >= 0 && lp[t] <= P, op, ": prompt_lens[", t, "] = ", lp[t], " is outside [0, P = ", P, "]");
      k.length[t] = lp[t];
    }
  }
  TORCH_CHECK(k.cu_out[0] == 0 && k.cu_out[k.S] == total, op, ": cu_seqlens_out must run from 0 to total_out = ",
              total, ", got ", k.cu_out[0], " .. ", k.cu_out[k.S]);
  for (int64_t s = 0; s < k.S; ++s) {
    TORCH_CHECK(k.cu[s + 1] >= k.cu[s], op, ": cu_seqlens decreases at ", s + 1);
    TORCH_CHECK(k.cu_out[s + 1] - k.cu_out[s] == k.cu[s + 1] - k.cu[s] + k.prompt_rows(s), op, ": sequence ", s,
                " has ", k.cu[s + 1] - k.cu[s], " tokens and ", k.prompt_rows(s),
                " prompt rows, but cu_seqlens_out gives it ", k.cu_out[s + 1] - k.cu_out[s], " output rows");
  }
  if (grouped) {  // counting sort of the sequences by entry: stable, so each entry's sequences stay ascending
    k.starts.assign(T + 1, 0);
    for (int64_t t : k.entry)
      if (t >= 0) ++k.starts[t + 1];
    for (int64_t t = 0; t < T; ++t) k.starts[t + 1] += k.starts[t];
    k.order.resize(k.starts[T]);
    std::vector<int64_t> next(k.starts.begin(), k.starts.end() - 1);
    for (int64_t s = 0; s < k.S; ++s)
      if (k.entry[s] >= 0) k.order[next[k.entry[s]]++] = s;
  }
  return k;
}

// The sequence holding row r of a packing with bounds b [S + 1] (b[s] <= r < b[s + 1]; r < b[S]).
int64_t sequence_of(const std::vector<int64_t>& b, int64_t r) {
  return std::upper_bound(b.begin() + 1, b.end(), r) - (b.begin() + 1);
}

int64_t element_size(const at::Tensor& t) {
  int64_t size = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "soft_prompt_varlen_cpu",
                                  [&] { size = static_cast<int64_t>(sizeof(scalar_t)); });
  return size;
}

// Fills out [total, H] (contiguous). copy_tokens(dst, i, n) writes the output rows of tokens i..i+n-1.
template <typename CopyTokens>
void write_packed(char* out, int64_t row_bytes, const Packing& k, const char* prompts, const CopyTokens& copy_tokens) {
  at::parallel_for(0, k.total, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin, s = sequence_of(k.cu_out, begin); r < end; ++s) {
      const int64_t seq_end = std::min(k.cu_out[s + 1], end);
      const int64_t prompt_end = std::min(k.cu_out[s] + k.prompt_rows(s), seq_end);
      if (r < prompt_end) {
        const int64_t slot = k.entry[s] * k.P + (r - k.cu_out[s]);
        std::memcpy(out + r * row_bytes, prompts + slot * row_bytes, (prompt_end - r) * row_bytes);
        r = prompt_end;
      }
      if (r < seq_end) {
        copy_tokens(out + r * row_bytes, r - k.shift(s), seq_end - r);
        r = seq_end;
      }
    }
  });
}

void check_bank(const char* op, const char* ref_name, const at::Tensor& ref, const at::Tensor& prompts) {
  TORCH_CHECK(ref.device().is_cpu(), op, ": ", ref_name, " must be on CPU, got ", ref.device());
  TORCH_CHECK(ref.dim() == 2, op, ": ", ref_name, " must be 2-D, got ", ref.sizes());
  TORCH_CHECK(is_float_dtype(ref.scalar_type()), op, ": ", ref_name,
              " must be float32/float64/float16/bfloat16, got ", ref.scalar_type());
  TORCH_CHECK(prompts.dim() == 3 && prompts.size(2) == ref.size(1), op, ": prompts must be [T, P, H] with H = ",
              ref.size(1), ", got ", prompts.sizes());
  TORCH_CHECK(prompts.scalar_type() == ref.scalar_type(), op, ": prompts dtype ", prompts.scalar_type(), " != ",
              ref_name, " dtype ", ref.scalar_type());
  TORCH_CHECK(prompts.device() == ref.device(), op, ": prompts is on ", prompts.device(), " but ", ref_name,
              " is on ", ref.device());
}

// Rows read through their stride: only a unit-stride last dim is needed.
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(1) == 1 || t.size(1) <= 1 ? t : t.contiguous(); }

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// dst[0:n] = the sum of the k >= 1 rows src(0..k-1) in acc_type, in row order (n <= kMaxChunk).
template <typename scalar_t, typename Row>
inline void sum_rows(scalar_t* dst, int64_t n, int64_t k, const Row& src) {
  using acc_t = acc_type<scalar_t>;
  acc_t acc[kMaxChunk];
  const scalar_t* x0 = src(0);
  for (int64_t h = 0; h < n; ++h) acc[h] = static_cast<acc_t>(x0[h]);
  for (int64_t r = 1; r < k; ++r) {
    const scalar_t* x = src(r);
    for (int64_t h = 0; h < n; ++h) acc[h] += static_cast<acc_t>(x[h]);
  }
  for (int64_t h = 0; h < n; ++h) dst[h] = static_cast<scalar_t>(acc[h]);
}

// dp [T, P, H] from g [total, H] (contiguous).
template <typename scalar_t>
void prompt_grads(scalar_t* dp, const scalar_t* g, int64_t H, const Packing& k) {
  const int64_t slots = k.T * k.P, chunk = h_chunk(H, slots), pieces = ceil_div(H, chunk);
  const int64_t per_entry = std::max<int64_t>(1, ceil_div(k.S, std::max<int64_t>(k.T, 1)));
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / int64_t(sizeof(scalar_t)) / (per_entry * chunk));
  at::parallel_for(0, slots * pieces, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t slot = item / pieces, h0 = (item % pieces) * chunk, n = std::min(chunk, H - h0);
      const int64_t t = slot / k.P, p = slot % k.P;
      scalar_t* dst = dp + slot * H + h0;
      const int64_t first = k.starts[t], count = k.starts[t + 1] - first;
      if (p >= k.length[t] || count == 0) {
        std::memset(static_cast<void*>(dst), 0, n * sizeof(scalar_t));
        continue;
      }
      const int64_t* seqs = k.order.data() + first;
      sum_rows(dst, n, count, [&](int64_t r) { return g + (k.cu_out[seqs[r]] + p) * H + h0; });
    }
  });
}

// dw [V, H] from the token rows of g [total, H] (contiguous).
template <typename scalar_t, typename id_t>
void token_grads(scalar_t* dw, const scalar_t* g, const id_t* ids, int64_t V, int64_t H, const Packing& k) {
  std::vector<int64_t> starts(V + 1, 0), rows(k.N);
  for (int64_t i = 0; i < k.N; ++i) {
    const int64_t v = static_cast<int64_t>(ids[i]);
    TORCH_CHECK(v >= 0 && v < V, "soft_prompt_embed_varlen_bwd: input_ids[", i, "] = ", v,
                " is outside [0, vocab_size = ", V, ")");
    ++starts[v + 1];
  }
  for (int64_t v = 0; v < V; ++v) starts[v + 1] += starts[v];
  {
    std::vector<int64_t> next(starts.begin(), starts.end() - 1);
    for (int64_t s = 0; s < k.S; ++s) {  // output row of each token, grouped by id in token order
      const int64_t shift = k.shift(s);
      for (int64_t i = k.cu[s]; i < k.cu[s + 1]; ++i) rows[next[static_cast<int64_t>(ids[i])]++] = i + shift;
    }
  }
  const int64_t chunk = h_chunk(H, V), pieces = ceil_div(H, chunk);
  const int64_t work = std::max<int64_t>(1, (k.N + V) * chunk / std::max<int64_t>(V, 1));
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / int64_t(sizeof(scalar_t)) / work);
  at::parallel_for(0, V * pieces, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t v = item / pieces, h0 = (item % pieces) * chunk, n = std::min(chunk, H - h0);
      scalar_t* dst = dw + v * H + h0;
      const int64_t first = starts[v], count = starts[v + 1] - first;
      if (count == 0) {
        std::memset(static_cast<void*>(dst), 0, n * sizeof(scalar_t));
        continue;
      }
      const int64_t* from = rows.data() + first;
      sum_rows(dst, n, count, [&](int64_t r) { return g + from[r] * H + h0; });
    }
  });
}

// dembeds [N, H] from g [total, H] (both contiguous): each token's output row.
void embed_grads(char* de, const char* g, int64_t row_bytes, const Packing& k) {
  at::parallel_for(0, k.N, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin, s = sequence_of(k.cu, begin); i < end; ++s) {
      const int64_t n = std::min(k.cu[s + 1], end) - i;
      if (n <= 0) continue;
      std::memcpy(de + i * row_bytes, g + (i + k.shift(s)) * row_bytes, n * row_bytes);
      i += n;
    }
  });
}

at::Tensor checked_grad(const char* op, const at::Tensor& grad_out) {
  TORCH_CHECK(grad_out.device().is_cpu(), op, ": grad_out must be on CPU, got ", grad_out.device());
  TORCH_CHECK(grad_out.dim() == 2, op, ": grad_out must be [total_out, H], got ", grad_out.sizes());
  TORCH_CHECK(is_float_dtype(grad_out.scalar_type()), op,
              ": grad_out must be float32/float64/float16/bfloat16, got ", grad_out.scalar_type());
  return grad_out.contiguous();
}

}  // namespace

at::Tensor soft_prompt_embed_varlen_fwd_cpu(const at::Tensor& input_ids, const at::Tensor& weight,
                                            const at::Tensor& prompts, const at::Tensor& cu_seqlens,
                                            const at::Tensor& cu_seqlens_out, int64_t total_out,
                                            const std::optional<at::Tensor>& prompt_index,
                                            const std::optional<at::Tensor>& prompt_lens) {
  constexpr const char* op = "soft_prompt_embed_varlen_fwd";
  check_bank(op, "weight", weight, prompts);
  TORCH_CHECK(input_ids.dim() == 1 && is_index_dtype(input_ids), op, ": input_ids must be int32/int64 [N], got ",
              input_ids.scalar_type(), " ", input_ids.sizes());
  TORCH_CHECK(input_ids.device() == weight.device(), op, ": input_ids is on ", input_ids.device(),
              " but weight is on ", weight.device());
  const Packing k = packing(op, cu_seqlens, cu_seqlens_out, input_ids.size(0), total_out, prompts.size(0),
                            prompts.size(1), prompt_index, prompt_lens, "weight", weight, false);
  const at::Tensor w = unit_last_stride(weight), ids = input_ids.contiguous(), pr = prompts.contiguous();
  const int64_t V = w.size(0), H = w.size(1);
  at::Tensor out = at::empty({total_out, H}, w.options());
  const int64_t es = element_size(w), row_bytes = H * es, table_stride = w.stride(0) * es;
  const char* table = static_cast<const char*>(w.const_data_ptr());
  std::atomic<bool> out_of_range{false};
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "soft_prompt_embed_varlen_fwd_cpu", [&] {
    const index_t* id = ids.const_data_ptr<index_t>();
    write_packed(static_cast<char*>(out.mutable_data_ptr()), row_bytes, k,
                 static_cast<const char*>(pr.const_data_ptr()), [&](char* dst, int64_t i, int64_t n) {
                   for (int64_t j = i; j < i + n; ++j, dst += row_bytes) {
                     const int64_t v = static_cast<int64_t>(id[j]);
                     if (v >= 0 && v < V) {
                       std::memcpy(dst, table + v * table_stride, row_bytes);
                     } else {
                       std::memset(dst, 0, row_bytes);
                       out_of_range.store(true, std::memory_order_relaxed);
                     }
                   }
                 });
  });
  TORCH_CHECK(!out_of_range.load(), op, ": input_ids holds a token id outside [0, ", V, ") (weight has ", V,
              " rows)");
  return out;
}

at::Tensor soft_prompt_concat_varlen_fwd_cpu(const at::Tensor& embeds, const at::Tensor& prompts,
                                             const at::Tensor& cu_seqlens, const at::Tensor& cu_seqlens_out,
                                             int64_t total_out, const std::optional<at::Tensor>& prompt_index,
                                             const std::optional<at::Tensor>& prompt_lens) {
  constexpr const char* op = "soft_prompt_concat_varlen_fwd";
  check_bank(op, "embeds", embeds, prompts);
  const Packing k = packing(op, cu_seqlens, cu_seqlens_out, embeds.size(0), total_out, prompts.size(0),
                            prompts.size(1), prompt_index, prompt_lens, "embeds", embeds, false);
  const at::Tensor e = unit_last_stride(embeds), pr = prompts.contiguous();
  const int64_t H = e.size(1);
  at::Tensor out = at::empty({total_out, H}, e.options());
  const int64_t es = element_size(e), row_bytes = H * es, src_stride = e.stride(0) * es;
  const char* src = static_cast<const char*>(e.const_data_ptr());
  write_packed(static_cast<char*>(out.mutable_data_ptr()), row_bytes, k, static_cast<const char*>(pr.const_data_ptr()),
               [&](char* dst, int64_t i, int64_t n) {
                 const char* from = src + i * src_stride;
                 if (src_stride == row_bytes || n == 1) {
                   std::memcpy(dst, from, n * row_bytes);
                 } else {
                   for (int64_t j = 0; j < n; ++j) std::memcpy(dst + j * row_bytes, from + j * src_stride, row_bytes);
                 }
               });
  return out;
}

std::tuple<at::Tensor, at::Tensor> soft_prompt_embed_varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input_ids, const at::Tensor& cu_seqlens,
    const at::Tensor& cu_seqlens_out, int64_t vocab_size, int64_t num_prompts, int64_t prompt_len,
    const std::optional<at::Tensor>& prompt_index, const std::optional<at::Tensor>& prompt_lens, bool need_dweight) {
  constexpr const char* op = "soft_prompt_embed_varlen_bwd";
  const at::Tensor g = checked_grad(op, grad_out);
  TORCH_CHECK(input_ids.dim() == 1 && is_index_dtype(input_ids), op, ": input_ids must be int32/int64 [N], got ",
              input_ids.scalar_type(), " ", input_ids.sizes());
  TORCH_CHECK(input_ids.device() == g.device(), op, ": input_ids is on ", input_ids.device(), " but grad_out is on ",
              g.device());
  TORCH_CHECK(vocab_size >= 0, op, ": vocab_size must be >= 0, got ", vocab_size);
  const Packing k = packing(op, cu_seqlens, cu_seqlens_out, input_ids.size(0), g.size(0), num_prompts, prompt_len,
                            prompt_index, prompt_lens, "grad_out", g, true);
  const int64_t H = g.size(1);
  at::Tensor dprompts = at::empty({num_prompts, prompt_len, H}, g.options());
  at::Tensor dweight = at::empty({need_dweight ? vocab_size : 0, H}, g.options());
  const at::Tensor ids = input_ids.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "soft_prompt_embed_varlen_bwd_cpu", [&] {
    prompt_grads(dprompts.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), H, k);
    if (!need_dweight) return;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "soft_prompt_embed_varlen_bwd_cpu", [&] {
      token_grads(dweight.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), ids.const_data_ptr<index_t>(),
                  vocab_size, H, k);
    });
  });
  return {dweight, dprompts};
}

std::tuple<at::Tensor, at::Tensor> soft_prompt_concat_varlen_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& cu_seqlens, const at::Tensor& cu_seqlens_out, int64_t num_tokens,
    int64_t num_prompts, int64_t prompt_len, const std::optional<at::Tensor>& prompt_index,
    const std::optional<at::Tensor>& prompt_lens) {
  constexpr const char* op = "soft_prompt_concat_varlen_bwd";
  const at::Tensor g = checked_grad(op, grad_out);
  TORCH_CHECK(num_tokens >= 0, op, ": num_tokens must be >= 0, got ", num_tokens);
  const Packing k = packing(op, cu_seqlens, cu_seqlens_out, num_tokens, g.size(0), num_prompts, prompt_len,
                            prompt_index, prompt_lens, "grad_out", g, true);
  const int64_t H = g.size(1);
  at::Tensor dembeds = at::empty({num_tokens, H}, g.options());
  at::Tensor dprompts = at::empty({num_prompts, prompt_len, H}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "soft_prompt_concat_varlen_bwd_cpu", [&] {
    embed_grads(static_cast<char*>(dembeds.mutable_data_ptr()), static_cast<const char*>(g.const_data_ptr()),
                H * static_cast<int64_t>(sizeof(scalar_t)), k);
    prompt_grads(dprompts.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), H, k);
  });
  return {dembeds, dprompts};
}

}  // namespace peft_kernels

TORCH_LIBRARY_FRAGMENT(peft_kernels, m) {
  m.def(
      "soft_prompt_embed_varlen_fwd(Tensor input_ids, Tensor weight, Tensor prompts, Tensor cu_seqlens, "
      "Tensor cu_seqlens_out, int total_out, Tensor? prompt_index, Tensor? prompt_lens) -> Tensor");
  m.def(
      "soft_prompt_concat_varlen_fwd(Tensor embeds, Tensor prompts, Tensor cu_seqlens, Tensor cu_seqlens_out, "
      "int total_out, Tensor? prompt_index, Tensor? prompt_lens) -> Tensor");
  m.def(
      "soft_prompt_embed_varlen_bwd(Tensor grad_out, Tensor input_ids, Tensor cu_seqlens, Tensor cu_seqlens_out, "
      "int vocab_size, int num_prompts, int prompt_len, Tensor? prompt_index, Tensor? prompt_lens, "
      "bool need_dweight) -> (Tensor, Tensor)");
  m.def(
      "soft_prompt_concat_varlen_bwd(Tensor grad_out, Tensor cu_seqlens, Tensor cu_seqlens_out, int num_tokens, "
      "int num_prompts, int prompt_len, Tensor? prompt_index, Tensor? prompt_lens) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("soft_prompt_embed_varlen_fwd", &peft_kernels::soft_prompt_embed_varlen_fwd_cpu);
  m.impl("soft_prompt_concat_varlen_fwd", &peft_kernels::soft_prompt_concat_varlen_fwd_cpu);
  m.impl("soft_prompt_embed_varlen_bwd", &peft_kernels::soft_prompt_embed_varlen_bwd_cpu);
  m.impl("soft_prompt_concat_varlen_bwd", &peft_kernels::soft_prompt_concat_varlen_bwd_cpu);
}

PK_DIRECT_CALL(soft_prompt_embed_varlen_fwd, peft_kernels::soft_prompt_embed_varlen_fwd_cpu);
PK_DIRECT_CALL(soft_prompt_concat_varlen_fwd, peft_kernels::soft_prompt_concat_varlen_fwd_cpu);
PK_DIRECT_CALL(soft_prompt_embed_varlen_bwd, peft_kernels::soft_prompt_embed_varlen_bwd_cpu);
PK_DIRECT_CALL(soft_prompt_concat_varlen_bwd, peft_kernels::soft_prompt_concat_varlen_bwd_cpu);

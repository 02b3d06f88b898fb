// CPU backward kernels of soft_prompt_embed_bwd and soft_prompt_concat_bwd.
//
// dprompts[t, p] sums grad_out[b, insert_at + p] over the rows b of prompt t, in row order, in fp32
// (fp64 for fp64), one (slot, H chunk) per work item: the result does not depend on the thread
// count. Slots past prompt_lens, -1 rows and unused prompts are never read (zeros are written), so
// NaN/Inf in grad_out there cannot reach dprompts. dweight[v] sums the grads of the tokens with id v,
// in token order (a host counting sort of the ids), and every row is written once (zeros for unused
// ids): no atomics, no memset pass. dembeds copies the token slots of grad_out (zeros on the slots
// that replace=True overwrote).
#include "soft_prompt_common.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

namespace peft_kernels {

namespace {

using namespace soft_prompt_cpu;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// 16 bytes of acc_type lanes as a GCC (>= 9) / Clang vector: explicit SIMD (SSE2 on any x86-64, NEON
// on arm64), with loads that widen bf16/fp16 and stores that round back (to nearest even).
typedef uint16_t u16x4 __attribute__((vector_size(8)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef int16_t i16x4 __attribute__((vector_size(8)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

template <typename scalar_t>
struct Lanes {
  using acc_t = acc_type<scalar_t>;
  static constexpr int64_t kWidth = 16 / sizeof(acc_t);
  typedef acc_t vec __attribute__((vector_size(16)));

  static vec load(const scalar_t* x) {
    vec v;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::memcpy(&v, x, sizeof v);
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      u16x4 raw;
      std::memcpy(&raw, x, sizeof raw);
      // A bf16 is the top half of a float32: interleave zero low halves (one unpack on x86).
#if defined(__clang__) || __GNUC__ >= 12
      const u16x8 bits = __builtin_shufflevector(u16x4{}, raw, 0, 4, 1, 5, 2, 6, 3, 7);
#else
      const u32x4 bits = __builtin_convertvector(raw, u32x4) << 16;
#endif
      std::memcpy(&v, &bits, sizeof v);
    } else {
      v = vec{static_cast<acc_t>(x[0]), static_cast<acc_t>(x[1]), static_cast<acc_t>(x[2]), static_cast<acc_t>(x[3])};
    }
    return v;
  }

  static void store(scalar_t* dst, vec v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::memcpy(dst, &v, sizeof v);
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // c10::BFloat16(float) lane-wise: round to nearest even, NaN -> 0x7FC0. The result is the top
      // half of each rounded word: an arithmetic shift keeps it in int16 range, so the narrowing
      // needs no unsigned pack (which SSE2 lacks).
      u32x4 bits;
      std::memcpy(&bits, &v, sizeof bits);
      const u32x4 nan = reinterpret_cast<u32x4>(v != v);
      const u32x4 word = (nan & 0x7FC00000u) | (~nan & (bits + (((bits >> 16) & 1u) + 0x7FFFu)));
      const i16x4 out = __builtin_convertvector(reinterpret_cast<i32x4>(word) >> 16, i16x4);
      std::memcpy(dst, &out, sizeof out);
    } else {
      for (int64_t i = 0; i < kWidth; ++i) dst[i] = static_cast<scalar_t>(v[i]);
    }
  }
};

// dst[0:n] = sum over the k >= 1 source rows src(0..k-1) (each n elements), in acc_type, in row
// order. A block of kRegs vectors stays in registers across the rows; the sum starts from row 0.
template <typename scalar_t, typename Row>
inline void sum_rows(scalar_t* dst, int64_t n, int64_t k, const Row& src) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  constexpr int64_t kRegs = 8, kBlock = kRegs * L::kWidth;
  int64_t h = 0;
  for (; h + kBlock <= n; h += kBlock) {
    typename L::vec acc[kRegs];
    const scalar_t* x0 = src(0) + h;
#pragma GCC unroll 8
    for (int64_t j = 0; j < kRegs; ++j) acc[j] = L::load(x0 + j * L::kWidth);
    for (int64_t r = 1; r < k; ++r) {
      const scalar_t* x = src(r) + h;
#pragma GCC unroll 8
      for (int64_t j = 0; j < kRegs; ++j) acc[j] += L::load(x + j * L::kWidth);
    }
#pragma GCC unroll 8
    for (int64_t j = 0; j < kRegs; ++j) L::store(dst + h + j * L::kWidth, acc[j]);
  }
  for (; h < n; ++h) {  // the last n % kBlock columns
    acc_t acc = static_cast<acc_t>(src(0)[h]);
    for (int64_t r = 1; r < k; ++r) acc += static_cast<acc_t>(src(r)[h]);
    dst[h] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
inline void zero_fill(scalar_t* dst, int64_t n) {
  std::memset(static_cast<void*>(dst), 0, n * sizeof(scalar_t));
}

// dp [T, P, H] from g [B, S, H] (contiguous).
template <typename scalar_t>
void prompt_grads(scalar_t* dp, const scalar_t* g, int64_t S, const SoftPromptShape& s, const PromptRows& rows) {
  const int64_t slots = s.T * s.P, chunk = h_chunk(s.H, slots), pieces = ceil_div(s.H, chunk);
  const int64_t rows_per_prompt = std::max<int64_t>(1, ceil_div(s.B, std::max<int64_t>(s.T, 1)));
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / int64_t(sizeof(scalar_t)) / (rows_per_prompt * chunk));
  at::parallel_for(0, slots * pieces, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t slot = item / pieces, h0 = (item % pieces) * chunk, n = std::min(chunk, s.H - h0);
      const int64_t t = slot / s.P, p = slot % s.P;
      scalar_t* dst = dp + slot * s.H + h0;
      const int64_t first = rows.starts[t], k = rows.starts[t + 1] - first;
      if (p >= rows.length[t] || k == 0) {
        zero_fill(dst, n);
        continue;
      }
      const int64_t* order = rows.order.data() + first;
      const scalar_t* base = g + (s.insert_at + p) * s.H + h0;
      sum_rows(dst, n, k, [&](int64_t r) { return base + order[r] * S * s.H; });
    }
  });
}

// dw [V, H] from the token slots of g [B, L + P, H] (contiguous).
template <typename scalar_t, typename id_t>
void token_grads(scalar_t* dw, const scalar_t* g, const id_t* ids, const SoftPromptShape& s) {
  const int64_t tokens = s.B * s.L, S = s.L + s.P;
  std::vector<int64_t> starts(s.V + 1, 0), order(tokens);
  for (int64_t i = 0; i < tokens; ++i) {
    const int64_t v = static_cast<int64_t>(ids[i]);
    TORCH_CHECK(v >= 0 && v < s.V, "soft_prompt_embed_bwd: input_ids[", i / std::max<int64_t>(s.L, 1), ", ",
                i % std::max<int64_t>(s.L, 1), "] = ", v, " is outside [0, vocab_size = ", s.V, ")");
    ++starts[v + 1];
  }
  for (int64_t v = 0; v < s.V; ++v) starts[v + 1] += starts[v];
  {
    std::vector<int64_t> next(starts.begin(), starts.end() - 1);
    for (int64_t i = 0; i < tokens; ++i) {  // flat output row of token i, grouped by id in token order
      const int64_t b = i / s.L, j = i % s.L;
      order[next[static_cast<int64_t>(ids[i])]++] = b * S + (j < s.insert_at ? j : j + s.P);
    }
  }
  const int64_t chunk = h_chunk(s.H, s.V), pieces = ceil_div(s.H, chunk);
  const int64_t work = std::max<int64_t>(1, (tokens + s.V) * chunk / std::max<int64_t>(s.V, 1));
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / int64_t(sizeof(scalar_t)) / work);
  at::parallel_for(0, s.V * pieces, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t v = item / pieces, h0 = (item % pieces) * chunk, n = std::min(chunk, s.H - h0);
      scalar_t* dst = dw + v * s.H + h0;
      const int64_t first = starts[v], k = starts[v + 1] - first;
      if (k == 0) {
        zero_fill(dst, n);
        continue;
      }
      const int64_t* rows = order.data() + first;
      sum_rows(dst, n, k, [&](int64_t r) { return g + rows[r] * s.H + h0; });
    }
  });
}

// dembeds [B, L, H] from g [B, S, H] (both contiguous): the token slots, zeros where replace overwrote.
void embed_grads(char* de, const char* g, int64_t S, int64_t row_bytes, const SoftPromptShape& s, bool replace) {
  at::parallel_for(0, s.B * s.L, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end;) {
      const int64_t b = r / s.L, j = r % s.L;
      const bool head = j < s.insert_at;
      const bool prompt = !head && replace && j < s.insert_at + s.P;
      const int64_t seg_end = head ? s.insert_at : prompt ? s.insert_at + s.P : s.L;
      const int64_t n = std::min(seg_end - j, end - r);
      char* dst = de + r * row_bytes;
      if (prompt) {
        std::memset(dst, 0, n * row_bytes);
      } else {
        std::memcpy(dst, g + (b * S + (head || replace ? j : j + s.P)) * row_bytes, n * row_bytes);
      }
      r += n;
    }
  });
}

at::Tensor checked_grad(const char* op, const at::Tensor& grad_out) {
  TORCH_CHECK(grad_out.device().is_cpu(), op, ": grad_out must be on CPU, got ", grad_out.device());
  TORCH_CHECK(grad_out.dim() == 3, op, ": grad_out must be [B, S, H], got ", grad_out.sizes());
  TORCH_CHECK(is_float_dtype(grad_out.scalar_type()), op,
              ": grad_out must be float32/float64/float16/bfloat16, got ", grad_out.scalar_type());
  return grad_out.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> soft_prompt_embed_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input_ids,
                                                             int64_t vocab_size, int64_t num_prompts,
                                                             const std::optional<at::Tensor>& prompt_index,
                                                             const std::optional<at::Tensor>& prompt_lens,
                                                             int64_t insert_at, bool need_dweight) {
  constexpr const char* op = "soft_prompt_embed_bwd";
  const at::Tensor g = checked_grad(op, grad_out);
  TORCH_CHECK(input_ids.dim() == 2 && input_ids.size(0) == g.size(0) && input_ids.size(1) <= g.size(1), op,
              ": input_ids must be [B, L] with B = grad_out.shape[0] and L <= grad_out.shape[1], got input_ids ",
              input_ids.sizes(), " and grad_out ", g.sizes());
  TORCH_CHECK(is_index_dtype(input_ids), op, ": input_ids must be int32 or int64, got ", input_ids.scalar_type());
  TORCH_CHECK(input_ids.device() == g.device(), op, ": input_ids is on ", input_ids.device(), " but grad_out is on ",
              g.device());
  TORCH_CHECK(vocab_size >= 0, op, ": vocab_size must be >= 0, got ", vocab_size);
  SoftPromptShape s{g.size(0), input_ids.size(1), g.size(2), vocab_size, num_prompts, g.size(1) - input_ids.size(1),
                    insert_at, 0};
  TORCH_CHECK(insert_at >= 0 && insert_at <= s.L, op, ": insert_at must be in [0, L = ", s.L, "], got ", insert_at);
  check_bank_args(op, "grad_out", g, s, prompt_index, prompt_lens);
  const PromptRows rows = prompt_rows(op, s, prompt_index, prompt_lens, true);

  at::Tensor dprompts = at::empty({s.T, s.P, s.H}, g.options());
  at::Tensor dweight = at::empty({need_dweight ? s.V : 0, s.H}, g.options());
  const at::Tensor ids = input_ids.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "soft_prompt_embed_bwd_cpu", [&] {
    prompt_grads(dprompts.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), s.L + s.P, s, rows);
    if (!need_dweight) return;
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "soft_prompt_embed_bwd_cpu", [&] {
      token_grads(dweight.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), ids.const_data_ptr<index_t>(),
                  s);
    });
  });
  return {dweight, dprompts};
}

std::tuple<at::Tensor, at::Tensor> soft_prompt_concat_bwd_cpu(const at::Tensor& grad_out, int64_t num_prompts,
                                                              int64_t prompt_len,
                                                              const std::optional<at::Tensor>& prompt_index,
                                                              const std::optional<at::Tensor>& prompt_lens,
                                                              int64_t insert_at, bool replace) {
  constexpr const char* op = "soft_prompt_concat_bwd";
  const at::Tensor g = checked_grad(op, grad_out);
  const int64_t S = g.size(1), L = replace ? S : S - prompt_len;
  TORCH_CHECK(prompt_len >= 0 && L >= 0, op, ": prompt_len must be in [0, ", S, "] for grad_out ", g.sizes(),
              ", got ", prompt_len);
  SoftPromptShape s{g.size(0), L, g.size(2), 0, num_prompts, prompt_len, insert_at, 0};
  const int64_t limit = replace ? L - prompt_len : L;
  TORCH_CHECK(insert_at >= 0 && insert_at <= limit, op, ": insert_at must be in [0, ", limit, "] for grad_out ",
              g.sizes(), " and prompt_len ", prompt_len, replace ? " with replace" : "", ", got ", insert_at);
  check_bank_args(op, "grad_out", g, s, prompt_index, prompt_lens);
  const PromptRows rows = prompt_rows(op, s, prompt_index, prompt_lens, true);

  at::Tensor dembeds = at::empty({s.B, L, s.H}, g.options());
  at::Tensor dprompts = at::empty({s.T, s.P, s.H}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "soft_prompt_concat_bwd_cpu", [&] {
    embed_grads(static_cast<char*>(dembeds.mutable_data_ptr()), static_cast<const char*>(g.const_data_ptr()), S,
                s.H * static_cast<int64_t>(sizeof(scalar_t)), s, replace);
    prompt_grads(dprompts.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), S, s, rows);
  });
  return {dembeds, dprompts};
}

}  // namespace peft_kernels

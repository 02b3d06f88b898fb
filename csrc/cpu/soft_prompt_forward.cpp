// CPU forward kernels of soft_prompt_embed_fwd and soft_prompt_concat_fwd: every output row is
// written exactly once, straight from its source (a table row, an embeds row or a prompt row) or
// as zeros (a -1 row, a slot past prompt_lens). Output rows are split into byte-balanced ranges with
// at::parallel_for; inside a range, consecutive rows with contiguous sources go in one memcpy.
// Masked prompt slots are never read, so NaN/Inf there cannot reach the output.
#include "soft_prompt_common.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <atomic>
#include <cstring>

namespace peft_kernels {

namespace {

using namespace soft_prompt_cpu;

// Fills rows [0, B * S) of out (contiguous [B, S, H], S = L + P, or L with replace). copy_tokens(dst, b, j, n)
// writes token rows j..j+n-1 of batch row b.
template <typename CopyTokens>
void write_sequence(char* out, int64_t S, int64_t row_bytes, const SoftPromptShape& s, bool replace,
                    const PromptRows& rows, const char* prompts, const CopyTokens& copy_tokens) {
  at::parallel_for(0, s.B * S, grain_rows(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end;) {
      const int64_t b = r / S, pos = r % S, p = pos - s.insert_at;
      char* dst = out + r * row_bytes;
      if (p >= 0 && p < s.P) {
        const int64_t n = std::min(s.P - p, end - r);
        const int64_t real = std::clamp<int64_t>(rows.real_slots(b) - p, 0, n);
        if (real > 0) std::memcpy(dst, prompts + (rows.entry[b] * s.P + p) * row_bytes, real * row_bytes);
        if (n > real) std::memset(dst + real * row_bytes, 0, (n - real) * row_bytes);  // zero bytes: +0.0
        r += n;
      } else {
        const int64_t n = std::min((p < 0 ? s.insert_at : S) - pos, end - r);
        copy_tokens(dst, b, p < 0 || replace ? pos : pos - s.P, n);
        r += n;
      }
    }
  });
}

int64_t element_size(const at::Tensor& t) {
  int64_t size = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "soft_prompt_cpu",
                                  [&] { size = static_cast<int64_t>(sizeof(scalar_t)); });
  return size;
}

}  // namespace

at::Tensor soft_prompt_embed_fwd_cpu(const at::Tensor& input_ids, const at::Tensor& weight,
                                     const at::Tensor& prompts, const std::optional<at::Tensor>& prompt_index,
                                     const std::optional<at::Tensor>& prompt_lens, int64_t insert_at) {
  const SoftPromptShape s =
      check_soft_prompt_embed(input_ids, weight, prompts, prompt_index, prompt_lens, insert_at, c10::kCPU);
  const PromptRows rows = prompt_rows("soft_prompt_embed_fwd", s, prompt_index, prompt_lens, false);
  // Table rows are read through their stride (a view of a wider table is not copied).
  const at::Tensor w = weight.stride(1) == 1 || s.H <= 1 ? weight : weight.contiguous();
  const at::Tensor ids = input_ids.contiguous(), pr = prompts.contiguous();
  at::Tensor out = at::empty({s.B, s.L + s.P, s.H}, w.options());
  const int64_t es = element_size(w), row_bytes = s.H * es, table_stride = w.stride(0) * es;
  const char* table = static_cast<const char*>(w.const_data_ptr());
  std::atomic<bool> out_of_range{false};
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "soft_prompt_embed_fwd_cpu", [&] {
    const index_t* id = ids.const_data_ptr<index_t>();
    write_sequence(static_cast<char*>(out.mutable_data_ptr()), s.L + s.P, row_bytes, s, false, rows,
                   static_cast<const char*>(pr.const_data_ptr()), [&](char* dst, int64_t b, int64_t j, int64_t n) {
                     const index_t* tok = id + b * s.L + j;
                     for (int64_t i = 0; i < n; ++i, dst += row_bytes) {
                       const int64_t v = static_cast<int64_t>(tok[i]);
                       if (v >= 0 && v < s.V) {
                         std::memcpy(dst, table + v * table_stride, row_bytes);
                       } else {
                         std::memset(dst, 0, row_bytes);
                         out_of_range.store(true, std::memory_order_relaxed);
                       }
                     }
                   });
  });
  TORCH_CHECK(!out_of_range.load(), "soft_prompt_embed_fwd: input_ids holds a token id outside [0, ", s.V,
              ") (weight has ", s.V, " rows)");
  return out;
}

at::Tensor soft_prompt_concat_fwd_cpu(const at::Tensor& embeds, const at::Tensor& prompts,
                                      const std::optional<at::Tensor>& prompt_index,
                                      const std::optional<at::Tensor>& prompt_lens, int64_t insert_at, bool replace) {
  constexpr const char* op = "soft_prompt_concat_fwd";
  TORCH_CHECK(embeds.device().is_cpu(), op, ": embeds must be on CPU, got ", embeds.device());
  TORCH_CHECK(embeds.dim() == 3, op, ": embeds must be [B, L, H], got ", embeds.sizes());
  TORCH_CHECK(is_float_dtype(embeds.scalar_type()), op, ": embeds must be float32/float64/float16/bfloat16, got ",
              embeds.scalar_type());
  TORCH_CHECK(prompts.dim() == 3 && prompts.size(2) == embeds.size(2), op, ": prompts must be [T, P, H] with H = ",
              embeds.size(2), ", got ", prompts.sizes());
  TORCH_CHECK(prompts.scalar_type() == embeds.scalar_type(), op, ": prompts dtype ", prompts.scalar_type(),
              " != embeds dtype ", embeds.scalar_type());
  TORCH_CHECK(prompts.device() == embeds.device(), op, ": prompts is on ", prompts.device(), " but embeds is on ",
              embeds.device());
  SoftPromptShape s{embeds.size(0), embeds.size(1), embeds.size(2), 0, prompts.size(0), prompts.size(1), insert_at, 0};
  const int64_t limit = replace ? s.L - s.P : s.L;
  TORCH_CHECK(insert_at >= 0 && insert_at <= limit, op, ": insert_at must be in [0, ", limit, "] for embeds ",
              embeds.sizes(), " and prompts ", prompts.sizes(), replace ? " with replace" : "", ", got ", insert_at);
  check_bank_args(op, "embeds", embeds, s, prompt_index, prompt_lens);
  const PromptRows rows = prompt_rows(op, s, prompt_index, prompt_lens, false);

  // Rows of embeds are read through their strides; only a unit-stride last dim is needed.
  const at::Tensor e = embeds.stride(2) == 1 || s.H <= 1 ? embeds : embeds.contiguous();
  const at::Tensor pr = prompts.contiguous();
  const int64_t S = replace ? s.L : s.L + s.P;
  at::Tensor out = at::empty({s.B, S, s.H}, e.options());
  const int64_t es = element_size(e), row_bytes = s.H * es;
  const int64_t sb = e.stride(0) * es, sl = e.stride(1) * es;
  const char* src = static_cast<const char*>(e.const_data_ptr());
  write_sequence(static_cast<char*>(out.mutable_data_ptr()), S, row_bytes, s, replace, rows,
                 static_cast<const char*>(pr.const_data_ptr()), [&](char* dst, int64_t b, int64_t j, int64_t n) {
                   const char* from = src + b * sb + j * sl;
                   if (sl == row_bytes || n == 1) {
                     std::memcpy(dst, from, n * row_bytes);
                   } else {
                     for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * row_bytes, from + i * sl, row_bytes);
                   }
                 });
  return out;
}

}  // namespace peft_kernels

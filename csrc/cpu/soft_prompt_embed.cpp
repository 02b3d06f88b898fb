#include "../soft_prompt_embed.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <cstring>

namespace peft_kernels {

namespace {

// Returns false if some index was out of range (that row is zero-filled).
template <typename id_t>
bool copy_rows(char* out, const char* weight, const char* prompts, const id_t* ids, const int64_t* prompt_index,
               const int64_t* prompt_lens, const SoftPromptShape& s, size_t row_bytes) {
  const int64_t seq = s.L + s.P, rows = s.B * seq;
  const bool parallel = rows > 1 && rows * row_bytes >= (size_t{1} << 16);
  bool out_of_range = false;
#pragma omp parallel for schedule(static) if (parallel) reduction(|| : out_of_range)
  for (int64_t r = 0; r < rows; ++r) {
    const RowSource src = row_source(s, ids, prompt_index, prompt_lens, r / seq, r % seq);
    char* dst = out + r * row_bytes;
    if (src.kind == RowKind::Token) {
      std::memcpy(dst, weight + src.row * row_bytes, row_bytes);
    } else if (src.kind == RowKind::Prompt) {
      std::memcpy(dst, prompts + src.row * row_bytes, row_bytes);
    } else {
      std::memset(dst, 0, row_bytes);  // all-zero bytes are +0.0 in every supported dtype
      out_of_range = out_of_range || src.kind == RowKind::OutOfRange;
    }
  }
  return !out_of_range;
}

}  // namespace

at::Tensor soft_prompt_embed_fwd_cpu(const at::Tensor& input_ids, const at::Tensor& weight,
                                     const at::Tensor& prompts, const std::optional<at::Tensor>& prompt_index,
                                     const std::optional<at::Tensor>& prompt_lens, int64_t insert_at) {
  const SoftPromptShape s =
      check_soft_prompt_embed(input_ids, weight, prompts, prompt_index, prompt_lens, insert_at, c10::kCPU);
  const at::Tensor ids = input_ids.contiguous(), w = weight.contiguous(), pr = prompts.contiguous();
  const auto index = as_int64(prompt_index), lens = as_int64(prompt_lens);
  at::Tensor out = at::empty({s.B, s.L + s.P, s.H}, w.options());
  bool ok = true;
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "soft_prompt_embed_fwd_cpu", [&] {
    ok = copy_rows(static_cast<char*>(out.mutable_data_ptr()), static_cast<const char*>(w.const_data_ptr()),
                   static_cast<const char*>(pr.const_data_ptr()), ids.const_data_ptr<index_t>(),
                   index ? index->const_data_ptr<int64_t>() : nullptr,
                   lens ? lens->const_data_ptr<int64_t>() : nullptr, s, s.H * w.element_size());
  });
  TORCH_CHECK(ok, "soft_prompt_embed_fwd: input_ids (must be in [0, ", s.V, ")) or prompt_index (must be in [-1, ",
              s.T, ")) out of range");
  return out;
}

}  // namespace peft_kernels

// soft_prompt_embed_fwd: argument checks and the per-row source rule, shared by the CPU and CUDA
// kernels so that both implement exactly the same semantics; and the entry points of the CPU
// soft-prompt kernels (csrc/cpu/soft_prompt_*.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>

#ifdef __CUDACC__
#define PK_HOST_DEVICE __host__ __device__
#else
#define PK_HOST_DEVICE
#endif

namespace peft_kernels {

struct SoftPromptShape {
  int64_t B, L, H, V, T, P, insert_at;
  int64_t none_index_stride;  // prompt_index None: t = b * stride (0 when T == 1, 1 when T == B)
};

enum class RowKind { Token, Prompt, Zero, OutOfRange };

// Row of weight [V, H] (Token) or of prompts viewed as [T * P, H] (Prompt) to copy.
struct RowSource {
  RowKind kind;
  int64_t row;
};

// Output row `pos` of batch row `b`. prompt_index / prompt_lens are int64 or null.
template <typename id_t>
PK_HOST_DEVICE inline RowSource row_source(const SoftPromptShape& s, const id_t* ids,
                                           const int64_t* prompt_index, const int64_t* prompt_lens,
                                           int64_t b, int64_t pos) {
  const int64_t p = pos - s.insert_at;
  if (p < 0 || p >= s.P) {
    const int64_t id = static_cast<int64_t>(ids[b * s.L + (p < 0 ? pos : pos - s.P)]);
    return {id >= 0 && id < s.V ? RowKind::Token : RowKind::OutOfRange, id};
  }
  const int64_t t = prompt_index ? prompt_index[b] : b * s.none_index_stride;
  if (t >= s.T) return {RowKind::OutOfRange, t};
  const int64_t len = t < 0 ? 0 : prompt_lens ? prompt_lens[t] : s.P;
  return p < len ? RowSource{RowKind::Prompt, t * s.P + p} : RowSource{RowKind::Zero, 0};
}

inline bool is_index_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}

inline void check_index(const char* name, const at::Tensor& t, int64_t size, const at::Device& device,
                        const char* op = "soft_prompt_embed_fwd", const char* ref = "weight") {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, ": ", name, " must be [", size, "], got ", t.sizes());
  TORCH_CHECK(is_index_dtype(t), op, ": ", name, " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but ", ref, " is on ", device);
}

inline SoftPromptShape check_soft_prompt_embed(const at::Tensor& input_ids, const at::Tensor& weight,
                                               const at::Tensor& prompts,
                                               const std::optional<at::Tensor>& prompt_index,
                                               const std::optional<at::Tensor>& prompt_lens,
                                               int64_t insert_at, c10::DeviceType device_type) {
  TORCH_CHECK(weight.device().type() == device_type, "soft_prompt_embed_fwd: weight must be on ",
              device_type, ", got ", weight.device());
  TORCH_CHECK(input_ids.dim() == 2, "soft_prompt_embed_fwd: input_ids must be [B, L], got ",
              input_ids.sizes());
  TORCH_CHECK(is_index_dtype(input_ids), "soft_prompt_embed_fwd: input_ids must be int32 or int64, got ",
              input_ids.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "soft_prompt_embed_fwd: weight must be [V, H], got ", weight.sizes());
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "soft_prompt_embed_fwd: weight must be float32/float64/float16/bfloat16, got ", dtype);
  TORCH_CHECK(prompts.dim() == 3 && prompts.size(2) == weight.size(1),
              "soft_prompt_embed_fwd: prompts must be [T, P, H] with H = ", weight.size(1), ", got ",
              prompts.sizes());
  TORCH_CHECK(prompts.scalar_type() == dtype, "soft_prompt_embed_fwd: prompts dtype ",
              prompts.scalar_type(), " != weight dtype ", dtype);
  const auto device = weight.device();
  TORCH_CHECK(input_ids.device() == device && prompts.device() == device,
              "soft_prompt_embed_fwd: input_ids (", input_ids.device(), ") and prompts (", prompts.device(),
              ") must be on weight's device ", device);

  SoftPromptShape s{input_ids.size(0), input_ids.size(1), weight.size(1), weight.size(0),
                    prompts.size(0),   prompts.size(1),   insert_at,      0};
  TORCH_CHECK(insert_at >= 0 && insert_at <= s.L, "soft_prompt_embed_fwd: insert_at must be in [0, ", s.L,
              "], got ", insert_at);
  if (prompt_index.has_value()) {
    check_index("prompt_index", *prompt_index, s.B, device);
  } else {
    TORCH_CHECK(s.T == 1 || s.T == s.B, "soft_prompt_embed_fwd: prompt_index is None, so T (", s.T,
                ") must be 1 or B (", s.B, ")");
    s.none_index_stride = s.T == 1 ? 0 : 1;
  }
  if (prompt_lens.has_value()) check_index("prompt_lens", *prompt_lens, s.T, device);
  return s;
}

inline std::optional<at::Tensor> as_int64(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->to(at::kLong).contiguous();
}

// CPU kernels (csrc/cpu/soft_prompt_forward.cpp, soft_prompt_backward.cpp); registered in
// csrc/cpu/soft_prompt.cpp. Arguments as the ops of the same name in peft_kernels.reference.
at::Tensor soft_prompt_embed_fwd_cpu(const at::Tensor& input_ids, const at::Tensor& weight,
                                     const at::Tensor& prompts, const std::optional<at::Tensor>& prompt_index,
                                     const std::optional<at::Tensor>& prompt_lens, int64_t insert_at);
at::Tensor soft_prompt_concat_fwd_cpu(const at::Tensor& embeds, const at::Tensor& prompts,
                                      const std::optional<at::Tensor>& prompt_index,
                                      const std::optional<at::Tensor>& prompt_lens, int64_t insert_at, bool replace);
std::tuple<at::Tensor, at::Tensor> soft_prompt_embed_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input_ids,
                                                             int64_t vocab_size, int64_t num_prompts,
                                                             const std::optional<at::Tensor>& prompt_index,
                                                             const std::optional<at::Tensor>& prompt_lens,
                                                             int64_t insert_at, bool need_dweight);
std::tuple<at::Tensor, at::Tensor> soft_prompt_concat_bwd_cpu(const at::Tensor& grad_out, int64_t num_prompts,
                                                              int64_t prompt_len,
                                                              const std::optional<at::Tensor>& prompt_index,
                                                              const std::optional<at::Tensor>& prompt_lens,
                                                              int64_t insert_at, bool replace);

}  // namespace peft_kernels

// What the CPU soft-prompt kernels share: the per-row prompt choice read once on the host (and
// checked there, before any output byte is written), the rows of each prompt in row order (for
// deterministic sums), argument checks of the concat / backward ops, and work-splitting sizes.
#pragma once

#include "../soft_prompt_embed.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace peft_kernels {
namespace soft_prompt_cpu {

// Bytes one at::parallel_for chunk should move at least (smaller calls stay on the calling thread).
constexpr int64_t kGrainBytes = int64_t{1} << 16;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(row_bytes, 1)); }

// Row b's prompt entry (or -1) and each entry's real slot count, clamped to [0, P].
struct PromptRows {
  std::vector<int64_t> entry;   // [B]
  std::vector<int64_t> length;  // [T]
  // Rows of entry t, in row order: order[starts[t] .. starts[t + 1]); rows with -1 are in none.
  std::vector<int64_t> order, starts;

  int64_t real_slots(int64_t b) const { return entry[b] < 0 ? 0 : length[entry[b]]; }
};

// prompt_index / prompt_lens already checked for shape, dtype and device (check_index).
inline PromptRows prompt_rows(const char* op, const SoftPromptShape& s, const std::optional<at::Tensor>& prompt_index,
                              const std::optional<at::Tensor>& prompt_lens, bool grouped) {
  PromptRows r;
  r.entry.resize(s.B);
  if (prompt_index.has_value()) {
    const at::Tensor index = prompt_index->to(at::kLong).contiguous();
    const int64_t* ip = index.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < s.B; ++b) {
      TORCH_CHECK(ip[b] >= -1 && ip[b] < s.T, op, ": prompt_index[", b, "] = ", ip[b], " is out of range [-1, ", s.T,
                  ") (prompts hold T = ", s.T, " entries)");
      r.entry[b] = ip[b];
    }
  } else {
    for (int64_t b = 0; b < s.B; ++b) r.entry[b] = b * s.none_index_stride;
  }
  r.length.assign(s.T, s.P);
  if (prompt_lens.has_value()) {
    const at::Tensor lens = prompt_lens->to(at::kLong).contiguous();
    const int64_t* lp = lens.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < s.T; ++t) r.length[t] = std::clamp<int64_t>(lp[t], 0, s.P);
  }
  if (grouped) {  // counting sort by entry: stable, so each prompt's rows stay in row order
    r.starts.assign(s.T + 1, 0);
    for (int64_t t : r.entry)
      if (t >= 0) ++r.starts[t + 1];
    for (int64_t t = 0; t < s.T; ++t) r.starts[t + 1] += r.starts[t];
    r.order.resize(r.starts[s.T]);
    std::vector<int64_t> next(r.starts.begin(), r.starts.end() - 1);
    for (int64_t b = 0; b < s.B; ++b)
      if (r.entry[b] >= 0) r.order[next[r.entry[b]]++] = b;
  }
  return r;
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// prompt_index / prompt_lens of a call on `ref` (a CPU tensor); fills s.none_index_stride.
inline void check_bank_args(const char* op, const char* ref_name, const at::Tensor& ref, SoftPromptShape& s,
                            const std::optional<at::Tensor>& prompt_index, const std::optional<at::Tensor>& prompt_lens) {
  TORCH_CHECK(s.T >= 0 && s.P >= 0, op, ": num_prompts (", s.T, ") and prompt_len (", s.P, ") must be >= 0");
  if (prompt_index.has_value()) {
    check_index("prompt_index", *prompt_index, s.B, ref.device(), op, ref_name);
  } else {
    TORCH_CHECK(s.T == 1 || s.T == s.B, op, ": prompt_index is None, so T (", s.T, ") must be 1 or B (", s.B, ")");
    s.none_index_stride = s.T == 1 ? 0 : 1;
  }
  if (prompt_lens.has_value()) check_index("prompt_lens", *prompt_lens, s.T, ref.device(), op, ref_name);
}

// Splits H into chunks (at most kMaxChunk elements, for a register/L1 accumulator) so that `items`
// reductions times the chunks give every thread a few pieces of work.
constexpr int64_t kMaxChunk = 1024;

inline int64_t h_chunk(int64_t H, int64_t items) {
  int64_t chunk = std::min<int64_t>(std::max<int64_t>(H, 1), kMaxChunk);
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  while (chunk > 256 && items * ceil_div(H, chunk) < want) chunk = ceil_div(chunk / 2, 64) * 64;
  return chunk;
}

}  // namespace soft_prompt_cpu
}  // namespace peft_kernels

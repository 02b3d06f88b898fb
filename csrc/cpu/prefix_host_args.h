// Host-side reads of prefix_attention's index arguments, shared by the CPU kernels (the cascade in
// prefix_attention.cpp and the fused one in prefix_flash.cpp). `op` prefixes every error message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace peft_kernels {

// [B]: each row's bank entry (-1 = none); None means T == 1 (entry 0 for every row) or T == B (row b -> b).
inline std::vector<int64_t> prefix_entry_per_row(const std::optional<at::Tensor>& prefix_index, int64_t B,
                                                 int64_t T, const char* op) {
  std::vector<int64_t> entry(B);
  if (prefix_index.has_value()) {
    const at::Tensor idx = prefix_index->to(at::kLong).contiguous();
    TORCH_CHECK(idx.numel() == B, op, ": prefix_index must be [B=", B, "], got ", idx.sizes());
    const int64_t* d = idx.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(d[b] >= -1 && d[b] < T, op, ": prefix_index[", b, "] = ", d[b], " is outside [-1, T=", T, ")");
      entry[b] = d[b];
    }
  } else {
    TORCH_CHECK(T == 1 || T == B, op, ": prefix_index is None, so T (", T, ") must be 1 or B (", B, ")");
    for (int64_t b = 0; b < B; ++b) entry[b] = T == 1 ? 0 : b;
  }
  return entry;
}

// [T]: each entry's real prefix length (P when prefix_lens is None).
inline std::vector<int64_t> prefix_lengths(const std::optional<at::Tensor>& prefix_lens, int64_t T, int64_t P,
                                           const char* op) {
  std::vector<int64_t> lens(T, P);
  if (prefix_lens.has_value()) {
    const at::Tensor l = prefix_lens->to(at::kLong).contiguous();
    TORCH_CHECK(l.numel() == T, op, ": prefix_lens must be [T=", T, "], got ", l.sizes());
    const int64_t* d = l.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(d[t] >= 0 && d[t] <= P, op, ": prefix_lens[", t, "] = ", d[t], " is outside [0, P=", P, "]");
      lens[t] = d[t];
    }
  }
  return lens;
}

// [B * (Lk + 1)]: count[b * (Lk + 1) + j] = real keys of row b in [0, j); empty when no key is padded.
inline std::vector<int64_t> real_key_counts(const std::optional<at::Tensor>& key_padding_mask, int64_t B,
                                            int64_t Lk, const char* op) {
  if (!key_padding_mask.has_value()) return {};
  const at::Tensor m = key_padding_mask->to(at::kBool).contiguous();
  TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == Lk, op, ": key_padding_mask must be [B=", B,
              ", Lk=", Lk, "], got ", m.sizes());
  const bool* d = m.const_data_ptr<bool>();
  std::vector<int64_t> count(B * (Lk + 1));
  bool padded = false;
  for (int64_t b = 0; b < B; ++b) {
    int64_t* c = count.data() + b * (Lk + 1);
    c[0] = 0;
    for (int64_t j = 0; j < Lk; ++j) {
      c[j + 1] = c[j] + (d[b * Lk + j] ? 1 : 0);
      padded = padded || !d[b * Lk + j];
    }
  }
  if (!padded) count.clear();
  return count;
}

}  // namespace peft_kernels

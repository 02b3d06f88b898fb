// CUDA kernel of soft_prompt_embed_fwd: each output row is written once, by a group of threads
// copying it in the widest unit (up to 16 bytes) that the row size and pointers allow.
#include "../soft_prompt_embed.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>

namespace peft_kernels {
namespace {

constexpr int kThreads = 256;

// U is the copy unit (uint4, uint2, uint32_t or uint16_t); row_units = H * sizeof(scalar_t) / sizeof(U).
template <typename U, typename id_t>
__global__ void __launch_bounds__(kThreads)
    soft_prompt_embed_kernel(U* __restrict__ out, const U* __restrict__ weight, const U* __restrict__ prompts,
                             const id_t* __restrict__ ids, const int64_t* __restrict__ prompt_index,
                             const int64_t* __restrict__ prompt_lens, SoftPromptShape s, int64_t row_units,
                             int64_t rows) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (r >= rows) return;
  const int64_t seq = s.L + s.P;
  const RowSource src = row_source(s, ids, prompt_index, prompt_lens, r / seq, r % seq);
  CUDA_KERNEL_ASSERT(src.kind != RowKind::OutOfRange);
  U* dst = out + r * row_units;
  if (src.kind == RowKind::Token || src.kind == RowKind::Prompt) {
    const U* from = (src.kind == RowKind::Token ? weight : prompts) + src.row * row_units;
    for (int64_t i = threadIdx.x; i < row_units; i += blockDim.x) dst[i] = from[i];
  } else {
    for (int64_t i = threadIdx.x; i < row_units; i += blockDim.x) dst[i] = U{};
  }
}

template <typename U, typename id_t>
void launch(at::Tensor& out, const at::Tensor& w, const at::Tensor& pr, const at::Tensor& ids,
            const int64_t* index, const int64_t* lens, const SoftPromptShape& s, int64_t row_bytes) {
  const int64_t rows = s.B * (s.L + s.P), row_units = row_bytes / static_cast<int64_t>(sizeof(U));
  int threads_per_row = 32;  // a warp, or a power-of-two group of warps, per row
  while (threads_per_row < kThreads && threads_per_row < row_units) threads_per_row *= 2;
  const dim3 block(threads_per_row, kThreads / threads_per_row);
  const int64_t blocks = (rows + block.y - 1) / block.y;
  TORCH_CHECK(blocks <= INT_MAX, "soft_prompt_embed_fwd: too many rows (", rows, ")");
  soft_prompt_embed_kernel<U, id_t><<<static_cast<unsigned>(blocks), block, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<U*>(out.mutable_data_ptr()), static_cast<const U*>(w.const_data_ptr()),
      static_cast<const U*>(pr.const_data_ptr()), ids.const_data_ptr<id_t>(), index, lens, s, row_units, rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t copy_unit_bytes(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  for (int64_t unit : {16, 8, 4}) {
    if (row_bytes % unit == 0 &&
        std::all_of(ptrs.begin(), ptrs.end(), [&](const void* p) { return reinterpret_cast<uintptr_t>(p) % unit == 0; }))
      return unit;
  }
  return 2;  // every supported dtype is at least 2 bytes
}

at::Tensor soft_prompt_embed_fwd_cuda(const at::Tensor& input_ids, const at::Tensor& weight,
                                      const at::Tensor& prompts, const std::optional<at::Tensor>& prompt_index,
                                      const std::optional<at::Tensor>& prompt_lens, int64_t insert_at) {
  const SoftPromptShape s =
      check_soft_prompt_embed(input_ids, weight, prompts, prompt_index, prompt_lens, insert_at, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor ids = input_ids.contiguous(), w = weight.contiguous(), pr = prompts.contiguous();
  const auto index = as_int64(prompt_index), lens = as_int64(prompt_lens);
  at::Tensor out = at::empty({s.B, s.L + s.P, s.H}, w.options());
  if (out.numel() == 0) return out;
  const int64_t* ip = index ? index->const_data_ptr<int64_t>() : nullptr;
  const int64_t* lp = lens ? lens->const_data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_prompt_embed_fwd_cuda", [&] {
    const int64_t row_bytes = s.H * static_cast<int64_t>(sizeof(scalar_t));
    const int64_t unit = copy_unit_bytes(row_bytes, {out.const_data_ptr(), w.const_data_ptr(), pr.const_data_ptr()});
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "soft_prompt_embed_fwd_cuda", [&] {
      switch (unit) {
        case 16: return launch<uint4, index_t>(out, w, pr, ids, ip, lp, s, row_bytes);
        case 8: return launch<uint2, index_t>(out, w, pr, ids, ip, lp, s, row_bytes);
        case 4: return launch<uint32_t, index_t>(out, w, pr, ids, ip, lp, s, row_bytes);
        default: return launch<uint16_t, index_t>(out, w, pr, ids, ip, lp, s, row_bytes);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace peft_kernels

TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) {
  m.impl("soft_prompt_embed_fwd", &peft_kernels::soft_prompt_embed_fwd_cuda);
}

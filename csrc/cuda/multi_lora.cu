// CUDA kernel of multi_lora_fwd, BGMV style (one row = one gathered matrix-vector product per
// stage), built for decode-sized batches (N <= 64) but correct for any N. Two launches on the
// current stream, no host synchronisation (CUDA-graph capturable):
//
//   shrink  grid (N, ceil(R / kShrinkWarps)): warp w of block (n, c) computes rank j = c * kShrinkWarps + w
//           of row n: h[n, j] = scaling[t] * dot(x[n], lora_a[t, j]) in fp32, lanes striding H_in with
//           16-byte loads, a warp-shuffle reduction. Warps with j >= ranks[t] (and rows with t == -1)
//           return at once: padding is never read.
//   expand  grid (N, ceil(H_out / kExpandThreads)): the row's r values of h go to shared memory; each
//           thread makes one output o: y = base[n, o] + sum_{j < r} h[j] * lora_b[t, o, j] (16-byte
//           loads of the first r entries of the row of lora_b), converted to x's dtype and stored once.
//
// The fp32 (fp64 for fp64 inputs) intermediate h [N, R] lives in a scratch tensor from the caching
// allocator. Splitting the shrink over ranks and the expand over outputs keeps every SM busy even for
// one row, without the redundant shrink a single fused block-per-row kernel would need for that.
#include "../multi_lora.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>

namespace peft_kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kShrinkWarps = 4;  // ranks per shrink block (one warp each)
constexpr int kExpandThreads = 256;

// The row's adapter (-1: none) and its rank (0 for none).
struct RowAdapter {
  int64_t t, r;
};

__device__ __forceinline__ RowAdapter row_adapter(int64_t n, const void* index, bool index64, int64_t none_stride,
                                                  const void* ranks, bool ranks64, int64_t T, int64_t R) {
  int64_t t = index ? (index64 ? static_cast<const int64_t*>(index)[n] : static_cast<const int32_t*>(index)[n])
                    : n * none_stride;
  CUDA_KERNEL_ASSERT(t >= -1 && t < T);
  if (t < 0) return {-1, 0};
  int64_t r = ranks ? (ranks64 ? static_cast<const int64_t*>(ranks)[t] : static_cast<const int32_t*>(ranks)[t]) : R;
  r = r < 0 ? 0 : (r > R ? R : r);  // the op validates ranks; clamp so a bad one cannot read out of bounds
  return {t, r};
}

template <typename scalar_t>
struct Pack16 {  // 16 bytes of scalar_t, loaded as one uint4
  static constexpr int kElems = 16 / sizeof(scalar_t);
  uint4 raw;
  __device__ __forceinline__ scalar_t operator[](int e) const { return reinterpret_cast<const scalar_t*>(&raw)[e]; }
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename acc_t, bool kVec>
__global__ void __launch_bounds__(kShrinkWarps * kWarp)
    lora_shrink_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ a, const void* index, bool index64,
                       int64_t none_stride, const void* ranks, bool ranks64, const acc_t* __restrict__ scaling,
                       acc_t* __restrict__ h, int64_t H_in, int64_t T, int64_t R) {
  const int64_t n = blockIdx.x;
  const int lane = threadIdx.x % kWarp;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kShrinkWarps + threadIdx.x / kWarp;
  const RowAdapter ra = row_adapter(n, index, index64, none_stride, ranks, ranks64, T, R);
  if (j >= ra.r) return;  // whole warps leave together: the shuffles below see full warps
  const scalar_t* xr = x + n * H_in;
  const scalar_t* ar = a + (ra.t * R + j) * H_in;
  acc_t acc0 = 0, acc1 = 0;
  if constexpr (kVec) {
    constexpr int E = Pack16<scalar_t>::kElems;
    const uint4* xv = reinterpret_cast<const uint4*>(xr);
    const uint4* av = reinterpret_cast<const uint4*>(ar);
    const int64_t units = H_in / E;
    int64_t u = lane;
    for (; u + kWarp < units; u += 2 * kWarp) {  // two independent 16-byte loads per operand in flight
      Pack16<scalar_t> x0, a0, x1, a1;
      x0.raw = __ldg(xv + u);
      a0.raw = __ldg(av + u);
      x1.raw = __ldg(xv + u + kWarp);
      a1.raw = __ldg(av + u + kWarp);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        acc0 += static_cast<acc_t>(x0[e]) * static_cast<acc_t>(a0[e]);
        acc1 += static_cast<acc_t>(x1[e]) * static_cast<acc_t>(a1[e]);
      }
    }
    if (u < units) {
      Pack16<scalar_t> x0, a0;
      x0.raw = __ldg(xv + u);
      a0.raw = __ldg(av + u);
#pragma unroll
      for (int e = 0; e < E; ++e) acc0 += static_cast<acc_t>(x0[e]) * static_cast<acc_t>(a0[e]);
    }
  } else {
    for (int64_t k = lane; k < H_in; k += kWarp)
      acc0 += static_cast<acc_t>(xr[k]) * static_cast<acc_t>(ar[k]);
  }
  const acc_t sum = warp_sum(acc0 + acc1);
  if (lane == 0) h[n * R + j] = sum * scaling[ra.t];
}

template <typename scalar_t, typename acc_t, bool kVec>
__global__ void __launch_bounds__(kExpandThreads)
    lora_expand_kernel(const acc_t* __restrict__ h, const scalar_t* __restrict__ b, const scalar_t* __restrict__ base,
                       scalar_t* __restrict__ out, const void* index, bool index64, int64_t none_stride,
                       const void* ranks, bool ranks64, int64_t H_out, int64_t T, int64_t R) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* hs = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t n = blockIdx.x;
  const RowAdapter ra = row_adapter(n, index, index64, none_stride, ranks, ranks64, T, R);
  for (int64_t j = threadIdx.x; j < ra.r; j += blockDim.x) hs[j] = h[n * R + j];
  __syncthreads();
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (o >= H_out) return;
  acc_t acc = 0;
  if (ra.r > 0) {
    const scalar_t* br = b + (ra.t * H_out + o) * R;
    int64_t j = 0;
    if constexpr (kVec) {
      constexpr int E = Pack16<scalar_t>::kElems;
      const uint4* bv = reinterpret_cast<const uint4*>(br);
      for (; j + E <= ra.r; j += E) {
        Pack16<scalar_t> p;
        p.raw = __ldg(bv + j / E);
#pragma unroll
        for (int e = 0; e < E; ++e) acc += hs[j + e] * static_cast<acc_t>(p[e]);
      }
    }
    for (; j < ra.r; ++j) acc += hs[j] * static_cast<acc_t>(br[j]);
  }
  if (base) acc += static_cast<acc_t>(base[n * H_out + o]);
  out[n * H_out + o] = static_cast<scalar_t>(acc);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

at::Tensor multi_lora_fwd_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                               const std::optional<at::Tensor>& adapter_index, const at::Tensor& scaling,
                               const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& base) {
  const MultiLoraShape s = check_multi_lora(x, lora_a, lora_b, adapter_index, scaling, ranks, base, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({s.N, s.H_out}, x.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(s.N <= INT_MAX, "multi_lora_fwd: too many rows (", s.N, ")");
  TORCH_CHECK((s.R + kShrinkWarps - 1) / kShrinkWarps <= 65535 &&
                  (s.H_out + kExpandThreads - 1) / kExpandThreads <= 65535,
              "multi_lora_fwd: R (", s.R, ") or H_out (", s.H_out, ") too large for the CUDA kernel's grid");
  const at::Tensor xc = x.contiguous(), ac = lora_a.contiguous(), bc = lora_b.contiguous();
  const at::Tensor basec = base.has_value() ? base->contiguous() : at::Tensor();
  const at::Tensor idx = adapter_index.has_value() ? adapter_index->contiguous() : at::Tensor();
  const at::Tensor rk = ranks.has_value() ? ranks->contiguous() : at::Tensor();
  const void* index_ptr = idx.defined() ? idx.const_data_ptr() : nullptr;
  const bool index64 = idx.defined() && idx.scalar_type() == at::kLong;
  const void* ranks_ptr = rk.defined() ? rk.const_data_ptr() : nullptr;
  const bool ranks64 = rk.defined() && rk.scalar_type() == at::kLong;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float, or double for double
    const at::Tensor scale = scaling.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    at::Tensor h = at::empty({s.N, s.R}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* base_ptr = basec.defined() ? basec.const_data_ptr<scalar_t>() : nullptr;

    if (s.R > 0 && s.H_in > 0) {
      const dim3 grid(static_cast<unsigned>(s.N), static_cast<unsigned>((s.R + kShrinkWarps - 1) / kShrinkWarps));
      const bool vec = s.H_in * static_cast<int64_t>(sizeof(scalar_t)) % 16 == 0 && aligned16(xc.const_data_ptr()) &&
                       aligned16(ac.const_data_ptr());
      auto launch = [&](auto kernel) {
        kernel<<<grid, kShrinkWarps * kWarp, 0, stream>>>(
            xc.const_data_ptr<scalar_t>(), ac.const_data_ptr<scalar_t>(), index_ptr, index64, s.none_index_stride,
            ranks_ptr, ranks64, scale.const_data_ptr<acc_t>(), h.mutable_data_ptr<acc_t>(), s.H_in, s.T, s.R);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec) launch(lora_shrink_kernel<scalar_t, acc_t, true>);
      else launch(lora_shrink_kernel<scalar_t, acc_t, false>);
    } else if (s.R > 0) {
      h.zero_();  // H_in == 0: x @ A^T is zero
    }

    const dim3 grid(static_cast<unsigned>(s.N), static_cast<unsigned>((s.H_out + kExpandThreads - 1) / kExpandThreads));
    const size_t smem = static_cast<size_t>(s.R) * sizeof(acc_t);
    TORCH_CHECK(smem <= 48 * 1024, "multi_lora_fwd: R = ", s.R, " too large for the CUDA kernel's shared memory");
    const bool vec = s.R * static_cast<int64_t>(sizeof(scalar_t)) % 16 == 0 && aligned16(bc.const_data_ptr());
    auto launch = [&](auto kernel) {
      kernel<<<grid, kExpandThreads, smem, stream>>>(h.const_data_ptr<acc_t>(), bc.const_data_ptr<scalar_t>(), base_ptr,
                                                     out.mutable_data_ptr<scalar_t>(), index_ptr, index64,
                                                     s.none_index_stride, ranks_ptr, ranks64, s.H_out, s.T, s.R);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) launch(lora_expand_kernel<scalar_t, acc_t, true>);
    else launch(lora_expand_kernel<scalar_t, acc_t, false>);
  });
  return out;
}

}  // namespace
}  // namespace peft_kernels

TORCH_LIBRARY_IMPL(peft_kernels, CUDA, m) {
  m.impl("multi_lora_fwd", &peft_kernels::multi_lora_fwd_cuda);
}

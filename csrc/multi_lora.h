// multi_lora_fwd: argument checks shared by the CPU and CUDA kernels, so that both accept exactly
// the same calls (the Python op validates value ranges before either runs).
//
//   y[n] = base[n] + scaling[t] * (x[n] @ lora_a[t, :r].T) @ lora_b[t, :, :r].T,  t = adapter_index[n],
//   r = ranks[t]; rows with t == -1 (or r == 0) get base[n] (0 without base). The rank-space
//   intermediate and the sum are fp32 (fp64 for fp64 inputs); y has x's dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <type_traits>

namespace peft_kernels {

struct MultiLoraShape {
  int64_t N, H_in, H_out, T, R;
  int64_t none_index_stride;  // adapter_index None: t = n * stride (0 when T == 1, 1 when T == N)
};

inline bool lora_index_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
}

inline MultiLoraShape check_multi_lora(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                       const std::optional<at::Tensor>& adapter_index, const at::Tensor& scaling,
                                       const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& base,
                                       c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, "multi_lora_fwd: x must be on ", device_type, ", got ", x.device());
  TORCH_CHECK(x.dim() == 2, "multi_lora_fwd: x must be [N, H_in], got ", x.sizes());
  TORCH_CHECK(lora_a.dim() == 3, "multi_lora_fwd: lora_a must be [T, R, H_in], got ", lora_a.sizes());
  TORCH_CHECK(lora_b.dim() == 3, "multi_lora_fwd: lora_b must be [T, H_out, R], got ", lora_b.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "multi_lora_fwd: x must be float32/float64/float16/bfloat16, got ", dtype);
  TORCH_CHECK(lora_a.scalar_type() == dtype && lora_b.scalar_type() == dtype,
              "multi_lora_fwd: lora_a (", lora_a.scalar_type(), ") and lora_b (", lora_b.scalar_type(),
              ") must have x's dtype ", dtype);
  MultiLoraShape s{x.size(0), x.size(1), lora_b.size(1), lora_a.size(0), lora_a.size(1), 0};
  TORCH_CHECK(lora_a.size(2) == s.H_in, "multi_lora_fwd: lora_a ", lora_a.sizes(), " must be [T, R, H_in = ", s.H_in,
              "] (x ", x.sizes(), ")");
  TORCH_CHECK(lora_b.size(0) == s.T && lora_b.size(2) == s.R, "multi_lora_fwd: lora_b ", lora_b.sizes(),
              " must be [T = ", s.T, ", H_out, R = ", s.R, "] (lora_a ", lora_a.sizes(), ")");
  TORCH_CHECK(scaling.dim() == 1 && scaling.size(0) == s.T, "multi_lora_fwd: scaling must be [T = ", s.T, "], got ",
              scaling.sizes());
  TORCH_CHECK(at::isFloatingType(scaling.scalar_type()), "multi_lora_fwd: scaling must be floating point, got ",
              scaling.scalar_type());
  const auto device = x.device();
  TORCH_CHECK(lora_a.device() == device && lora_b.device() == device && scaling.device() == device,
              "multi_lora_fwd: lora_a (", lora_a.device(), "), lora_b (", lora_b.device(), ") and scaling (",
              scaling.device(), ") must be on x's device ", device);
  if (adapter_index.has_value()) {
    const at::Tensor& idx = *adapter_index;
    TORCH_CHECK(idx.dim() == 1 && idx.size(0) == s.N, "multi_lora_fwd: adapter_index must be [N = ", s.N, "], got ",
                idx.sizes());
    TORCH_CHECK(lora_index_dtype(idx), "multi_lora_fwd: adapter_index must be int32 or int64, got ",
                idx.scalar_type());
    TORCH_CHECK(idx.device() == device, "multi_lora_fwd: adapter_index is on ", idx.device(), ", x on ", device);
  } else {
    TORCH_CHECK(s.T == 1 || s.T == s.N, "multi_lora_fwd: adapter_index is None, so T (", s.T,
                ") must be 1 or N (", s.N, ")");
    s.none_index_stride = s.T == 1 ? 0 : 1;
  }
  if (ranks.has_value()) {
    TORCH_CHECK(ranks->dim() == 1 && ranks->size(0) == s.T, "multi_lora_fwd: ranks must be [T = ", s.T, "], got ",
                ranks->sizes());
    TORCH_CHECK(lora_index_dtype(*ranks), "multi_lora_fwd: ranks must be int32 or int64, got ",
                ranks->scalar_type());
    TORCH_CHECK(ranks->device() == device, "multi_lora_fwd: ranks is on ", ranks->device(), ", x on ", device);
  }
  if (base.has_value()) {
    TORCH_CHECK(base->dim() == 2 && base->size(0) == s.N && base->size(1) == s.H_out,
                "multi_lora_fwd: base must be [N = ", s.N, ", H_out = ", s.H_out, "], got ", base->sizes());
    TORCH_CHECK(base->scalar_type() == dtype, "multi_lora_fwd: base dtype ", base->scalar_type(),
                " != x dtype ", dtype);
    TORCH_CHECK(base->device() == device, "multi_lora_fwd: base is on ", base->device(), ", x on ", device);
  }
  return s;
}

// ---------------------------------------------------------------- segmented CPU kernels
// The backward of multi_lora and the split ops lora_shrink / lora_expand (forward and backward) run
// over rows grouped by adapter (csrc/cpu/multi_lora_segments.cpp); the per-segment micro-kernels are
// built on at::vec::Vectorized once per instruction set (csrc/cpu/multi_lora_vec_*.cpp).
enum class SegMode : int {
  MultiBwd,   // dx, dlora_a, dlora_b of multi_lora
  ShrinkFwd,  // h = (scaling) * x @ lora_a^T                      [N, R] in the accumulation type
  ShrinkBwd,  // dx, dlora_a of lora_shrink from grad_h (hin)
  ExpandFwd,  // y = base + scaling * h @ lora_b^T                 h = hin
  ExpandBwd,  // dh (hout), dlora_b of lora_expand from grad_y (g) and h (hin)
};

// Rows order[begin:end] of adapter t (t = -1: rows without an adapter, or of a rank-0 one).
// part >= 0: the item writes fp32 (fp64) partial weight gradients into slot `part` (summed in slot
// order afterwards); -1: it holds all of its adapter's rows and writes the weight gradients itself.
struct SegItem {
  int64_t t, begin, end, part;
};

template <typename S>
struct SegJob {
  using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;
  SegMode mode;
  const S* x;       // [N, H_in]
  const S* g;       // [N, H_out] grad_y
  const S* a;       // [T, R, H_in]
  const S* b;       // [T, H_out, R]
  const S* base;    // [N, H_out] or null
  const acc_t* hin; // [N, R] rank-space input (h, or grad_h); only slots < ranks[t] are read
  const acc_t* scaling;  // [T], or null (1)
  const int64_t* rank;   // [T]
  const int64_t* order;  // row ids grouped by adapter
  const SegItem* items;
  S* out;           // [N, H_in] dx, or [N, H_out] y
  acc_t* hout;      // [N, R] h (ShrinkFwd) or dh (ExpandBwd)
  S* da;            // [T, R, H_in]
  S* db;            // [T, H_out, R]
  acc_t* part_a;    // [P, R, H_in] partial dlora_a
  acc_t* part_b;    // [P, R, H_out] partial dlora_b, transposed
  int64_t H_in, H_out, R;
};

template <typename S>
using SegProcessFn = void (*)(const SegJob<S>&, int64_t, int64_t);
// Sum the partial slots [p0, p0 + np) of adapter t into da[t] / db[t] (np == 0: zeros).
template <typename S>
using SegFinalizeFn = void (*)(const SegJob<S>&, int64_t, int64_t, int64_t);

#define PK_DECLARE_SEG_KERNELS(NS)                                                  \
  namespace NS {                                                                    \
  template <typename S>                                                             \
  void seg_process(const SegJob<S>& job, int64_t lo, int64_t hi);                   \
  template <typename S>                                                             \
  void seg_finalize(const SegJob<S>& job, int64_t t, int64_t p0, int64_t np);       \
  }
PK_DECLARE_SEG_KERNELS(vec_default)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
PK_DECLARE_SEG_KERNELS(vec_avx2)
PK_DECLARE_SEG_KERNELS(vec_avx512)
#endif
#undef PK_DECLARE_SEG_KERNELS

// The instruction set the CPU micro-kernels run with: 2 = AVX-512, 1 = AVX2, 0 = baseline. ATen's own
// choice (at::get_cpu_capability(): cpuinfo, capped by ATEN_CPU_CAPABILITY), capped further by
// PEFT_KERNELS_CPU_ISA=avx512|avx2|baseline (to test every copy on one machine).
int cpu_isa_level();

// The instruction set the CPU kernel's micro-kernels run with: "avx512", "avx2" or "baseline".
const char* multi_lora_cpu_isa();

// y = x @ weight^T + bias + the LoRA term, fp32, in one pass over the weight and the banks (lora_linear.cpp):
// decode-sized eager inference on an AVX-512 CPU. A plain function only (peft_kernels._C.multi_lora_linear).
bool multi_lora_linear_available();
at::Tensor multi_lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& adapter_index,
                                 const at::Tensor& scaling, const at::Tensor& ranks);

at::Tensor multi_lora_fwd_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                              const std::optional<at::Tensor>& adapter_index, const at::Tensor& scaling,
                              const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& base);

// base += the LoRA term, in place (base [N, H_out] contiguous, x's dtype); returns base. A plain function
// only (peft_kernels._C.multi_lora_add_, no dispatcher op): eager inference adds into the base layer's
// fresh output.
at::Tensor multi_lora_add_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                              const std::optional<at::Tensor>& adapter_index, const at::Tensor& scaling,
                              const std::optional<at::Tensor>& ranks, at::Tensor base);

}  // namespace peft_kernels

// CPU kernel of multi_lora_fwd (C++, at::parallel_for).
//
// On the host (no sync cost on a CPU): read the per-row adapter, counting-sort the rows by adapter,
// and cut each adapter's rows into blocks (work items); rows without an adapter (-1, or rank 0)
// become copy items. Items are split into contiguous, cost-balanced ranges, one per thread of
// at::parallel_for (one thread when the call is small). A thread packs each adapter it meets once (see
// multi_lora_kernels.inc), then per block of rows: shrink into fp32 rank space, scale, expand
// fused with the base add, and store each output row once in x's dtype.
//
// The micro-kernels are compiled three times: AVX-512, AVX2+FMA+F16C and the baseline ISA; ATen's
// capability picks one at run time (cpu_isa_level(): PEFT_KERNELS_CPU_ISA=avx512|avx2|baseline caps
// it, e.g. to test them all on one machine). They are hand-written (GCC vector extensions and
// AVX-512 intrinsics: in-register transposes, masked loads of the first r rank slots, prefetch of
// the next adapter) rather than at::vec::Vectorized, which has none of those.
#include "../multi_lora.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PK_X86_DISPATCH 1
#include <immintrin.h>
#else
#define PK_X86_DISPATCH 0
#endif

namespace peft_kernels {
namespace {

struct LoraItem {
  int64_t t;             // adapter, or -1: rows that get base (or zeros)
  int64_t begin, end;    // rows order[begin:end]
  int64_t adapter_rows;  // rows of adapter t in the whole batch
};

template <typename S>
struct LoraJob {
  using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;
  const S* x;       // [N, H_in]
  const S* a;       // [T, R, H_in]
  const S* b;       // [T, H_out, R]
  const S* base;    // [N, H_out] or null
  S* out;           // [N, H_out]
  const acc_t* scaling;  // [T]
  const int64_t* rank;   // [T], each in [1, R] for adapters that have items
  const int64_t* order;  // row ids grouped by adapter
  const LoraItem* items;
  int64_t H_in, H_out, R;
};

// ---------------------------------------------------------------- the micro-kernels, once per ISA
#if PK_X86_DISPATCH
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#define PK_NS isa_avx512
#define PK_ISA 2
#define PK_VB 64
#include "multi_lora_kernels.inc"
#undef PK_NS
#undef PK_ISA
#undef PK_VB
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define PK_NS isa_avx2
#define PK_ISA 1
#define PK_VB 32
#include "multi_lora_kernels.inc"
#undef PK_NS
#undef PK_ISA
#undef PK_VB
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // PK_X86_DISPATCH

#define PK_NS isa_baseline
#define PK_ISA 0
#define PK_VB 16
#include "multi_lora_kernels.inc"
#undef PK_NS
#undef PK_ISA
#undef PK_VB

// ---------------------------------------------------------------- ISA choice
enum class Isa { Baseline = 0, Avx2 = 1, Avx512 = 2 };

Isa cpu_isa() { return static_cast<Isa>(cpu_isa_level()); }

template <typename S>
using ProcessFn = void (*)(const LoraJob<S>&, int64_t, int64_t);

template <typename S>
ProcessFn<S> process_fn() {
#if PK_X86_DISPATCH
  switch (cpu_isa()) {
    case Isa::Avx512: return &isa_avx512::process<S>;
    case Isa::Avx2: return &isa_avx2::process<S>;
    default: break;
  }
#endif
  return &isa_baseline::process<S>;
}

// ---------------------------------------------------------------- host side
constexpr int64_t kBlockRows = 16;            // rows per work item of an adapter
// An adapter with at most kBlockRows rows is one work item, which the direct (unpacked) path takes whole.
static_assert(kBlockRows == isa_baseline::kTileRows, "work items and direct tiles must agree");
constexpr int64_t kCopyBlockRows = 64;        // rows per copy item
// Multiply-adds per extra thread (~5 us of one core): a decode-sized call runs on the calling thread, as
// waking OpenMP workers costs more than it saves there (and much more on a busy machine).
constexpr int64_t kMinCostPerThread = 256 * 1024;

template <typename index_t>
void read_rows(const index_t* index, int64_t N, int64_t T, int64_t* row_t) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = static_cast<int64_t>(index[n]);
    TORCH_CHECK(t >= -1 && t < T, "multi_lora_fwd: adapter_index[", n, "] = ", t, " is out of range [-1, ", T, ")");
    row_t[n] = t;
  }
}

void read_int64(const at::Tensor& t, std::vector<int64_t>& out) {
  const at::Tensor c = t.contiguous();
  out.resize(c.numel());
  if (c.scalar_type() == at::kInt) {
    const int32_t* p = c.const_data_ptr<int32_t>();
    std::copy(p, p + c.numel(), out.begin());
  } else {
    const int64_t* p = c.const_data_ptr<int64_t>();
    std::copy(p, p + c.numel(), out.begin());
  }
}

// The host side's arrays, one set per calling thread and reused: a decode-sized call allocates
// nothing but its output.
struct HostScratch {
  std::vector<int64_t> rank, row_t, start, order, fill, cost;
  std::vector<LoraItem> items;
};

HostScratch& host_scratch() {
  thread_local HostScratch s;
  return s;
}

template <typename S>
void run(const MultiLoraShape& s, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
         const std::optional<at::Tensor>& adapter_index, const at::Tensor& scaling,
         const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& base, at::Tensor& out) {
  using acc_t = typename LoraJob<S>::acc_t;
  const int64_t N = s.N, T = s.T, R = s.R;
  HostScratch& h = host_scratch();

  std::vector<int64_t>& rank = h.rank;
  if (ranks.has_value()) read_int64(*ranks, rank);
  else rank.assign(T, R);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(rank[t] >= 0 && rank[t] <= R, "multi_lora_fwd: ranks[", t, "] = ", rank[t], " is out of range [0, ",
                R, "]");
  const auto acc_type = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  const at::Tensor scale =
      scaling.scalar_type() == acc_type && scaling.is_contiguous() ? scaling : scaling.to(acc_type).contiguous();

  // Row -> adapter (T: no adapter), then a stable counting sort by adapter.
  std::vector<int64_t>& row_t = h.row_t;
  row_t.resize(N);
  if (adapter_index.has_value()) {
    const at::Tensor idx = adapter_index->contiguous();
    if (idx.scalar_type() == at::kInt) read_rows(idx.const_data_ptr<int32_t>(), N, T, row_t.data());
    else read_rows(idx.const_data_ptr<int64_t>(), N, T, row_t.data());
  } else {
    for (int64_t n = 0; n < N; ++n) row_t[n] = n * s.none_index_stride;
  }
  std::vector<int64_t>& start = h.start;
  start.assign(T + 2, 0);
  for (int64_t n = 0; n < N; ++n) {
    int64_t& t = row_t[n];
    if (t < 0 || rank[t] == 0) t = T;
    ++start[t + 1];
  }
  for (int64_t t = 0; t <= T; ++t) start[t + 1] += start[t];
  std::vector<int64_t>& order = h.order;
  std::vector<int64_t>& fill = h.fill;
  order.resize(N);
  fill.assign(start.begin(), start.end() - 1);
  for (int64_t n = 0; n < N; ++n) order[fill[row_t[n]]++] = n;

  // Work items and their approximate cost (multiply-adds, plus one adapter's packing).
  std::vector<LoraItem>& items = h.items;
  std::vector<int64_t>& cost = h.cost;
  items.clear();
  cost.clear();
  const int64_t width = s.H_in + s.H_out;
  for (int64_t t = 0; t <= T; ++t) {
    const int64_t rows = start[t + 1] - start[t];
    const int64_t step = t < T ? kBlockRows : kCopyBlockRows;
    for (int64_t i = start[t]; i < start[t + 1]; i += step) {
      const int64_t e = std::min(i + step, start[t + 1]);
      items.push_back({t < T ? t : -1, i, e, rows});
      cost.push_back(t < T ? (e - i) * rank[t] * width + (i == start[t] ? 2 * rank[t] * width : 0)
                           : (e - i) * s.H_out / 8 + 1);
    }
  }
  int64_t total = 0;
  for (int64_t c : cost) total += c;

  const LoraJob<S> job{x.const_data_ptr<S>(),
                       a.const_data_ptr<S>(),
                       b.const_data_ptr<S>(),
                       base.has_value() ? base->const_data_ptr<S>() : nullptr,
                       out.mutable_data_ptr<S>(),
                       scale.const_data_ptr<acc_t>(),
                       rank.data(),
                       order.data(),
                       items.data(),
                       s.H_in,
                       s.H_out,
                       R};
  const ProcessFn<S> process = process_fn<S>();
  const int64_t n_items = static_cast<int64_t>(items.size());

  const int64_t threads = at::in_parallel_region()
                              ? 1
                              : std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), n_items,
                                                   std::max<int64_t>(1, total / kMinCostPerThread)});
  if (threads <= 1) {
    process(job, 0, n_items);
    return;
  }
  // Contiguous item ranges of about equal cost: range p is items [split[p], split[p + 1]).
  std::vector<int64_t> split(threads + 1, n_items);
  split[0] = 0;
  int64_t acc = 0, p = 1;
  for (int64_t w = 0; w < n_items && p < threads; ++w) {
    acc += cost[w];
    while (p < threads && acc * threads >= total * p) split[p++] = w + 1;
  }
  // If fewer threads run than asked, each one takes several ranges.
  at::parallel_for(0, threads, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) process(job, split[q], split[q + 1]);
  });
}

}  // namespace

const char* multi_lora_cpu_isa() {
  switch (cpu_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "baseline";
  }
}

namespace {

// out = base + the LoRA term (out may be base itself: in place), for any dtype the kernel takes.
void run_into(const MultiLoraShape& s, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
              const std::optional<at::Tensor>& adapter_index, const at::Tensor& scaling,
              const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& base, at::Tensor& out) {
  if (out.numel() == 0) return;
  const at::Tensor xc = x.contiguous(), ac = lora_a.contiguous(), bc = lora_b.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_fwd", [&] {
    run<scalar_t>(s, xc, ac, bc, adapter_index, scaling, ranks, base, out);
  });
}

}  // namespace

at::Tensor multi_lora_fwd_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                              const std::optional<at::Tensor>& adapter_index, const at::Tensor& scaling,
                              const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& base) {
  const MultiLoraShape s =
      check_multi_lora(x, lora_a, lora_b, adapter_index, scaling, ranks, base, c10::kCPU);
  at::Tensor out = at::empty({s.N, s.H_out}, x.options());
  const std::optional<at::Tensor> basec =
      base.has_value() ? std::optional<at::Tensor>(base->contiguous()) : std::nullopt;
  run_into(s, x, lora_a, lora_b, adapter_index, scaling, ranks, basec, out);
  return out;
}

at::Tensor multi_lora_add_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                              const std::optional<at::Tensor>& adapter_index, const at::Tensor& scaling,
                              const std::optional<at::Tensor>& ranks, at::Tensor base) {
  const MultiLoraShape s = check_multi_lora(x, lora_a, lora_b, adapter_index, scaling, ranks, base, c10::kCPU);
  TORCH_CHECK(base.is_contiguous(), "multi_lora_add_: base must be contiguous (it is written in place)");
  run_into(s, x, lora_a, lora_b, adapter_index, scaling, ranks, base, base);
  return base;
}

}  // namespace peft_kernels

// CPU kernels of the segmented LoRA ops (C++, at::parallel_for):
//   multi_lora_bwd   (grad_y, x, lora_a, lora_b, adapter_index, scaling, ranks) -> (dx, dlora_a, dlora_b)
//   lora_shrink_fwd  (x, lora_a, adapter_index, ranks, scaling) -> h [N, R]   (fp32; fp64 for fp64)
//   lora_shrink_bwd  (grad_h, x, lora_a, adapter_index, ranks, scaling) -> (dx, dlora_a)
//   lora_expand_fwd  (h, lora_b, adapter_index, scaling, ranks, base) -> y [N, H_out]
//   lora_expand_bwd  (grad_y, h, lora_b, adapter_index, scaling, ranks) -> (dh, dlora_b)
//
// On the host (no sync cost on a CPU): read the per-row adapter once, counting-sort the rows by
// adapter (rows of -1 or of a rank-0 adapter form the "none" segment) and cut each adapter's rows
// into work items. In the backward an adapter with more than kOneItemRows rows is cut into fixed
// chunks whose weight-gradient partials are summed afterwards in chunk order; the chunking depends
// on the shapes only, so results are bitwise the same for any thread count. Items are split into
// contiguous cost-balanced ranges, one per thread (one thread for a small call). Weight gradients
// are written once, real rank slots from the sums and zeros in the padding, by the item that
// holds all of an adapter's rows or by the finalize pass. Only real rank slots of the banks, of h and
// of grad_h are read, and only the rows of each adapter: nothing of an unused adapter, of the rank
// padding or of a row without an adapter reaches a result, even NaN or Inf.
#include "../multi_lora.h"
#include "direct_call.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

namespace peft_kernels {

int cpu_isa_level() {
  static const int level = [] {
    // ATen's own choice (cpuinfo, capped by ATEN_CPU_CAPABILITY): the ISA its kernels run with.
    const std::string aten = at::get_cpu_capability();
    int best = aten == "AVX512" ? 2 : aten == "AVX2" ? 1 : 0;
#if !(defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)))
    best = 0;
#endif
    if (const char* forced = std::getenv("PEFT_KERNELS_CPU_ISA")) {
      const std::string name = forced;
      const int want = name == "avx512" ? 2 : name == "avx2" ? 1 : 0;
      best = std::min(best, want);  // never above what the CPU has
    }
    return best;
  }();
  return level;
}

namespace {

constexpr int64_t kTileRows = 16;      // rows per forward work item
constexpr int64_t kOneItemRows = 256;  // backward: an adapter with at most this many rows is one item
constexpr int64_t kMaxChunks = 32;     // backward: at most this many partial slots per adapter
constexpr int64_t kCopyRows = 64;      // rows per item of the none segment
// Multiply-adds per extra thread (~5 us of one core): waking workers costs more than that saves.
constexpr int64_t kMinCostPerThread = 256 * 1024;

template <typename S>
SegProcessFn<S> process_fn() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  switch (cpu_isa_level()) {
    case 2: return &vec_avx512::seg_process<S>;
    case 1: return &vec_avx2::seg_process<S>;
    default: break;
  }
#endif
  return &vec_default::seg_process<S>;
}

template <typename S>
SegFinalizeFn<S> finalize_fn() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  switch (cpu_isa_level()) {
    case 2: return &vec_avx512::seg_finalize<S>;
    case 1: return &vec_avx2::seg_finalize<S>;
    default: break;
  }
#endif
  return &vec_default::seg_finalize<S>;
}

std::vector<int64_t> host_int64(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

// Rows grouped by adapter and the work items over them.
struct Segments {
  std::vector<int64_t> rank, order, item_cost;
  std::vector<SegItem> items;
  std::vector<int64_t> fin_t, fin_p0, fin_np;  // adapters whose weight grads the finalize pass writes
  int64_t parts = 0;
  int64_t total_cost = 0;
};

Segments segment(const char* op, int64_t N, int64_t T, int64_t R, const std::optional<at::Tensor>& adapter_index,
                 const std::optional<at::Tensor>& ranks, bool backward, int64_t width) {
  Segments sg;
  sg.rank = ranks.has_value() ? host_int64(*ranks) : std::vector<int64_t>(T, R);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sg.rank[t] >= 0 && sg.rank[t] <= R, op, ": ranks[", t, "] = ", sg.rank[t], " is out of range [0, ", R,
                "]");
  std::vector<int64_t> row_t;
  if (adapter_index.has_value()) {
    row_t = host_int64(*adapter_index);
    for (int64_t n = 0; n < N; ++n)
      TORCH_CHECK(row_t[n] >= -1 && row_t[n] < T, op, ": adapter_index[", n, "] = ", row_t[n],
                  " is out of range [-1, ", T, ")");
  } else {
    row_t.resize(N);
    for (int64_t n = 0; n < N; ++n) row_t[n] = T == 1 ? 0 : n;
  }
  std::vector<int64_t> start(T + 2, 0);
  for (int64_t n = 0; n < N; ++n) {
    int64_t& t = row_t[n];
    if (t < 0 || sg.rank[t] == 0) t = T;
    ++start[t + 1];
  }
  for (int64_t t = 0; t <= T; ++t) start[t + 1] += start[t];
  sg.order.resize(N);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t n = 0; n < N; ++n) sg.order[fill[row_t[n]]++] = n;

  for (int64_t t = 0; t <= T; ++t) {
    const int64_t rows = start[t + 1] - start[t];
    if (t == T) {
      for (int64_t i = start[t]; i < start[t + 1]; i += kCopyRows) {
        const int64_t e = std::min(i + kCopyRows, start[t + 1]);
        sg.items.push_back({-1, i, e, -1});
        sg.item_cost.push_back((e - i) * width / 8 + 1);
      }
      break;
    }
    if (rows == 0) {
      if (backward) sg.fin_t.push_back(t), sg.fin_p0.push_back(0), sg.fin_np.push_back(0);
      continue;
    }
    int64_t step = kTileRows;
    bool partial = false;
    if (backward) {
      step = rows <= kOneItemRows ? rows : std::max(kOneItemRows / 2, (rows + kMaxChunks - 1) / kMaxChunks);
      partial = rows > step;
      if (partial) {
        sg.fin_t.push_back(t);
        sg.fin_p0.push_back(sg.parts);
        sg.fin_np.push_back((rows + step - 1) / step);
      }
    }
    for (int64_t i = start[t]; i < start[t + 1]; i += step) {
      const int64_t e = std::min(i + step, start[t + 1]);
      sg.items.push_back({t, i, e, partial ? sg.parts++ : -1});
      sg.item_cost.push_back((e - i + 1) * sg.rank[t] * width);
    }
  }
  for (int64_t c : sg.item_cost) sg.total_cost += c;
  return sg;
}

// Run fn(lo, hi) over contiguous item ranges of about equal cost on at::parallel_for's threads.
template <typename Fn>
void run_items(const std::vector<int64_t>& cost, int64_t total, const Fn& fn) {
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0) return;
  const int64_t threads = at::in_parallel_region()
                              ? 1
                              : std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), n,
                                                   std::max<int64_t>(1, total / kMinCostPerThread)});
  if (threads <= 1) {
    fn(0, n);
    return;
  }
  std::vector<int64_t> split(threads + 1, n);
  split[0] = 0;
  int64_t acc = 0, p = 1;
  for (int64_t w = 0; w < n && p < threads; ++w) {
    acc += cost[w];
    while (p < threads && acc * threads >= total * p) split[p++] = w + 1;
  }
  at::parallel_for(0, threads, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) fn(split[q], split[q + 1]);
  });
}

template <typename S>
void run_job(SegJob<S>& job, Segments& sg) {
  job.rank = sg.rank.data();
  job.order = sg.order.data();
  job.items = sg.items.data();
  const SegProcessFn<S> process = process_fn<S>();
  run_items(sg.item_cost, sg.total_cost, [&](int64_t lo, int64_t hi) { process(job, lo, hi); });
  if (sg.fin_t.empty()) return;
  const SegFinalizeFn<S> finalize = finalize_fn<S>();
  const int64_t F = static_cast<int64_t>(sg.fin_t.size());
  std::vector<int64_t> fcost(F);
  int64_t ftotal = 0;
  for (int64_t f = 0; f < F; ++f) ftotal += fcost[f] = (sg.fin_np[f] + 1) * job.R * (job.H_in + job.H_out);
  run_items(fcost, ftotal, [&](int64_t lo, int64_t hi) {
    for (int64_t f = lo; f < hi; ++f) finalize(job, sg.fin_t[f], sg.fin_p0[f], sg.fin_np[f]);
  });
}

at::ScalarType acc_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16, op, ": ", name,
              " must be float32/float64/float16/bfloat16, got ", d);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

void check_index(const char* op, const std::optional<at::Tensor>& adapter_index, int64_t N, int64_t T) {
  if (adapter_index.has_value()) {
    const at::Tensor& idx = *adapter_index;
    TORCH_CHECK(idx.dim() == 1 && idx.size(0) == N, op, ": adapter_index must be [N = ", N, "], got ", idx.sizes());
    TORCH_CHECK(lora_index_dtype(idx), op, ": adapter_index must be int32 or int64, got ", idx.scalar_type());
    TORCH_CHECK(idx.device().is_cpu(), op, ": adapter_index must be a CPU tensor");
  } else {
    TORCH_CHECK(T == 1 || T == N, op, ": adapter_index is None, so T (", T, ") must be 1 or N (", N, ")");
  }
}

void check_scaling(const char* op, const std::optional<at::Tensor>& scaling, int64_t T) {
  if (!scaling.has_value()) return;
  TORCH_CHECK(scaling->dim() == 1 && scaling->size(0) == T, op, ": scaling must be [T = ", T, "], got ",
              scaling->sizes());
  TORCH_CHECK(at::isFloatingType(scaling->scalar_type()) && scaling->device().is_cpu(), op,
              ": scaling must be a floating-point CPU tensor, got ", scaling->scalar_type(), " on ", scaling->device());
}

void check_ranks(const char* op, const std::optional<at::Tensor>& ranks, int64_t T) {
  if (!ranks.has_value()) return;
  TORCH_CHECK(ranks->dim() == 1 && ranks->size(0) == T, op, ": ranks must be [T = ", T, "], got ", ranks->sizes());
  TORCH_CHECK(lora_index_dtype(*ranks) && ranks->device().is_cpu(), op, ": ranks must be an int32/int64 CPU tensor");
}

// The rank-space tensor h / grad_h [N, R] in the accumulation type, contiguous.
at::Tensor rank_space(const char* op, const char* name, const at::Tensor& h, int64_t N, int64_t R,
                      at::ScalarType acc) {
  check_float(op, name, h);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == N && h.size(1) == R, op, ": ", name, " must be [N = ", N, ", R = ", R,
              "], got ", h.sizes());
  return h.to(acc).contiguous();
}

std::optional<at::Tensor> scale_of(const std::optional<at::Tensor>& scaling, at::ScalarType acc) {
  if (!scaling.has_value()) return std::nullopt;
  return scaling->to(acc).contiguous();
}

template <typename S>
SegJob<S> new_job(SegMode mode, int64_t H_in, int64_t H_out, int64_t R) {
  SegJob<S> job{};
  job.mode = mode;
  job.H_in = H_in;
  job.H_out = H_out;
  job.R = R;
  return job;
}

template <typename S, typename A>
const A* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<A>() : nullptr;
}

// ---------------------------------------------------------------- multi_lora backward
std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_lora_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
    const std::optional<at::Tensor>& adapter_index, const at::Tensor& scaling, const std::optional<at::Tensor>& ranks) {
  const char* op = "multi_lora_bwd";
  const MultiLoraShape s = check_multi_lora(x, lora_a, lora_b, adapter_index, scaling, ranks, std::nullopt, c10::kCPU);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == s.N && grad_y.size(1) == s.H_out, op,
              ": grad_y must be [N = ", s.N, ", H_out = ", s.H_out, "], got ", grad_y.sizes());
  TORCH_CHECK(grad_y.device().is_cpu(), op, ": grad_y must be a CPU tensor");
  const at::Tensor g = grad_y.to(x.scalar_type()).contiguous();
  const at::Tensor xc = x.contiguous(), ac = lora_a.contiguous(), bc = lora_b.contiguous();
  at::Tensor dx = at::empty({s.N, s.H_in}, x.options());
  at::Tensor da = at::empty({s.T, s.R, s.H_in}, lora_a.options());
  at::Tensor db = at::empty({s.T, s.H_out, s.R}, lora_b.options());
  if (s.T == 0 || (s.N == 0 && da.numel() + db.numel() == 0)) return {dx, da, db};
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor scale = scaling.to(acc).contiguous();
  Segments sg = segment(op, s.N, s.T, s.R, adapter_index, ranks, true, s.H_in + s.H_out);
  at::Tensor part_a = at::empty({sg.parts, s.R, s.H_in}, x.options().dtype(acc));
  at::Tensor part_b = at::empty({sg.parts, s.R, s.H_out}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_lora_bwd", [&] {
    using A = typename SegJob<scalar_t>::acc_t;
    SegJob<scalar_t> job = new_job<scalar_t>(SegMode::MultiBwd, s.H_in, s.H_out, s.R);
    job.x = xc.const_data_ptr<scalar_t>();
    job.g = g.const_data_ptr<scalar_t>();
    job.a = ac.const_data_ptr<scalar_t>();
    job.b = bc.const_data_ptr<scalar_t>();
    job.scaling = scale.const_data_ptr<A>();
    job.out = dx.mutable_data_ptr<scalar_t>();
    job.da = da.mutable_data_ptr<scalar_t>();
    job.db = db.mutable_data_ptr<scalar_t>();
    job.part_a = part_a.mutable_data_ptr<A>();
    job.part_b = part_b.mutable_data_ptr<A>();
    run_job(job, sg);
  });
  return {dx, da, db};
}

// ---------------------------------------------------------------- lora_shrink
void check_shrink(const char* op, const at::Tensor& x, const at::Tensor& lora_a,
                  const std::optional<at::Tensor>& adapter_index, const std::optional<at::Tensor>& ranks,
                  const std::optional<at::Tensor>& scaling) {
  check_float(op, "x", x);
  check_float(op, "lora_a", lora_a);
  TORCH_CHECK(x.dim() == 2, op, ": x must be [N, H_in], got ", x.sizes());
  TORCH_CHECK(lora_a.dim() == 3 && lora_a.size(2) == x.size(1), op, ": lora_a must be [T, R, H_in = ", x.size(1),
              "], got ", lora_a.sizes());
  TORCH_CHECK(lora_a.scalar_type() == x.scalar_type(), op, ": lora_a dtype ", lora_a.scalar_type(), " != x dtype ",
              x.scalar_type());
  check_index(op, adapter_index, x.size(0), lora_a.size(0));
  check_ranks(op, ranks, lora_a.size(0));
  check_scaling(op, scaling, lora_a.size(0));
}

at::Tensor lora_shrink_fwd_cpu(const at::Tensor& x, const at::Tensor& lora_a,
                               const std::optional<at::Tensor>& adapter_index, const std::optional<at::Tensor>& ranks,
                               const std::optional<at::Tensor>& scaling) {
  const char* op = "lora_shrink_fwd";
  check_shrink(op, x, lora_a, adapter_index, ranks, scaling);
  const int64_t N = x.size(0), H_in = x.size(1), T = lora_a.size(0), R = lora_a.size(1);
  const at::ScalarType acc = acc_type(x.scalar_type());
  at::Tensor h = at::empty({N, R}, x.options().dtype(acc));
  if (h.numel() == 0) return h;
  if (T == 0) return h.zero_();
  const at::Tensor xc = x.contiguous(), ac = lora_a.contiguous();
  const std::optional<at::Tensor> scale = scale_of(scaling, acc);
  Segments sg = segment(op, N, T, R, adapter_index, ranks, false, H_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink_fwd", [&] {
    using A = typename SegJob<scalar_t>::acc_t;
    SegJob<scalar_t> job = new_job<scalar_t>(SegMode::ShrinkFwd, H_in, 0, R);
    job.x = xc.const_data_ptr<scalar_t>();
    job.a = ac.const_data_ptr<scalar_t>();
    job.scaling = ptr_or_null<scalar_t, A>(scale);
    job.hout = h.mutable_data_ptr<A>();
    run_job(job, sg);
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> lora_shrink_bwd_cpu(const at::Tensor& grad_h, const at::Tensor& x,
                                                       const at::Tensor& lora_a,
                                                       const std::optional<at::Tensor>& adapter_index,
                                                       const std::optional<at::Tensor>& ranks,
                                                       const std::optional<at::Tensor>& scaling) {
  const char* op = "lora_shrink_bwd";
  check_shrink(op, x, lora_a, adapter_index, ranks, scaling);
  const int64_t N = x.size(0), H_in = x.size(1), T = lora_a.size(0), R = lora_a.size(1);
  const at::ScalarType acc = acc_type(x.scalar_type());
  const at::Tensor gh = rank_space(op, "grad_h", grad_h, N, R, acc);
  at::Tensor dx = at::empty({N, H_in}, x.options());
  at::Tensor da = at::empty({T, R, H_in}, lora_a.options());
  if (T == 0) return {dx.zero_(), da};
  const at::Tensor xc = x.contiguous(), ac = lora_a.contiguous();
  const std::optional<at::Tensor> scale = scale_of(scaling, acc);
  Segments sg = segment(op, N, T, R, adapter_index, ranks, true, H_in);
  at::Tensor part_a = at::empty({sg.parts, R, H_in}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_shrink_bwd", [&] {
    using A = typename SegJob<scalar_t>::acc_t;
    SegJob<scalar_t> job = new_job<scalar_t>(SegMode::ShrinkBwd, H_in, 0, R);
    job.x = xc.const_data_ptr<scalar_t>();
    job.a = ac.const_data_ptr<scalar_t>();
    job.hin = gh.const_data_ptr<A>();
    job.scaling = ptr_or_null<scalar_t, A>(scale);
    job.out = dx.mutable_data_ptr<scalar_t>();
    job.da = da.mutable_data_ptr<scalar_t>();
    job.part_a = part_a.mutable_data_ptr<A>();
    run_job(job, sg);
  });
  return {dx, da};
}

// ---------------------------------------------------------------- lora_expand
void check_expand(const char* op, const at::Tensor& h, const at::Tensor& lora_b,
                  const std::optional<at::Tensor>& adapter_index, const at::Tensor& scaling,
                  const std::optional<at::Tensor>& ranks) {
  check_float(op, "lora_b", lora_b);
  TORCH_CHECK(h.dim() == 2, op, ": h must be [N, R], got ", h.sizes());
  TORCH_CHECK(lora_b.dim() == 3 && lora_b.size(2) == h.size(1), op, ": lora_b must be [T, H_out, R = ", h.size(1),
              "], got ", lora_b.sizes());
  check_index(op, adapter_index, h.size(0), lora_b.size(0));
  check_ranks(op, ranks, lora_b.size(0));
  check_scaling(op, scaling, lora_b.size(0));
}

at::Tensor lora_expand_fwd_cpu(const at::Tensor& h, const at::Tensor& lora_b,
                               const std::optional<at::Tensor>& adapter_index, const at::Tensor& scaling,
                               const std::optional<at::Tensor>& ranks, const std::optional<at::Tensor>& base) {
  const char* op = "lora_expand_fwd";
  check_expand(op, h, lora_b, adapter_index, scaling, ranks);
  const int64_t N = h.size(0), T = lora_b.size(0), H_out = lora_b.size(1), R = lora_b.size(2);
  const at::ScalarType acc = acc_type(lora_b.scalar_type());
  const at::Tensor hc = rank_space(op, "h", h, N, R, acc);
  std::optional<at::Tensor> basec;
  if (base.has_value()) {
    TORCH_CHECK(base->dim() == 2 && base->size(0) == N && base->size(1) == H_out, op, ": base must be [N = ", N,
                ", H_out = ", H_out, "], got ", base->sizes());
    TORCH_CHECK(base->scalar_type() == lora_b.scalar_type() && base->device().is_cpu(), op, ": base must be a CPU ",
                lora_b.scalar_type(), " tensor like lora_b, got ", base->scalar_type());
    basec = base->contiguous();
  }
  at::Tensor y = at::empty({N, H_out}, lora_b.options());
  if (y.numel() == 0) return y;
  if (T == 0) return basec.has_value() ? y.copy_(*basec) : y.zero_();
  const at::Tensor bc = lora_b.contiguous();
  const at::Tensor scale = scaling.to(acc).contiguous();
  Segments sg = segment(op, N, T, R, adapter_index, ranks, false, H_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lora_b.scalar_type(), "lora_expand_fwd", [&] {
    using A = typename SegJob<scalar_t>::acc_t;
    SegJob<scalar_t> job = new_job<scalar_t>(SegMode::ExpandFwd, 0, H_out, R);
    job.b = bc.const_data_ptr<scalar_t>();
    job.base = basec.has_value() ? basec->const_data_ptr<scalar_t>() : nullptr;
    job.hin = hc.const_data_ptr<A>();
    job.scaling = scale.const_data_ptr<A>();
    job.out = y.mutable_data_ptr<scalar_t>();
    run_job(job, sg);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> lora_expand_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& h,
                                                       const at::Tensor& lora_b,
                                                       const std::optional<at::Tensor>& adapter_index,
                                                       const at::Tensor& scaling,
                                                       const std::optional<at::Tensor>& ranks) {
  const char* op = "lora_expand_bwd";
  check_expand(op, h, lora_b, adapter_index, scaling, ranks);
  const int64_t N = h.size(0), T = lora_b.size(0), H_out = lora_b.size(1), R = lora_b.size(2);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == N && grad_y.size(1) == H_out && grad_y.device().is_cpu(), op,
              ": grad_y must be a CPU tensor [N = ", N, ", H_out = ", H_out, "], got ", grad_y.sizes());
  const at::ScalarType acc = acc_type(lora_b.scalar_type());
  const at::Tensor hc = rank_space(op, "h", h, N, R, acc);
  const at::Tensor g = grad_y.to(lora_b.scalar_type()).contiguous();
  at::Tensor dh = at::empty({N, R}, lora_b.options().dtype(acc));
  at::Tensor db = at::empty({T, H_out, R}, lora_b.options());
  if (T == 0) return {dh.zero_().to(h.scalar_type()), db};
  const at::Tensor bc = lora_b.contiguous();
  const at::Tensor scale = scaling.to(acc).contiguous();
  Segments sg = segment(op, N, T, R, adapter_index, ranks, true, H_out);
  at::Tensor part_b = at::empty({sg.parts, R, H_out}, lora_b.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lora_b.scalar_type(), "lora_expand_bwd", [&] {
    using A = typename SegJob<scalar_t>::acc_t;
    SegJob<scalar_t> job = new_job<scalar_t>(SegMode::ExpandBwd, 0, H_out, R);
    job.g = g.const_data_ptr<scalar_t>();
    job.b = bc.const_data_ptr<scalar_t>();
    job.hin = hc.const_data_ptr<A>();
    job.scaling = scale.const_data_ptr<A>();
    job.hout = dh.mutable_data_ptr<A>();
    job.db = db.mutable_data_ptr<scalar_t>();
    job.part_b = part_b.mutable_data_ptr<A>();
    run_job(job, sg);
  });
  return {dh.to(h.scalar_type()), db};
}

}  // namespace
}  // namespace peft_kernels

TORCH_LIBRARY_FRAGMENT(peft_kernels, m) {
  m.def(
      "multi_lora_bwd(Tensor grad_y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor? adapter_index, Tensor scaling, "
      "Tensor? ranks) -> (Tensor, Tensor, Tensor)");
  m.def("lora_shrink_fwd(Tensor x, Tensor lora_a, Tensor? adapter_index, Tensor? ranks, Tensor? scaling) -> Tensor");
  m.def(
      "lora_shrink_bwd(Tensor grad_h, Tensor x, Tensor lora_a, Tensor? adapter_index, Tensor? ranks, "
      "Tensor? scaling) -> (Tensor, Tensor)");
  m.def(
      "lora_expand_fwd(Tensor h, Tensor lora_b, Tensor? adapter_index, Tensor scaling, Tensor? ranks, "
      "Tensor? base) -> Tensor");
  m.def(
      "lora_expand_bwd(Tensor grad_y, Tensor h, Tensor lora_b, Tensor? adapter_index, Tensor scaling, "
      "Tensor? ranks) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("multi_lora_bwd", &peft_kernels::multi_lora_bwd_cpu);
  m.impl("lora_shrink_fwd", &peft_kernels::lora_shrink_fwd_cpu);
  m.impl("lora_shrink_bwd", &peft_kernels::lora_shrink_bwd_cpu);
  m.impl("lora_expand_fwd", &peft_kernels::lora_expand_fwd_cpu);
  m.impl("lora_expand_bwd", &peft_kernels::lora_expand_bwd_cpu);
}

PK_DIRECT_CALL(multi_lora_bwd, peft_kernels::multi_lora_bwd_cpu);
PK_DIRECT_CALL(lora_shrink_fwd, peft_kernels::lora_shrink_fwd_cpu);
PK_DIRECT_CALL(lora_shrink_bwd, peft_kernels::lora_shrink_bwd_cpu);
PK_DIRECT_CALL(lora_expand_fwd, peft_kernels::lora_expand_fwd_cpu);
PK_DIRECT_CALL(lora_expand_bwd, peft_kernels::lora_expand_bwd_cpu);

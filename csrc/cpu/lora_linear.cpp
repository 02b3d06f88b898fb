// CPU kernel of multi_lora_linear (fp32, AVX-512; plain function peft_kernels._C.multi_lora_linear):
//   y = x @ weight^T + bias + scaling[t] * x @ lora_a[t, :r]^T @ lora_b[t, :, :r]^T   (t = the row's adapter)
// for decode-sized calls (a handful of rows), where MKL's sgemm spends most of its time packing the
// weight and the LoRA term, run after it, reads its output back. Here each weight row and each bank
// row is read once, straight from where it lies:
//   1. h[i, :r] = scaling[t] * x_i @ lora_a[t, :r]^T       dot products over H_in, 4 ranks at a time
//   2. per block of 4 outputs and 4 rows, 16 accumulators of 16 lanes over H_in:
//        acc[i][q] += x_i[k:k+16] * weight[o + q, k:k+16]
//      then the LoRA term joins the same accumulators lane-wise, acc[i][q] += h_i[j:j+16] * lora_b[t, o + q, j:j+16],
//      and one horizontal sum gives y[i, o + q] (+ bias).
// A row's result depends on that row only (the same operations in the same order whatever the other
// rows are), so a row equals that row alone bitwise, and does not depend on the thread count.
// Rows of adapter -1 or of a rank-0 adapter get the base linear only; nothing past ranks[t] is read.
// Inference only: no autograd, no dispatcher op (the LoRA layer calls it when it fits, see
// peft_kernels/methods/lora.py); other CPUs, dtypes or layouts take F.linear + multi_lora_add_.
#include "../multi_lora.h"
#include "direct_call.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PK_LINEAR_AVX512 1
#include <immintrin.h>
#else
#define PK_LINEAR_AVX512 0
#endif

namespace peft_kernels {
namespace {

constexpr int64_t kRowBlock = 4;  // rows per accumulator tile
constexpr int64_t kOutBlock = 4;  // outputs per accumulator tile
constexpr int64_t kPrefetchBlocks = 4;  // software prefetch distance, in output blocks
// Multiply-adds per thread below which the call stays on one thread (waking workers costs more).
constexpr int64_t kMinMacsPerThread = 512 * 1024;

#if PK_LINEAR_AVX512
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif

#include "avx512_helpers.inc"  // lanes(), reduce4()

// h[j] = s * dot(x, a[j]) for j < r; h[j] = 0 for r <= j < Rp (Rp: r rounded up to 16).
void shrink_row(const float* x, const float* a, int64_t r, int64_t K, float s, float* h, int64_t Rp) {
  for (int64_t j0 = 0; j0 < r; j0 += 4) {
    const int64_t jb = std::min<int64_t>(4, r - j0);
    const float* ar[4];
    for (int64_t j = 0; j < 4; ++j) ar[j] = a + (j0 + std::min(j, jb - 1)) * K;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = lanes(K - k);
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[j] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, ar[j] + k), acc[j]);
    }
    _mm_mask_storeu_ps(h + j0, static_cast<__mmask8>((1u << jb) - 1u),
                       _mm_mul_ps(reduce4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(s)));
  }
  std::fill(h + r, h + Rp, 0.f);
}

struct LinearJob {
  const float *x, *w, *bias, *b, *h;  // h [N, Rp]: scaled ranks, zero past each row's rank
  const int64_t* row_t;               // [N], -1: no LoRA term
  const int64_t* rank;                // [T]
  float* y;
  int64_t N, K, O, R, Rp;
};

// Outputs [o0, o0 + ob) of rows [i0, i0 + mb); missing rows/outputs of a tail tile repeat the first
// one (computed, not stored).
void tile(const LinearJob& j, int64_t i0, int64_t mb, int64_t o0, int64_t ob, bool prefetch) {
  const float* xr[kRowBlock];
  const float* wr[kOutBlock];
  for (int64_t i = 0; i < kRowBlock; ++i) xr[i] = j.x + (i0 + (i < mb ? i : 0)) * j.K;
  for (int64_t q = 0; q < kOutBlock; ++q) wr[q] = j.w + (o0 + (q < ob ? q : 0)) * j.K;
  __m512 acc[kRowBlock][kOutBlock];
#pragma GCC unroll 4
  for (int i = 0; i < kRowBlock; ++i)
#pragma GCC unroll 4
    for (int q = 0; q < kOutBlock; ++q) acc[i][q] = _mm512_setzero_ps();
  const int64_t K = j.K;
  // The first row tile of an output block streams the weight rows kPrefetchBlocks blocks ahead into L1
  // (the hardware prefetcher alone keeps too few lines in flight here).
  const int64_t ahead = prefetch && o0 + (kPrefetchBlocks + 1) * kOutBlock <= j.O ? kPrefetchBlocks * kOutBlock * K : -1;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = lanes(K - k);
    if (ahead >= 0) {
#pragma GCC unroll 4
      for (int q = 0; q < kOutBlock; ++q) _mm_prefetch(reinterpret_cast<const char*>(wr[q] + ahead + k), _MM_HINT_T0);
    }
    __m512 wv[kOutBlock];
#pragma GCC unroll 4
    for (int q = 0; q < kOutBlock; ++q) wv[q] = _mm512_maskz_loadu_ps(m, wr[q] + k);
#pragma GCC unroll 4
    for (int i = 0; i < kRowBlock; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, xr[i] + k);
#pragma GCC unroll 4
      for (int q = 0; q < kOutBlock; ++q) acc[i][q] = _mm512_fmadd_ps(xv, wv[q], acc[i][q]);
    }
  }
  // Compile-time row indices throughout: the accumulators stay in registers.
#pragma GCC unroll 4
  for (int i = 0; i < kRowBlock; ++i) {
    const int64_t t = i < mb ? j.row_t[i0 + i] : -1;
    if (t < 0) continue;
    const int64_t r = j.rank[t];
    const float* hrow = j.h + (i0 + i) * j.Rp;
    const float* bt = j.b + t * j.O * j.R;
    for (int64_t c = 0; c < r; c += 16) {
      const __mmask16 m = lanes(r - c);
      if (o0 + (kPrefetchBlocks + 1) * kOutBlock <= j.O) {
#pragma GCC unroll 4
        for (int q = 0; q < kOutBlock; ++q)
          _mm_prefetch(reinterpret_cast<const char*>(bt + (o0 + kPrefetchBlocks * kOutBlock + q) * j.R + c), _MM_HINT_T0);
      }
      const __m512 hv = _mm512_loadu_ps(hrow + c);
#pragma GCC unroll 4
      for (int q = 0; q < kOutBlock; ++q)
        acc[i][q] = _mm512_fmadd_ps(hv, _mm512_maskz_loadu_ps(m, bt + (o0 + (q < ob ? q : 0)) * j.R + c), acc[i][q]);
    }
  }
  const __mmask8 store = static_cast<__mmask8>((1u << ob) - 1u);
  const __m128 bias = j.bias ? _mm_maskz_loadu_ps(store, j.bias + o0) : _mm_setzero_ps();
#pragma GCC unroll 4
  for (int i = 0; i < kRowBlock; ++i)
    if (i < mb)
      _mm_mask_storeu_ps(j.y + (i0 + i) * j.O + o0, store,
                         _mm_add_ps(reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]), bias));
}

void run(const LinearJob& j, const float* a, const float* scaling, std::vector<float>& h) {
  for (int64_t n = 0; n < j.N; ++n) {
    const int64_t t = j.row_t[n];
    if (t >= 0) shrink_row(j.x + n * j.K, a + t * j.R * j.K, j.rank[t], j.K, scaling[t], h.data() + n * j.Rp, j.Rp);
  }
  const int64_t blocks = (j.O + kOutBlock - 1) / kOutBlock;
  const int64_t macs_per_block = kOutBlock * j.N * j.K;
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerThread / std::max<int64_t>(1, macs_per_block));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t o0 = blk * kOutBlock, ob = std::min(kOutBlock, j.O - o0);
      for (int64_t i0 = 0; i0 < j.N; i0 += kRowBlock) tile(j, i0, std::min(kRowBlock, j.N - i0), o0, ob, i0 == 0);
    }
  });
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // PK_LINEAR_AVX512

template <typename index_t>
void read_index(const at::Tensor& t, std::vector<int64_t>& out) {
  const at::Tensor c = t.contiguous();
  const index_t* p = c.const_data_ptr<index_t>();
  out.assign(p, p + c.numel());
}

void read_int(const at::Tensor& t, std::vector<int64_t>& out) {
  if (t.scalar_type() == at::kInt) read_index<int32_t>(t, out);
  else read_index<int64_t>(t, out);
}

}  // namespace

bool multi_lora_linear_available() { return PK_LINEAR_AVX512 && cpu_isa_level() >= 2; }

at::Tensor multi_lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& adapter_index,
                                 const at::Tensor& scaling, const at::Tensor& ranks) {
  const MultiLoraShape s = check_multi_lora(x, lora_a, lora_b, adapter_index, scaling, ranks, std::nullopt, c10::kCPU);
  TORCH_CHECK(multi_lora_linear_available(), "multi_lora_linear: needs an AVX-512 CPU (this one runs ",
              multi_lora_cpu_isa(), "); use F.linear + multi_lora");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "multi_lora_linear: float32 only, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == s.H_out && weight.size(1) == s.H_in,
              "multi_lora_linear: weight must be [H_out = ", s.H_out, ", H_in = ", s.H_in, "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "multi_lora_linear: weight must be a float32 CPU tensor, got ", weight.scalar_type(), " on ",
              weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.H_out && bias->scalar_type() == at::kFloat &&
                    bias->device().is_cpu(),
                "multi_lora_linear: bias must be a float32 CPU tensor [H_out = ", s.H_out, "], got ", bias->sizes(),
                " ", bias->scalar_type());
  }
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), ac = lora_a.contiguous(), bc = lora_b.contiguous();
  const at::Tensor biasc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor scale = scaling.scalar_type() == at::kFloat ? scaling.contiguous() : scaling.to(at::kFloat);
  at::Tensor y = at::empty({s.N, s.H_out}, x.options());
  if (y.numel() == 0) return y;

  thread_local std::vector<int64_t> row_t, rank;
  thread_local std::vector<float> h;
  read_int(ranks, rank);
  read_int(adapter_index, row_t);
  for (int64_t t = 0; t < s.T; ++t)
    TORCH_CHECK(rank[t] >= 0 && rank[t] <= s.R, "multi_lora_linear: ranks[", t, "] = ", rank[t],
                " is out of range [0, ", s.R, "]");
  for (int64_t n = 0; n < s.N; ++n) {
    int64_t& t = row_t[n];
    TORCH_CHECK(t >= -1 && t < s.T, "multi_lora_linear: adapter_index[", n, "] = ", t, " is out of range [-1, ", s.T,
                ")");
    if (t >= 0 && rank[t] == 0) t = -1;
  }
#if PK_LINEAR_AVX512
  const int64_t Rp = (s.R + 15) / 16 * 16;
  if (static_cast<int64_t>(h.size()) < s.N * Rp) h.resize(s.N * Rp);
  const LinearJob job{xc.const_data_ptr<float>(),
                      wc.const_data_ptr<float>(),
                      biasc.defined() ? biasc.const_data_ptr<float>() : nullptr,
                      bc.const_data_ptr<float>(),
                      h.data(),
                      row_t.data(),
                      rank.data(),
                      y.mutable_data_ptr<float>(),
                      s.N,
                      s.H_in,
                      s.H_out,
                      s.R,
                      Rp};
  run(job, ac.const_data_ptr<float>(), scale.const_data_ptr<float>(), h);
#endif
  return y;
}

}  // namespace peft_kernels

PK_DIRECT_CALL(multi_lora_linear, peft_kernels::multi_lora_linear_cpu);

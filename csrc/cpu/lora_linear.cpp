// CPU kernel of multi_lora_linear (fp32, AVX-512 or AVX2; plain function peft_kernels._C.multi_lora_linear):
//   y = x @ weight^T + bias + scaling[t] * x @ lora_a[t, :r]^T @ lora_b[t, :, :r]^T   (t = the row's adapter)
// for decode-sized calls (a handful of rows), where MKL's sgemm spends most of its time packing the
// weight and the LoRA term, run after it, reads its output back. Here each weight row and each bank
// row is read once, straight from where it lies:
//   1. h[i, :r] = scaling[t] * x_i @ lora_a[t, :r]^T       dot products over H_in, 4 ranks at a time
//   2. per block of 4 outputs and 4 rows (AVX2: 3 rows), 16 (12) accumulators of L = 16 (8) lanes over H_in:
//        acc[i][q] += x_i[k:k+L] * weight[o + q, k:k+L]
//      then the LoRA term joins the same accumulators lane-wise, acc[i][q] += h_i[j:j+L] * lora_b[t, o + q, j:j+L],
//      and one horizontal sum gives y[i, o + q] (+ bias).
// A row's result depends on that row only (the same operations in the same order whatever the other
// rows are), so a row equals that row alone bitwise, and does not depend on the thread count.
// Rows of adapter -1 or of a rank-0 adapter get the base linear only; nothing past ranks[t] is read.
// Inference only: no autograd, no dispatcher op (the LoRA layer calls it when it fits, see
// peft_kernels/methods/lora.py); other CPUs, dtypes or layouts take F.linear + multi_lora_add_.
// The ISA follows cpu_isa_level() (ATen's capability, capped by PEFT_KERNELS_CPU_ISA).
#include "../multi_lora.h"
#include "direct_call.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PK_LINEAR_X86 1
#include <immintrin.h>
#else
#define PK_LINEAR_X86 0
#endif

namespace peft_kernels {
namespace {

struct LinearJob {
  const float *x, *w, *bias, *b;
  float* h;                     // [N, Rp]: scaled ranks, zero past each row's rank
  const int64_t* row_t;         // [N], -1: no LoRA term
  const int64_t* rank;          // [T]
  float* y;
  int64_t N, K, O, R, Rp;
};

constexpr int64_t kOutBlock = 4;  // outputs per accumulator tile
constexpr int64_t kPrefetchBlocks = 4;  // software prefetch distance, in output blocks
// Multiply-adds per thread below which the call stays on one thread (waking workers costs more).
constexpr int64_t kMinMacsPerThread = 512 * 1024;

#if PK_LINEAR_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif

namespace avx512 {
constexpr int64_t kRowBlock = 4;  // rows per accumulator tile (4 x 4 of the 32 zmm registers)

#include "avx512_helpers.inc"  // lanes(), reduce4()

// h[j] = s * dot(x, a[j]) for j < r; h[j] = 0 for r <= j < Rp (Rp: r rounded up to 16).
void shrink_row(const float* x, const float* a, int64_t r, int64_t K, float s, float* h, int64_t Rp,
                const float* /*next: not prefetched*/, int64_t /*next_r*/) {
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

}  // namespace avx512

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// The same kernel on AVX2 + FMA (16 ymm registers of 8 lanes): tiles of 3 rows x 4 outputs (12 accumulators,
// 3 x vectors, each weight vector streamed through the last register), full-width loads over H_in and
// masked ones only for the tail past the last multiple of 8 and for the ranks; the shrink prefetches the
// next row's adapter rows.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace avx2 {
constexpr int64_t kRowBlock = 3;  // 3 x 4 accumulators, 3 x vectors and 1 weight vector: the 16 ymm registers

// The first n of 8 lanes, as vmaskmov's mask.
inline __m256i lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The lane sums of v0..v3 as one 4-lane vector: [sum v0, sum v1, sum v2, sum v3].
inline __m128 reduce4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// h[j] = s * dot(x, a[j]) for j < r; h[j] = 0 for r <= j < Rp. Meanwhile the same lines of the next
// row's adapter (next, of rank next_r; nullptr: none) are prefetched: its rows are cold in a model.
void shrink_row(const float* x, const float* a, int64_t r, int64_t K, float s, float* h, int64_t Rp,
                const float* next, int64_t next_r) {
  const int64_t K8 = K / 8 * 8;
  const __m256i tail = lanes(K - K8);
  for (int64_t j0 = 0; j0 < r; j0 += 4) {
    const int64_t jb = std::min<int64_t>(4, r - j0);
    const float* ar[4];
    for (int64_t j = 0; j < 4; ++j) ar[j] = a + (j0 + std::min(j, jb - 1)) * K;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const int64_t pb = next ? std::clamp<int64_t>(next_r - j0, 0, 4) : 0;
    for (int64_t k = 0; k < K8; k += 8) {
      if (pb > 0 && (k & 15) == 0) {
        for (int64_t j = 0; j < pb; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + (j0 + j) * K + k), _MM_HINT_T0);
      }
      const __m256 xv = _mm256_loadu_ps(x + k);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(ar[j] + k), acc[j]);
    }
    if (K8 < K) {
      const __m256 xv = _mm256_maskload_ps(x + K8, tail);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(xv, _mm256_maskload_ps(ar[j] + K8, tail), acc[j]);
    }
    alignas(16) float out[4];
    _mm_store_ps(out, _mm_mul_ps(reduce4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(s)));
    std::copy(out, out + jb, h + j0);
  }
  std::fill(h + r, h + Rp, 0.f);
}

// Outputs [o0, o0 + ob) of rows [i0, i0 + Rows); missing outputs of a tail tile repeat the first one
// (computed, not stored). A row's operations are the same in a tile of 1, 2 or 3 rows.
template <int Rows>
void tile_rows(const LinearJob& j, int64_t i0, int64_t o0, int64_t ob, bool prefetch) {
  const float* xr[Rows];
  const float* wr[kOutBlock];
  for (int64_t i = 0; i < Rows; ++i) xr[i] = j.x + (i0 + i) * j.K;
  for (int64_t q = 0; q < kOutBlock; ++q) wr[q] = j.w + (o0 + (q < ob ? q : 0)) * j.K;
  __m256 acc[Rows][kOutBlock];
#pragma GCC unroll 3
  for (int i = 0; i < Rows; ++i)
#pragma GCC unroll 4
    for (int q = 0; q < kOutBlock; ++q) acc[i][q] = _mm256_setzero_ps();
  const int64_t K = j.K, K8 = K / 8 * 8;
  const bool ahead_ok = o0 + (kPrefetchBlocks + 1) * kOutBlock <= j.O;
  const int64_t ahead = prefetch && ahead_ok ? kPrefetchBlocks * kOutBlock * K : -1;
  // One step of 8 lanes: the rows' x in registers, each weight vector loaded once and used by every row
  // (the empty asm keeps GCC from folding it into each FMA, which would load it Rows times).
  auto step = [&](int64_t k, const __m256i* mask) __attribute__((always_inline)) {
    __m256 xv[Rows];
#pragma GCC unroll 3
    for (int i = 0; i < Rows; ++i) {
      xv[i] = mask ? _mm256_maskload_ps(xr[i] + k, *mask) : _mm256_loadu_ps(xr[i] + k);
      asm("" : "+x"(xv[i]));
    }
#pragma GCC unroll 4
    for (int q = 0; q < kOutBlock; ++q) {
      __m256 wv = mask ? _mm256_maskload_ps(wr[q] + k, *mask) : _mm256_loadu_ps(wr[q] + k);
      asm("" : "+x"(wv));
#pragma GCC unroll 3
      for (int i = 0; i < Rows; ++i) acc[i][q] = _mm256_fmadd_ps(xv[i], wv, acc[i][q]);
    }
  };
  for (int64_t k = 0; k < K8; k += 8) {
    if (ahead >= 0 && (k & 15) == 0) {  // one prefetch per 64-byte line
#pragma GCC unroll 4
      for (int q = 0; q < kOutBlock; ++q) _mm_prefetch(reinterpret_cast<const char*>(wr[q] + ahead + k), _MM_HINT_T0);
    }
    step(k, nullptr);
  }
  if (K8 < K) {
    const __m256i m = lanes(K - K8);
    step(K8, &m);
  }
#pragma GCC unroll 3
  for (int i = 0; i < Rows; ++i) {
    const int64_t t = j.row_t[i0 + i];
    if (t < 0) continue;
    const int64_t r = j.rank[t];
    const float* hrow = j.h + (i0 + i) * j.Rp;
    const float* bt = j.b + t * j.O * j.R;
    for (int64_t c = 0; c < r; c += 8) {
      const __m256i m = lanes(r - c);
      if (ahead_ok && (c & 15) == 0) {
#pragma GCC unroll 4
        for (int q = 0; q < kOutBlock; ++q)
          _mm_prefetch(reinterpret_cast<const char*>(bt + (o0 + kPrefetchBlocks * kOutBlock + q) * j.R + c), _MM_HINT_T0);
      }
      const __m256 hv = _mm256_loadu_ps(hrow + c);
#pragma GCC unroll 4
      for (int q = 0; q < kOutBlock; ++q)
        acc[i][q] = _mm256_fmadd_ps(hv, _mm256_maskload_ps(bt + (o0 + (q < ob ? q : 0)) * j.R + c, m), acc[i][q]);
    }
  }
  const __m128 bias_v = j.bias && ob == kOutBlock ? _mm_loadu_ps(j.bias + o0) : _mm_setzero_ps();
#pragma GCC unroll 3
  for (int i = 0; i < Rows; ++i) {
    alignas(16) float out[4];
    _mm_store_ps(out, _mm_add_ps(reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]), bias_v));
    float* yrow = j.y + (i0 + i) * j.O + o0;
    if (ob == kOutBlock) {
      std::copy(out, out + 4, yrow);
    } else {
      for (int64_t q = 0; q < ob; ++q) yrow[q] = out[q] + (j.bias ? j.bias[o0 + q] : 0.f);
    }
  }
}

void tile(const LinearJob& j, int64_t i0, int64_t mb, int64_t o0, int64_t ob, bool prefetch) {
  static_assert(kRowBlock == 3, "a tile_rows<> per row count up to kRowBlock");
  if (mb == 3) tile_rows<3>(j, i0, o0, ob, prefetch);
  else if (mb == 2) tile_rows<2>(j, i0, o0, ob, prefetch);
  else tile_rows<1>(j, i0, o0, ob, prefetch);
}

}  // namespace avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

using ShrinkFn = void (*)(const float*, const float*, int64_t, int64_t, float, float*, int64_t, const float*, int64_t);
using TileFn = void (*)(const LinearJob&, int64_t, int64_t, int64_t, int64_t, bool);

// Shrink every row, then the output blocks (in parallel) tile by tile, on one ISA's kernels.
template <ShrinkFn shrink_row, TileFn tile, int64_t kRowBlock>
void run(const LinearJob& j, const float* a, const float* scaling) {
  int64_t n = 0;
  while (n < j.N && j.row_t[n] < 0) ++n;
  while (n < j.N) {
    int64_t next = n + 1;
    while (next < j.N && j.row_t[next] < 0) ++next;
    const int64_t t = j.row_t[n], u = next < j.N ? j.row_t[next] : -1;
    shrink_row(j.x + n * j.K, a + t * j.R * j.K, j.rank[t], j.K, scaling[t], j.h + n * j.Rp, j.Rp,
               u >= 0 ? a + u * j.R * j.K : nullptr, u >= 0 ? j.rank[u] : 0);
    n = next;
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
#endif  // PK_LINEAR_X86

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

bool multi_lora_linear_available() { return PK_LINEAR_X86 && cpu_isa_level() >= 1; }

at::Tensor multi_lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& adapter_index,
                                 const at::Tensor& scaling, const at::Tensor& ranks) {
  const MultiLoraShape s = check_multi_lora(x, lora_a, lora_b, adapter_index, scaling, ranks, std::nullopt, c10::kCPU);
  TORCH_CHECK(multi_lora_linear_available(), "multi_lora_linear: needs an AVX2 or AVX-512 CPU (this one runs ",
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
#if PK_LINEAR_X86
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
  if (cpu_isa_level() >= 2)
    run<avx512::shrink_row, avx512::tile, avx512::kRowBlock>(job, ac.const_data_ptr<float>(), scale.const_data_ptr<float>());
  else
    run<avx2::shrink_row, avx2::tile, avx2::kRowBlock>(job, ac.const_data_ptr<float>(), scale.const_data_ptr<float>());
#endif
  return y;
}

}  // namespace peft_kernels

PK_DIRECT_CALL(multi_lora_linear, peft_kernels::multi_lora_linear_cpu);

// CPU kernels of prefix_flash_fwd / prefix_flash_bwd: prefix_attention as one fused flash pass
// (same arguments and returns as prefix_attention_fwd / prefix_attention_bwd).
//
// Forward: one task per (row b, KV head g, block of queries). The task packs the block's queries
// of the G query heads sharing g (GQA) into one matrix, scaled by softmax_scale, and runs an
// online softmax in fp32 (fp64 for fp64) over: the row's prefix slots read from the bank (the first
// lens[t] slots of entry t = index[b]; nothing for -1 rows), then its sequence keys in blocks, only
// up to the block's last causal key (bottom-right aligned: key j visible to query i iff
// j <= i + Lk - Lq). Masked scores are selected to -inf and padded values selected to 0, so NaN or
// Inf stored in a masked slot never enters a sum. Tile products run on torch's BLAS.
// Backward (FlashAttention-2): one task per (b, g) recomputes P = exp(S - lse) per key block,
// dS = P * (dP - rowsum(dO * O)); dq, dk, dv of (b, g) belong to that task alone, and each task's
// prefix grads go to its own scratch slot, summed per bank entry over its rows in ascending order
// afterwards (deterministic).
#include "prefix_host_args.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace peft_kernels {
namespace flash_detail {

// e^x for x <= 0 (x = -inf gives 0): 2^n * poly(r), |r| <= ln2 / 2, relative error ~2e-7.
static inline __attribute__((always_inline)) float exp_nonpositive(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick; |t| < 2^22)
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float two_n = __builtin_bit_cast(float, bits);
  return x < -87.0f ? 0.0f : p * two_n;
}

float exp_shift_sum_base(float* s, int64_t n, float m) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_nonpositive(s[j] - m);
    sum += s[j];
  }
  return sum;
}

float row_max_base(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PK_AVX2 __attribute__((target("avx2,fma")))

PK_AVX2 float hsum(__m256 v) {
  const __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 y = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(y, _mm_shuffle_ps(y, y, 1)));
}

// exp_nonpositive on 8 lanes (x < -87, -inf and NaN give 0).
PK_AVX2 __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f), magic = _mm256_set1_ps(12582912.0f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  const __m256 xc = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), magic), magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), keep);
}

PK_AVX2 float exp_shift_sum_avx2(float* s, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  return hsum(acc) + exp_shift_sum_base(s + j, n - j, m);
}

PK_AVX2 float row_max_avx2(const float* s, int64_t n) {
  __m256 v = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(s + j));
  const __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 y = _mm_max_ps(x, _mm_movehl_ps(x, x));
  const float m = _mm_cvtss_f32(_mm_max_ss(y, _mm_shuffle_ps(y, y, 1)));
  return std::max(m, row_max_base(s + j, n - j));
}
#undef PK_AVX2

const bool kAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
float exp_shift_sum_avx2(float* s, int64_t n, float m) { return exp_shift_sum_base(s, n, m); }
float row_max_avx2(const float* s, int64_t n) { return row_max_base(s, n); }
const bool kAvx2 = false;
#endif

// s[j] = exp(s[j] - m) for j < n; returns their sum. m is finite or +inf (then every s[j] -> 0).
float exp_shift_sum(float* s, int64_t n, float m) {
  return kAvx2 ? exp_shift_sum_avx2(s, n, m) : exp_shift_sum_base(s, n, m);
}

float row_max(const float* s, int64_t n) { return kAvx2 ? row_max_avx2(s, n) : row_max_base(s, n); }

}  // namespace flash_detail

namespace {

using at::native::TransposeType;

// Column-major C = alpha op(A) op(B) + beta C on the BLAS that torch links (sgemm_ / dgemm_, which
// libtorch_cpu exports when it carries MKL or OpenBLAS; at::native::cpublas::gemm is not exported
// to extensions); without them, on a plain loop.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

template <typename acc_t>
void gemm(TransposeType ta, TransposeType tb, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* a,
          int64_t lda, const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  const char ca = ta == TransposeType::Transpose ? 'T' : 'N', cb = tb == TransposeType::Transpose ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (sgemm_ != nullptr) return sgemm_(&ca, &cb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&ca, &cb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      acc_t sum = 0;
      for (int64_t p = 0; p < k; ++p) {
        const acc_t x = ta == TransposeType::Transpose ? a[i * lda + p] : a[p * lda + i];
        const acc_t y = tb == TransposeType::Transpose ? b[p * ldb + j] : b[j * ldb + p];
        sum += x * y;
      }
      c[j * ldc + i] = alpha * sum + (beta == acc_t(0) ? acc_t(0) : beta * c[j * ldc + i]);
    }
  }
}

double exp_shift_sum(double* s, int64_t n, double m) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}
float exp_shift_sum(float* s, int64_t n, float m) { return flash_detail::exp_shift_sum(s, n, m); }

double row_max(const double* s, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  return m;
}
float row_max(const float* s, int64_t n) { return flash_detail::row_max(s, n); }

// Host-side description of one call.
struct Problem {
  int64_t B, Hq, Hkv, G, Lq, Lk, D, T, P;
  bool causal;
  double scale;
  std::vector<int64_t> entry;      // [B]: the row's bank entry, -1 when it sees no prefix slot
  std::vector<int64_t> lens;       // [T]
  std::vector<uint8_t> keep;       // [B * Lk] real-key flags; empty = no padding anywhere
  std::vector<int64_t> key_count;  // [B * (Lk + 1)]: real keys in [0, j); empty = no padding
  int64_t padded_in(int64_t b, int64_t j0, int64_t j1) const {
    if (key_count.empty()) return 0;
    const int64_t* c = key_count.data() + b * (Lk + 1);
    return (j1 - j0) - (c[j1] - c[j0]);
  }
};

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                  const at::Tensor& prefix_v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && prefix_k.dim() == 4 && prefix_v.dim() == 4,
              "prefix_flash: q, k, v, prefix_k, prefix_v must be 4-D, got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes(), ", ", prefix_k.sizes(), ", ", prefix_v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "prefix_flash: q must be float32/float64/float16/bfloat16, got ", dtype);
  for (const at::Tensor* t : {&q, &k, &v, &prefix_k, &prefix_v}) {
    TORCH_CHECK(t->scalar_type() == dtype, "prefix_flash: k, v, prefix_k, prefix_v must have q's dtype ", dtype,
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "prefix_flash (CPU kernel): tensors must be on the CPU, got ", t->device());
  }
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && v.sizes() == k.sizes() && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0,
              "prefix_flash: k, v must be [B, Hkv, Lk, D] with Hq % Hkv == 0 (q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes(), ")");
  TORCH_CHECK(prefix_k.size(1) == k.size(1) && prefix_k.size(3) == q.size(3) && prefix_v.sizes() == prefix_k.sizes(),
              "prefix_flash: prefix_k, prefix_v must be [T, Hkv, P, D] (k ", k.sizes(), ", prefix_k ",
              prefix_k.sizes(), ", prefix_v ", prefix_v.sizes(), ")");
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& prefix_k,
                     const std::optional<at::Tensor>& prefix_index, const std::optional<at::Tensor>& prefix_lens,
                     const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale) {
  Problem p;
  p.B = q.size(0), p.Hq = q.size(1), p.Lq = q.size(2), p.D = q.size(3);
  p.Hkv = k.size(1), p.Lk = k.size(2), p.T = prefix_k.size(0), p.P = prefix_k.size(2);
  p.G = p.Hq / p.Hkv;
  p.causal = causal;
  p.scale = scale;
  p.lens = prefix_lengths(prefix_lens, p.T, p.P, "prefix_flash");
  p.entry = prefix_entry_per_row(prefix_index, p.B, p.T, "prefix_flash");
  for (int64_t b = 0; b < p.B; ++b) {
    if (p.entry[b] >= 0 && p.lens[p.entry[b]] == 0) p.entry[b] = -1;
  }
  p.key_count = real_key_counts(key_padding_mask, p.B, p.Lk, "prefix_flash");
  if (!p.key_count.empty()) {
    p.keep.resize(p.B * p.Lk);
    for (int64_t b = 0; b < p.B; ++b) {
      const int64_t* c = p.key_count.data() + b * (p.Lk + 1);
      for (int64_t j = 0; j < p.Lk; ++j) p.keep[b * p.Lk + j] = c[j + 1] > c[j] ? 1 : 0;
    }
  }
  return p;
}

// A [n, D] block of rows (row stride `stride`, unit last stride) as acc_t: a pointer into the tensor
// when no conversion or masking is needed, else a copy in `buf` with rows that keep[r] == 0 zeroed.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_acc(const scalar_t* src, int64_t stride, int64_t n, int64_t D, const uint8_t* keep, bool any_masked,
                         std::vector<acc_t>& buf, int64_t& ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (!any_masked && stride >= D) {
      ld = stride;
      return src;
    }
  }
  ld = D;
  for (int64_t r = 0; r < n; ++r) {
    acc_t* dst = buf.data() + r * D;
    if (any_masked && !keep[r]) {
      std::fill(dst, dst + D, acc_t(0));
      continue;
    }
    const scalar_t* s = src + r * stride;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(s[d]);
  }
  return buf.data();
}

// Strides of a 4-D tensor with unit last stride.
struct View {
  int64_t s0, s1, s2;
  explicit View(const at::Tensor& t) : s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
};

struct Blocks {
  int64_t q, k;
};

Blocks forward_blocks(const Problem& p) {
  if (p.Lq <= 16) return {p.Lq, 256};  // decode-like: every query of the group in one block
  return {32, 128};
}

// out [B, Hq, Lq, D] (contiguous, scalar_t) and lse [B, Hq, Lq] (contiguous, acc_t).
template <typename scalar_t, typename acc_t>
void forward_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& prefix_k, const at::Tensor& prefix_v, at::Tensor& out, at::Tensor& lse) {
  const Blocks bs = forward_blocks(p);
  const int64_t nqb = (p.Lq + bs.q - 1) / bs.q;
  const View qv(q), kv(k), vv(v), pkv(prefix_k), pvv(prefix_v);
  const scalar_t* qd = q.const_data_ptr<scalar_t>();
  const scalar_t* kd = k.const_data_ptr<scalar_t>();
  const scalar_t* vd = v.const_data_ptr<scalar_t>();
  const scalar_t* pkd = prefix_k.const_data_ptr<scalar_t>();
  const scalar_t* pvd = prefix_v.const_data_ptr<scalar_t>();
  scalar_t* od = out.mutable_data_ptr<scalar_t>();
  acc_t* ld_out = lse.mutable_data_ptr<acc_t>();
  const int64_t D = p.D, G = p.G, off = p.Lk - p.Lq;
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t scale = static_cast<acc_t>(p.scale);

  at::parallel_for(0, p.B * p.Hkv * nqb, 1, [&](int64_t begin, int64_t end) {
    const int64_t max_rows = G * bs.q;
    std::vector<acc_t> Q(max_rows * D), O(max_rows * D), S(max_rows * bs.k), m(max_rows), l(max_rows);
    std::vector<acc_t> kbuf(bs.k * D), vbuf(bs.k * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (p.Hkv * nqb), g = (task / nqb) % p.Hkv, qb = task % nqb;
      const int64_t i0 = qb * bs.q, i1 = std::min(p.Lq, i0 + bs.q), nq = i1 - i0, rows = G * nq;
      for (int64_t h = 0; h < G; ++h) {
        for (int64_t ii = 0; ii < nq; ++ii) {
          const scalar_t* src = qd + b * qv.s0 + (g * G + h) * qv.s1 + (i0 + ii) * qv.s2;
          acc_t* dst = Q.data() + (h * nq + ii) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = scale * static_cast<acc_t>(src[d]);
        }
      }
      std::fill(O.begin(), O.begin() + rows * D, acc_t(0));
      std::fill(m.begin(), m.begin() + rows, neg_inf);
      std::fill(l.begin(), l.begin() + rows, acc_t(0));

      // One key block: nk keys at kp / vp (row strides ks / vs). j0 >= 0: sequence keys j0.. (causal
      // limit and padding apply); j0 < 0: prefix slots (all visible).
      auto block = [&](const scalar_t* kp, int64_t ks, const scalar_t* vp, int64_t vs, int64_t nk, int64_t j0) {
        const bool seq = j0 >= 0;
        const bool padded = seq && p.padded_in(b, j0, j0 + nk) > 0;
        const uint8_t* keep = padded ? p.keep.data() + b * p.Lk + j0 : nullptr;
        int64_t ldk = 0, ldv = 0;
        const acc_t* K = rows_as_acc<scalar_t, acc_t>(kp, ks, nk, D, keep, padded, kbuf, ldk);
        const acc_t* V = rows_as_acc<scalar_t, acc_t>(vp, vs, nk, D, keep, padded, vbuf, ldv);
        gemm<acc_t>(TransposeType::Transpose, TransposeType::NoTranspose, nk, rows, D, acc_t(1), K, ldk, Q.data(),
                      D, acc_t(0), S.data(), nk);
        const bool causal_cut = seq && p.causal && j0 + nk - 1 > i0 + off;
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s = S.data() + r * nk;
          if (causal_cut || padded) {
            const int64_t lim = causal_cut ? (i0 + r % nq) + off - j0 : nk - 1;  // last visible key in block
            for (int64_t j = 0; j < nk; ++j) {
              const bool vis = j <= lim && (keep == nullptr || keep[j]);
              s[j] = vis ? s[j] : neg_inf;
            }
          }
          const acc_t mb = row_max(s, nk);
          const acc_t m_new = std::max(m[r], mb);
          if (m_new == neg_inf) {
            std::fill(s, s + nk, acc_t(0));
            continue;
          }
          const acc_t alpha = std::exp(m[r] - m_new);
          const acc_t sum = exp_shift_sum(s, nk, m_new);
          if (alpha != acc_t(1)) {
            acc_t* o = O.data() + r * D;
            for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
          }
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
        }
        gemm<acc_t>(TransposeType::NoTranspose, TransposeType::NoTranspose, D, rows, nk, acc_t(1), V, ldv, S.data(),
                      nk, acc_t(1), O.data(), D);
      };

      const int64_t t = p.entry[b];
      if (t >= 0) {
        const int64_t len = p.lens[t];
        for (int64_t c0 = 0; c0 < len; c0 += bs.k) {
          block(pkd + t * pkv.s0 + g * pkv.s1 + c0 * pkv.s2, pkv.s2, pvd + t * pvv.s0 + g * pvv.s1 + c0 * pvv.s2,
                pvv.s2, std::min(bs.k, len - c0), -1);
        }
      }
      const int64_t jend = p.causal ? std::min(p.Lk, i1 + off) : p.Lk;
      for (int64_t j0 = 0; j0 < jend; j0 += bs.k) {
        block(kd + b * kv.s0 + g * kv.s1 + j0 * kv.s2, kv.s2, vd + b * vv.s0 + g * vv.s1 + j0 * vv.s2, vv.s2,
              std::min(bs.k, jend - j0), j0);
      }

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = r / nq, i = i0 + r % nq;
        const int64_t dst = (b * p.Hq + g * G + h) * p.Lq + i;
        scalar_t* o = od + dst * D;
        const acc_t* src = O.data() + r * D;
        if (l[r] == acc_t(0)) {
          std::fill(o, o + D, scalar_t(0));
          ld_out[dst] = neg_inf;
          continue;
        }
        const acc_t inv = acc_t(1) / l[r];
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(src[d] * inv);
        ld_out[dst] = m[r] + std::log(l[r]);
      }
    }
  });
}

at::Tensor last_dim_dense(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// out in q's dtype, lse in the accumulation dtype (fp64 for fp64).
std::tuple<at::Tensor, at::Tensor> forward(const Problem& p, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& prefix_k,
                                           const at::Tensor& prefix_v) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(acc_type(q.scalar_type())));
  if (out.numel() == 0) {
    out.zero_();
    lse.fill_(-INFINITY);
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefix_flash_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, acc_t>(p, q, k, v, prefix_k, prefix_v, out, lse);
  });
  return {out, lse};
}

constexpr int64_t kBwdQBlock = 64;
constexpr int64_t kBwdKBlock = 64;

// grad_out, out: [B, Hq, Lq, D] contiguous in scalar_t; lse [B, Hq, Lq] contiguous acc_t with +inf where a
// query sees nothing. dq [B, Hq, Lq, D], dk, dv [B, Hkv, Lk, D] contiguous scalar_t; dprefix [B, Hkv, P, D]
// contiguous acc_t scratch (row b's contribution to its entry), written for rows with an entry.
template <typename scalar_t, typename acc_t>
void backward_kernel(const Problem& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& out,
                     const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dpk_rows,
                     at::Tensor& dpv_rows) {
  const View qv(q), kv(k), vv(v), pkv(prefix_k), pvv(prefix_v);
  const scalar_t* qd = q.const_data_ptr<scalar_t>();
  const scalar_t* kd = k.const_data_ptr<scalar_t>();
  const scalar_t* vd = v.const_data_ptr<scalar_t>();
  const scalar_t* pkd = prefix_k.const_data_ptr<scalar_t>();
  const scalar_t* pvd = prefix_v.const_data_ptr<scalar_t>();
  const scalar_t* god = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* outd = out.const_data_ptr<scalar_t>();
  const acc_t* lsed = lse.const_data_ptr<acc_t>();
  scalar_t* dqd = dq.mutable_data_ptr<scalar_t>();
  scalar_t* dkd = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dvd = dv.mutable_data_ptr<scalar_t>();
  acc_t* dpkd = dpk_rows.mutable_data_ptr<acc_t>();
  acc_t* dpvd = dpv_rows.mutable_data_ptr<acc_t>();
  const int64_t D = p.D, G = p.G, Lq = p.Lq, R = G * Lq, off = p.Lk - p.Lq;
  constexpr int64_t QB = kBwdQBlock, KB = kBwdKBlock;
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t scale = static_cast<acc_t>(p.scale);

  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Q(R * D), dO(R * D), dQ(R * D), Di(R), L(R);
    std::vector<acc_t> S(QB * KB), dP(QB * KB), kbuf(KB * D), vbuf(KB * D), dK(KB * D), dV(KB * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.Hkv, g = task % p.Hkv;
      for (int64_t h = 0; h < G; ++h) {
        const int64_t head = (b * p.Hq + g * G + h) * Lq;
        for (int64_t i = 0; i < Lq; ++i) {
          const int64_t r = h * Lq + i;
          const scalar_t* qs = qd + b * qv.s0 + (g * G + h) * qv.s1 + i * qv.s2;
          const scalar_t* gs = god + (head + i) * D;
          const scalar_t* os = outd + (head + i) * D;
          acc_t di = 0;
          for (int64_t d = 0; d < D; ++d) {
            Q[r * D + d] = scale * static_cast<acc_t>(qs[d]);
            dO[r * D + d] = static_cast<acc_t>(gs[d]);
            di += dO[r * D + d] * static_cast<acc_t>(os[d]);
          }
          Di[r] = di;
          L[r] = lsed[head + i];
        }
      }
      std::fill(dQ.begin(), dQ.end(), acc_t(0));

      // Key block of nk keys; j0 >= 0: sequence keys (mask applies); j0 < 0: prefix slots. The block's
      // key grads are left in dK / dV (row stride D) and handed to store(nk).
      auto block = [&](const scalar_t* kp, int64_t ks, const scalar_t* vp, int64_t vs, int64_t nk, int64_t j0,
                       auto&& store) {
        const bool seq = j0 >= 0;
        const bool padded = seq && p.padded_in(b, j0, j0 + nk) > 0;
        const uint8_t* keep = padded ? p.keep.data() + b * p.Lk + j0 : nullptr;
        int64_t ldk = 0, ldv = 0;
        const acc_t* K = rows_as_acc<scalar_t, acc_t>(kp, ks, nk, D, keep, padded, kbuf, ldk);
        const acc_t* V = rows_as_acc<scalar_t, acc_t>(vp, vs, nk, D, keep, padded, vbuf, ldv);
        std::fill(dK.begin(), dK.begin() + nk * D, acc_t(0));
        std::fill(dV.begin(), dV.begin() + nk * D, acc_t(0));
        // Queries that see at least key j0 (causal): i >= j0 - off.
        const int64_t istart = seq && p.causal ? std::max<int64_t>(0, j0 - off) : 0;
        for (int64_t h = 0; h < G; ++h) {
          for (int64_t i0 = istart; i0 < Lq; i0 += QB) {
            const int64_t nr = std::min(QB, Lq - i0), r0 = h * Lq + i0;
            const acc_t* Qb = Q.data() + r0 * D;
            const acc_t* dOb = dO.data() + r0 * D;
            gemm<acc_t>(TransposeType::Transpose, TransposeType::NoTranspose, nk, nr, D, acc_t(1), K, ldk, Qb, D,
                          acc_t(0), S.data(), nk);
            gemm<acc_t>(TransposeType::Transpose, TransposeType::NoTranspose, nk, nr, D, acc_t(1), V, ldv, dOb, D,
                          acc_t(0), dP.data(), nk);
            const bool causal_cut = seq && p.causal && j0 + nk - 1 > i0 + off;
            for (int64_t ii = 0; ii < nr; ++ii) {
              acc_t* s = S.data() + ii * nk;
              acc_t* dp = dP.data() + ii * nk;
              if (causal_cut || padded) {
                const int64_t lim = causal_cut ? i0 + ii + off - j0 : nk - 1;
                for (int64_t j = 0; j < nk; ++j) {
                  const bool vis = j <= lim && (keep == nullptr || keep[j]);
                  s[j] = vis ? s[j] : neg_inf;
                }
              }
              exp_shift_sum(s, nk, L[r0 + ii]);  // s = P (0 where masked, or where the query sees nothing)
              const acc_t di = Di[r0 + ii];
              for (int64_t j = 0; j < nk; ++j) dp[j] = s[j] * (dp[j] - di);  // dS
            }
            // dV += P^T dO ; dK += dS^T (scale q) ; dq += scale dS K
            gemm<acc_t>(TransposeType::NoTranspose, TransposeType::Transpose, D, nk, nr, acc_t(1), dOb, D, S.data(),
                          nk, acc_t(1), dV.data(), D);
            gemm<acc_t>(TransposeType::NoTranspose, TransposeType::Transpose, D, nk, nr, acc_t(1), Qb, D, dP.data(),
                          nk, acc_t(1), dK.data(), D);
            gemm<acc_t>(TransposeType::NoTranspose, TransposeType::NoTranspose, D, nr, nk, scale, K, ldk, dP.data(),
                          nk, acc_t(1), dQ.data() + r0 * D, D);
          }
        }
        store(nk);
      };

      const int64_t t = p.entry[b];
      if (t >= 0) {
        const int64_t len = p.lens[t];
        acc_t* gk = dpkd + (b * p.Hkv + g) * p.P * D;
        acc_t* gv = dpvd + (b * p.Hkv + g) * p.P * D;
        for (int64_t c0 = 0; c0 < len; c0 += KB) {
          block(pkd + t * pkv.s0 + g * pkv.s1 + c0 * pkv.s2, pkv.s2, pvd + t * pvv.s0 + g * pvv.s1 + c0 * pvv.s2,
                pvv.s2, std::min(KB, len - c0), -1, [&](int64_t nk) {
                  std::copy(dK.begin(), dK.begin() + nk * D, gk + c0 * D);
                  std::copy(dV.begin(), dV.begin() + nk * D, gv + c0 * D);
                });
        }
      }
      scalar_t* gk = dkd + (b * p.Hkv + g) * p.Lk * D;
      scalar_t* gv = dvd + (b * p.Hkv + g) * p.Lk * D;
      // Causal: the last query sees every key, so every block has a query that sees it.
      for (int64_t j0 = 0; j0 < p.Lk; j0 += KB) {
        const int64_t nk = std::min(KB, p.Lk - j0);
        auto store = [&](int64_t n) {
          for (int64_t x = 0; x < n * D; ++x) {
            gk[j0 * D + x] = static_cast<scalar_t>(dK[x]);
            gv[j0 * D + x] = static_cast<scalar_t>(dV[x]);
          }
        };
        block(kd + b * kv.s0 + g * kv.s1 + j0 * kv.s2, kv.s2, vd + b * vv.s0 + g * vv.s1 + j0 * vv.s2, vv.s2, nk, j0,
              store);
      }
      for (int64_t h = 0; h < G; ++h) {
        scalar_t* dst = dqd + (b * p.Hq + g * G + h) * Lq * D;
        const acc_t* src = dQ.data() + h * Lq * D;
        for (int64_t x = 0; x < Lq * D; ++x) dst[x] = static_cast<scalar_t>(src[x]);
      }
    }
  });
}

// dprefix[t] = sum over rows b using entry t, in ascending b, of rows[b]; slots past lens[t] stay 0.
template <typename scalar_t, typename acc_t>
void reduce_prefix(const Problem& p, const at::Tensor& rows, at::Tensor& dprefix) {
  const acc_t* src = rows.const_data_ptr<acc_t>();
  scalar_t* dst = dprefix.mutable_data_ptr<scalar_t>();
  const int64_t slab = p.P * p.D;
  at::parallel_for(0, p.T * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(slab);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = w / p.Hkv, g = w % p.Hkv, n = p.lens[t] * p.D;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t b = 0; b < p.B; ++b) {
        if (p.entry[b] != t) continue;
        const acc_t* s = src + (b * p.Hkv + g) * slab;
        for (int64_t x = 0; x < n; ++x) acc[x] += s[x];
      }
      scalar_t* d = dst + (t * p.Hkv + g) * slab;
      for (int64_t x = 0; x < slab; ++x) d[x] = static_cast<scalar_t>(acc[x]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> prefix_flash_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& prefix_k_in,
    const at::Tensor& prefix_v_in, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double softmax_scale) {
  check_inputs(q_in, k_in, v_in, prefix_k_in, prefix_v_in);
  const at::Tensor q = last_dim_dense(q_in), k = last_dim_dense(k_in), v = last_dim_dense(v_in);
  const at::Tensor prefix_k = last_dim_dense(prefix_k_in), prefix_v = last_dim_dense(prefix_v_in);
  const Problem p = make_problem(q, k, prefix_k, prefix_index, prefix_lens, key_padding_mask, causal, softmax_scale);
  auto [out, lse] = forward(p, q, k, v, prefix_k, prefix_v);
  return {out, lse.scalar_type() == at::kFloat ? lse : lse.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_flash_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& prefix_k_in, const at::Tensor& prefix_v_in, const std::optional<at::Tensor>& prefix_index,
    const std::optional<at::Tensor>& prefix_lens, const std::optional<at::Tensor>& key_padding_mask, bool causal,
    double softmax_scale, const at::Tensor& out_in, const at::Tensor& lse_in) {
  check_inputs(q_in, k_in, v_in, prefix_k_in, prefix_v_in);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), "prefix_flash_bwd: grad_out ",
              grad_out_in.sizes(), " and out ", out_in.sizes(), " must be like q ", q_in.sizes());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.sizes() == q_in.sizes().slice(0, 3), "prefix_flash_bwd: lse ",
              lse_in.sizes(), " must be [B, Hq, Lq] of q ", q_in.sizes());
  const auto dtype = q_in.scalar_type();
  const auto acc = acc_type(dtype);
  const at::Tensor q = last_dim_dense(q_in), k = last_dim_dense(k_in), v = last_dim_dense(v_in);
  const at::Tensor prefix_k = last_dim_dense(prefix_k_in), prefix_v = last_dim_dense(prefix_v_in);
  const Problem p = make_problem(q, k, prefix_k, prefix_index, prefix_lens, key_padding_mask, causal, softmax_scale);
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  at::Tensor dpk = at::zeros(prefix_k.sizes(), prefix_k.options());
  at::Tensor dpv = at::zeros(prefix_v.sizes(), prefix_v.options());
  if (p.B == 0 || p.Lq == 0 || p.D == 0 || p.Hq == 0) return {dq, dk, dv, dpk, dpv};

  at::Tensor out, lse;
  if (dtype == at::kDouble) {
    // The saved lse is fp32 (the op's contract); fp64 gradients need the fp64 one.
    std::tie(out, lse) = forward(p, q, k, v, prefix_k, prefix_v);
  } else {
    out = out_in.to(dtype).contiguous();
    lse = lse_in.to(acc).contiguous();
  }
  // A query that sees nothing has lse -inf; +inf makes every recomputed probability exp(s - lse) 0.
  lse = lse.masked_fill(lse == -INFINITY, INFINITY).contiguous();
  const at::Tensor grad_out = grad_out_in.to(dtype).contiguous();
  at::Tensor dpk_rows = at::zeros({p.B, p.Hkv, p.P, p.D}, q.options().dtype(acc));
  at::Tensor dpv_rows = at::zeros({p.B, p.Hkv, p.P, p.D}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "prefix_flash_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<scalar_t, acc_t>(p, grad_out, q, k, v, prefix_k, prefix_v, out, lse, dq, dk, dv, dpk_rows,
                                     dpv_rows);
    reduce_prefix<scalar_t, acc_t>(p, dpk_rows, dpk);
    reduce_prefix<scalar_t, acc_t>(p, dpv_rows, dpv);
  });
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace
}  // namespace peft_kernels

TORCH_LIBRARY_FRAGMENT(peft_kernels, m) {
  m.def(
      "prefix_flash_fwd(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor? prefix_index, "
      "Tensor? prefix_lens, Tensor? key_padding_mask, bool causal, float softmax_scale) -> (Tensor, Tensor)");
  m.def(
      "prefix_flash_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? prefix_index, Tensor? prefix_lens, Tensor? key_padding_mask, bool causal, float softmax_scale, "
      "Tensor out, Tensor lse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("prefix_flash_fwd", &peft_kernels::prefix_flash_fwd_cpu);
  m.impl("prefix_flash_bwd", &peft_kernels::prefix_flash_bwd_cpu);
}

// Pieces shared by the fused CPU attention kernels (prefix_flash.cpp, prefix_flash_varlen.cpp): the
// fp32 exp / row max of the online softmax (AVX2 when the CPU has it), column-major gemm on the BLAS
// torch links, the load of a key / value block as the accumulation type, the forward and backward
// tile steps of one task and the deterministic prefix-grad reduce.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Column-major C = alpha op(A) op(B) + beta C on the BLAS that torch links (sgemm_ / dgemm_, which
// libtorch_cpu exports when it carries MKL or OpenBLAS; at::native::cpublas::gemm is not exported
// to extensions); without them, on a plain loop.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

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

inline float exp_shift_sum_base(float* s, int64_t n, float m) {
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_nonpositive(s[j] - m);
    sum += s[j];
  }
  return sum;
}

inline float row_max_base(const float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PK_AVX2 __attribute__((target("avx2,fma")))

inline PK_AVX2 float hsum(__m256 v) {
  const __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 y = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(y, _mm_shuffle_ps(y, y, 1)));
}

// exp_nonpositive on 8 lanes (x < -87, -inf and NaN give 0).
inline PK_AVX2 __m256 exp8(__m256 x) {
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

inline PK_AVX2 float exp_shift_sum_avx2(float* s, int64_t n, float m) {
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

inline PK_AVX2 float row_max_avx2(const float* s, int64_t n) {
  __m256 v = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(s + j));
  const __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 y = _mm_max_ps(x, _mm_movehl_ps(x, x));
  const float m = _mm_cvtss_f32(_mm_max_ss(y, _mm_shuffle_ps(y, y, 1)));
  return std::max(m, row_max_base(s + j, n - j));
}
#undef PK_AVX2

inline const bool kAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
inline float exp_shift_sum_avx2(float* s, int64_t n, float m) { return exp_shift_sum_base(s, n, m); }
inline float row_max_avx2(const float* s, int64_t n) { return row_max_base(s, n); }
inline const bool kAvx2 = false;
#endif

// s[j] = exp(s[j] - m) for j < n; returns their sum. m is finite or +inf (then every s[j] -> 0).
inline float exp_shift_sum(float* s, int64_t n, float m) {
  return kAvx2 ? exp_shift_sum_avx2(s, n, m) : exp_shift_sum_base(s, n, m);
}

inline float row_max(const float* s, int64_t n) { return kAvx2 ? row_max_avx2(s, n) : row_max_base(s, n); }

}  // namespace flash_detail

namespace flash_core {

using at::native::TransposeType;


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

inline double exp_shift_sum(double* s, int64_t n, double m) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}
inline float exp_shift_sum(float* s, int64_t n, float m) { return flash_detail::exp_shift_sum(s, n, m); }

inline double row_max(const double* s, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  return m;
}
inline float row_max(const float* s, int64_t n) { return flash_detail::row_max(s, n); }

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

inline at::Tensor last_dim_dense(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---- Tile steps of the fused kernels. Each kernel hands them its own base pointers and strides; a
// task is one KV head g with the G query heads sharing it, their query rows stacked head-major.

// Rows of one operand for a task's query heads: row i of head h at p + h * hs + i * rs.
template <typename T>
struct Rows {
  T* p;
  int64_t hs, rs;
  T* at(int64_t h, int64_t i) const { return p + h * hs + i * rs; }
};

// One row's real-key flags: keep[j] (0 = padding) and count[j] = real keys in [0, j); both null
// when the row has no padding.
struct KeyMask {
  const uint8_t* keep = nullptr;
  const int64_t* count = nullptr;
  // keep + j0 when keys j0 .. j0 + n hold padding, else null.
  const uint8_t* in_block(int64_t j0, int64_t n) const {
    return count != nullptr && count[j0 + n] - count[j0] < n ? keep + j0 : nullptr;
  }
};

// Scores s[0, nk) of keys the query may not see set to -inf: past `last` when `cut`, and those with
// keep[j] == 0 when keep is not null.
template <typename acc_t>
inline void hide_keys(acc_t* s, int64_t nk, bool cut, int64_t last, const uint8_t* keep) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  if (keep != nullptr) {
    const int64_t lim = cut ? last : nk - 1;
    for (int64_t j = 0; j < nk; ++j) s[j] = j <= lim && keep[j] ? s[j] : neg_inf;
  } else if (cut) {
    for (int64_t j = std::max<int64_t>(0, last + 1); j < nk; ++j) s[j] = neg_inf;
  }
}

// One thread's forward buffers: up to max_rows query rows against blocks of up to max_keys keys.
template <typename acc_t>
struct ForwardScratch {
  std::vector<acc_t> Q, O, S, m, l, kbuf, vbuf;
  ForwardScratch(int64_t max_rows, int64_t max_keys, int64_t D)
      : Q(max_rows * D), O(max_rows * D), S(max_rows * max_keys), m(max_rows), l(max_rows), kbuf(max_keys * D),
        vbuf(max_keys * D) {}
};

// The online softmax (fp32, fp64 for fp64) of one forward task: queries i0 .. i0 + nq of the G heads,
// rows = G * nq rows of w; off = Lk - Lq of the row (bottom-right causal alignment).
template <typename scalar_t, typename acc_t>
class ForwardTile {
 public:
  // q: the task's first query of its first head.
  ForwardTile(ForwardScratch<acc_t>& w, Rows<const scalar_t> q, int64_t G, int64_t nq, int64_t D, int64_t i0,
              int64_t off, bool causal, acc_t scale)
      : w_(w), nq_(nq), rows_(G * nq), D_(D), i0_(i0), off_(off), causal_(causal) {
    for (int64_t h = 0; h < G; ++h) {
      for (int64_t ii = 0; ii < nq; ++ii) {
        const scalar_t* src = q.at(h, ii);
        acc_t* dst = w.Q.data() + (h * nq + ii) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = scale * static_cast<acc_t>(src[d]);
      }
    }
    std::fill(w.O.begin(), w.O.begin() + rows_ * D, acc_t(0));
    std::fill(w.m.begin(), w.m.begin() + rows_, kNegInf);
    std::fill(w.l.begin(), w.l.begin() + rows_, acc_t(0));
  }

  // How many of the row's Lk keys some query of the task sees.
  int64_t visible_keys(int64_t Lk) const { return causal_ ? std::clamp<int64_t>(i0_ + nq_ + off_, 0, Lk) : Lk; }

  // Keys [0, n) at k / v (row strides ks / vs) in blocks of bk. sequence: the row's own keys (the
  // causal limit and mask apply); else prefix slots (all visible).
  void keys(const scalar_t* k, int64_t ks, const scalar_t* v, int64_t vs, int64_t n, int64_t bk, bool sequence,
            const KeyMask& mask = {}) {
    for (int64_t j0 = 0; j0 < n; j0 += bk) {
      const int64_t nk = std::min(bk, n - j0);
      block(k + j0 * ks, ks, v + j0 * vs, vs, nk, sequence ? j0 : -1, sequence ? mask.in_block(j0, nk) : nullptr);
    }
  }

  // out = O / l in scalar_t and lse = m + log l per row; 0 and -inf for a query that saw nothing.
  void store(Rows<scalar_t> out, Rows<acc_t> lse) const {
    for (int64_t r = 0; r < rows_; ++r) {
      const int64_t h = r / nq_, ii = r % nq_;
      scalar_t* o = out.at(h, ii);
      acc_t* lse_at = lse.at(h, ii);
      if (w_.l[r] == acc_t(0)) {
        std::fill(o, o + D_, scalar_t(0));
        *lse_at = kNegInf;
        continue;
      }
      const acc_t inv = acc_t(1) / w_.l[r];
      const acc_t* src = w_.O.data() + r * D_;
      for (int64_t d = 0; d < D_; ++d) o[d] = static_cast<scalar_t>(src[d] * inv);
      *lse_at = w_.m[r] + std::log(w_.l[r]);
    }
  }

 private:
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  // nk keys; j0 >= 0: the row's keys j0.., j0 < 0: prefix slots; keep: the block's real-key flags or null.
  void block(const scalar_t* kp, int64_t ks, const scalar_t* vp, int64_t vs, int64_t nk, int64_t j0,
             const uint8_t* keep) {
    const int64_t D = D_;
    int64_t ldk = 0, ldv = 0;
    const acc_t* K = rows_as_acc<scalar_t, acc_t>(kp, ks, nk, D, keep, keep != nullptr, w_.kbuf, ldk);
    const acc_t* V = rows_as_acc<scalar_t, acc_t>(vp, vs, nk, D, keep, keep != nullptr, w_.vbuf, ldv);
    gemm<acc_t>(TransposeType::Transpose, TransposeType::NoTranspose, nk, rows_, D, acc_t(1), K, ldk, w_.Q.data(), D,
                acc_t(0), w_.S.data(), nk);
    const bool cut = j0 >= 0 && causal_ && j0 + nk - 1 > i0_ + off_;
    for (int64_t r = 0; r < rows_; ++r) {
      acc_t* s = w_.S.data() + r * nk;
      hide_keys(s, nk, cut, (i0_ + r % nq_) + off_ - j0, keep);
      const acc_t m_new = std::max(w_.m[r], row_max(s, nk));
      if (m_new == kNegInf) {
        std::fill(s, s + nk, acc_t(0));
        continue;
      }
      const acc_t alpha = std::exp(w_.m[r] - m_new);
      const acc_t sum = exp_shift_sum(s, nk, m_new);
      if (alpha != acc_t(1)) {
        acc_t* o = w_.O.data() + r * D;
        for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
      }
      w_.l[r] = w_.l[r] * alpha + sum;
      w_.m[r] = m_new;
    }
    gemm<acc_t>(TransposeType::NoTranspose, TransposeType::NoTranspose, D, rows_, nk, acc_t(1), V, ldv, w_.S.data(),
                nk, acc_t(1), w_.O.data(), D);
  }

  ForwardScratch<acc_t>& w_;
  const int64_t nq_, rows_, D_, i0_, off_;
  const bool causal_;
};

constexpr int64_t kBwdQBlock = 64;  // query rows per dS tile
constexpr int64_t kBwdKBlock = 64;  // keys per dS tile

// One thread's backward buffers for tasks of up to max_rows query rows.
template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> Q, dO, dQ, Di, L, S, dP, kbuf, vbuf, dK, dV;
  BackwardScratch(int64_t max_rows, int64_t D)
      : Q(max_rows * D), dO(max_rows * D), dQ(max_rows * D), Di(max_rows), L(max_rows), S(kBwdQBlock * kBwdKBlock),
        dP(kBwdQBlock * kBwdKBlock), kbuf(kBwdKBlock * D), vbuf(kBwdKBlock * D), dK(kBwdKBlock * D),
        dV(kBwdKBlock * D) {}
};

// FlashAttention-2 backward of one task: all Lq queries of the G heads (rows G * Lq of w). Per key
// block it recomputes P = exp(S - lse), dS = P * (dP - rowsum(dO * O)), adds dq and leaves the
// block's key grads in w.dK / w.dV. lse is +inf where a query sees nothing (every P is then 0).
template <typename scalar_t, typename acc_t>
class BackwardTile {
 public:
  BackwardTile(BackwardScratch<acc_t>& w, Rows<const scalar_t> q, Rows<const scalar_t> grad_out,
               Rows<const scalar_t> out, Rows<const acc_t> lse, int64_t G, int64_t Lq, int64_t D, int64_t off,
               bool causal, acc_t scale)
      : w_(w), G_(G), Lq_(Lq), D_(D), off_(off), causal_(causal), scale_(scale) {
    for (int64_t h = 0; h < G; ++h) {
      for (int64_t i = 0; i < Lq; ++i) {
        const int64_t r = h * Lq + i;
        const scalar_t* qs = q.at(h, i);
        const scalar_t* gs = grad_out.at(h, i);
        const scalar_t* os = out.at(h, i);
        acc_t di = 0;
        for (int64_t d = 0; d < D; ++d) {
          w.Q[r * D + d] = scale * static_cast<acc_t>(qs[d]);
          w.dO[r * D + d] = static_cast<acc_t>(gs[d]);
          di += w.dO[r * D + d] * static_cast<acc_t>(os[d]);
        }
        w.Di[r] = di;
        w.L[r] = *lse.at(h, i);
      }
    }
    std::fill(w.dQ.begin(), w.dQ.begin() + G * Lq * D, acc_t(0));
  }

  // Prefix slots [0, n) at k / v (row strides ks / vs); their grads go to dk / dv (rows of D).
  void prefix(const scalar_t* k, int64_t ks, const scalar_t* v, int64_t vs, int64_t n, acc_t* dk, acc_t* dv) {
    for (int64_t c0 = 0; c0 < n; c0 += kBwdKBlock) {
      const int64_t nk = std::min(kBwdKBlock, n - c0);
      block(k + c0 * ks, ks, v + c0 * vs, vs, nk, -1, nullptr);
      std::copy(w_.dK.begin(), w_.dK.begin() + nk * D_, dk + c0 * D_);
      std::copy(w_.dV.begin(), w_.dV.begin() + nk * D_, dv + c0 * D_);
    }
  }

  // The row's keys [0, n) at k / v; their grads go to dk / dv (rows of stride drs) in scalar_t. Causal:
  // the last query sees every key, so every block has a query that sees it.
  void keys(const scalar_t* k, int64_t ks, const scalar_t* v, int64_t vs, int64_t n, const KeyMask& mask,
            scalar_t* dk, scalar_t* dv, int64_t drs) {
    for (int64_t j0 = 0; j0 < n; j0 += kBwdKBlock) {
      const int64_t nk = std::min(kBwdKBlock, n - j0);
      block(k + j0 * ks, ks, v + j0 * vs, vs, nk, j0, mask.in_block(j0, nk));
      for (int64_t jj = 0; jj < nk; ++jj) {
        scalar_t* dkr = dk + (j0 + jj) * drs;
        scalar_t* dvr = dv + (j0 + jj) * drs;
        const acc_t* sk = w_.dK.data() + jj * D_;
        const acc_t* sv = w_.dV.data() + jj * D_;
        for (int64_t d = 0; d < D_; ++d) {
          dkr[d] = static_cast<scalar_t>(sk[d]);
          dvr[d] = static_cast<scalar_t>(sv[d]);
        }
      }
    }
  }

  void store_dq(Rows<scalar_t> dq) const {
    for (int64_t h = 0; h < G_; ++h) {
      for (int64_t i = 0; i < Lq_; ++i) {
        scalar_t* dst = dq.at(h, i);
        const acc_t* src = w_.dQ.data() + (h * Lq_ + i) * D_;
        for (int64_t d = 0; d < D_; ++d) dst[d] = static_cast<scalar_t>(src[d]);
      }
    }
  }

 private:
  // nk keys; j0 >= 0: the row's keys j0.., j0 < 0: prefix slots; keep: the block's real-key flags or null.
  void block(const scalar_t* kp, int64_t ks, const scalar_t* vp, int64_t vs, int64_t nk, int64_t j0,
             const uint8_t* keep) {
    constexpr int64_t QB = kBwdQBlock;
    const int64_t D = D_, Lq = Lq_;
    const acc_t scale = scale_;
    const bool seq = j0 >= 0;
    int64_t ldk = 0, ldv = 0;
    const acc_t* K = rows_as_acc<scalar_t, acc_t>(kp, ks, nk, D, keep, keep != nullptr, w_.kbuf, ldk);
    const acc_t* V = rows_as_acc<scalar_t, acc_t>(vp, vs, nk, D, keep, keep != nullptr, w_.vbuf, ldv);
    std::fill(w_.dK.begin(), w_.dK.begin() + nk * D, acc_t(0));
    std::fill(w_.dV.begin(), w_.dV.begin() + nk * D, acc_t(0));
    // Queries that see at least key j0 (causal): i >= j0 - off.
    const int64_t istart = seq && causal_ ? std::max<int64_t>(0, j0 - off_) : 0;
    for (int64_t h = 0; h < G_; ++h) {
      for (int64_t i0 = istart; i0 < Lq; i0 += QB) {
        const int64_t nr = std::min(QB, Lq - i0), r0 = h * Lq + i0;
        const acc_t* Qb = w_.Q.data() + r0 * D;
        const acc_t* dOb = w_.dO.data() + r0 * D;
        gemm<acc_t>(TransposeType::Transpose, TransposeType::NoTranspose, nk, nr, D, acc_t(1), K, ldk, Qb, D, acc_t(0),
                    w_.S.data(), nk);
        gemm<acc_t>(TransposeType::Transpose, TransposeType::NoTranspose, nk, nr, D, acc_t(1), V, ldv, dOb, D,
                    acc_t(0), w_.dP.data(), nk);
        const bool cut = seq && causal_ && j0 + nk - 1 > i0 + off_;
        for (int64_t ii = 0; ii < nr; ++ii) {
          acc_t* s = w_.S.data() + ii * nk;
          acc_t* dp = w_.dP.data() + ii * nk;
          hide_keys(s, nk, cut, i0 + ii + off_ - j0, keep);
          exp_shift_sum(s, nk, w_.L[r0 + ii]);  // s = P (0 where masked, or where the query sees nothing)
          const acc_t di = w_.Di[r0 + ii];
          for (int64_t j = 0; j < nk; ++j) dp[j] = s[j] * (dp[j] - di);  // dS
        }
        // dV += P^T dO ; dK += dS^T (scale q) ; dq += scale dS K
        gemm<acc_t>(TransposeType::NoTranspose, TransposeType::Transpose, D, nk, nr, acc_t(1), dOb, D, w_.S.data(),
                    nk, acc_t(1), w_.dV.data(), D);
        gemm<acc_t>(TransposeType::NoTranspose, TransposeType::Transpose, D, nk, nr, acc_t(1), Qb, D, w_.dP.data(), nk,
                    acc_t(1), w_.dK.data(), D);
        gemm<acc_t>(TransposeType::NoTranspose, TransposeType::NoTranspose, D, nr, nk, scale, K, ldk, w_.dP.data(), nk,
                    acc_t(1), w_.dQ.data() + r0 * D, D);
      }
    }
  }

  BackwardScratch<acc_t>& w_;
  const int64_t G_, Lq_, D_, off_;
  const bool causal_;
  const acc_t scale_;
};

// dprefix[t] ([T, Hkv, P, D], scalar_t) = sum over the rows i with entry[i] == t, in ascending i, of
// rows[slot_of(i)] ([*, Hkv, P, D] acc_t scratch; slot -1 = skipped); slots past lens[t] stay 0.
template <typename scalar_t, typename acc_t, typename SlotOf>
void reduce_prefix_grads(const at::Tensor& rows, at::Tensor& dprefix, const std::vector<int64_t>& entry,
                         const std::vector<int64_t>& lens, int64_t Hkv, int64_t P, int64_t D, SlotOf&& slot_of) {
  const acc_t* src = rows.const_data_ptr<acc_t>();
  scalar_t* dst = dprefix.mutable_data_ptr<scalar_t>();
  const int64_t slab = P * D, T = static_cast<int64_t>(lens.size()), n_rows = static_cast<int64_t>(entry.size());
  at::parallel_for(0, T * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(slab);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = w / Hkv, g = w % Hkv, n = lens[t] * D;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = 0; i < n_rows; ++i) {
        if (entry[i] != t) continue;
        const int64_t slot = slot_of(i);
        if (slot < 0) continue;
        const acc_t* r = src + (slot * Hkv + g) * slab;
        for (int64_t x = 0; x < n; ++x) acc[x] += r[x];
      }
      scalar_t* d = dst + (t * Hkv + g) * slab;
      for (int64_t x = 0; x < slab; ++x) d[x] = static_cast<scalar_t>(acc[x]);
    }
  });
}

// The accumulation type of scalar_t: fp64 for fp64, else fp32.
template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Data pointers of a fused kernel's inputs q, k, v, prefix_k, prefix_v.
template <typename scalar_t>
struct InputPointers {
  const scalar_t *q, *k, *v, *pk, *pv;
  InputPointers(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t, const at::Tensor& pk_t,
                const at::Tensor& pv_t)
      : q(q_t.const_data_ptr<scalar_t>()), k(k_t.const_data_ptr<scalar_t>()), v(v_t.const_data_ptr<scalar_t>()),
        pk(pk_t.const_data_ptr<scalar_t>()), pv(pv_t.const_data_ptr<scalar_t>()) {}
};

// Data pointers of what a fused backward reads besides the inputs (grad_out, out, lse) and of the
// grads it writes (dq, dk, dv in scalar_t; the per-task prefix-grad scratch dpk, dpv in acc_t).
template <typename scalar_t, typename acc_t>
struct BackwardPointers {
  const scalar_t *grad_out, *out;
  const acc_t* lse;
  scalar_t *dq, *dk, *dv;
  acc_t *dpk, *dpv;
  BackwardPointers(const at::Tensor& grad_out_t, const at::Tensor& out_t, const at::Tensor& lse_t, at::Tensor& dq_t,
                   at::Tensor& dk_t, at::Tensor& dv_t, at::Tensor& dpk_t, at::Tensor& dpv_t)
      : grad_out(grad_out_t.const_data_ptr<scalar_t>()), out(out_t.const_data_ptr<scalar_t>()),
        lse(lse_t.const_data_ptr<acc_t>()), dq(dq_t.mutable_data_ptr<scalar_t>()),
        dk(dk_t.mutable_data_ptr<scalar_t>()), dv(dv_t.mutable_data_ptr<scalar_t>()),
        dpk(dpk_t.mutable_data_ptr<acc_t>()), dpv(dpv_t.mutable_data_ptr<acc_t>()) {}
};

// The element and accumulation types a dtype dispatch hands a kernel.
template <typename S, typename A>
struct Types {
  using scalar = S;
  using acc = A;
};

// out (out_sizes, q's dtype) and lse (lse_sizes, the accumulation dtype) of a fused forward, filled by
// kernel(Types<scalar_t, acc_t>{}, out, lse); when out is empty, lse is -inf and the kernel is not run.
template <typename Kernel>
std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, at::IntArrayRef out_sizes,
                                               at::IntArrayRef lse_sizes, const char* name, Kernel&& kernel) {
  at::Tensor out = at::empty(out_sizes, q.options());
  at::Tensor lse = at::empty(lse_sizes, q.options().dtype(acc_type(q.scalar_type())));
  if (out.numel() == 0) {
    lse.fill_(-INFINITY);
    return {out, lse};
  }
  switch (q.scalar_type()) {
    case at::kFloat:
      kernel(Types<float, float>{}, out, lse);
      break;
    case at::kDouble:
      kernel(Types<double, double>{}, out, lse);
      break;
    case at::kHalf:
      kernel(Types<at::Half, float>{}, out, lse);
      break;
    case at::kBFloat16:
      kernel(Types<at::BFloat16, float>{}, out, lse);
      break;
    default:
      TORCH_CHECK(false, "\"", name, "\" not implemented for '", q.scalar_type(), "'");
  }
  return {out, lse};
}

// The forward's out (dtype, unit last stride) and lse (accumulation dtype, contiguous) for a backward:
// recompute() for fp64 (the saved lse is fp32, the op's contract; fp64 gradients need the fp64 one),
// else the saved ones. A query that sees nothing has lse -inf; it becomes +inf, so every recomputed
// probability exp(s - lse) is 0.
template <typename Recompute>
std::tuple<at::Tensor, at::Tensor> saved_for_backward(at::ScalarType dtype, const at::Tensor& out_in,
                                                      const at::Tensor& lse_in, Recompute&& recompute) {
  at::Tensor out, lse;
  if (dtype == at::kDouble) {
    std::tie(out, lse) = recompute();
  } else {
    out = last_dim_dense(out_in.to(dtype));
    lse = lse_in.to(acc_type(dtype));
  }
  lse = lse.masked_fill(lse == -INFINITY, INFINITY).contiguous();
  return {out, lse};
}

}  // namespace flash_core
}  // namespace peft_kernels

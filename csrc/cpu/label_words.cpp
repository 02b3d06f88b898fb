// KPT verbalizer head (label_word_logits): schema and CPU kernels. Arguments and results are those of
// peft_kernels.reference.label_word_logits / label_word_logits_backward, so peft_kernels.ops registers
// these as the "cpp" backend directly.
//
// The full-vocabulary normaliser is streamed: the vocabulary is cut into a fixed number of groups of
// tiles (independent of the thread count, so the partial sums and their order do not depend on it;
// only BLAS's own blocking of a tile product may round differently); at::parallel_for runs the
// groups, each holding one [N, tile] logits block at a time, and the groups' partial results are
// combined in group order. No [N, V] tensor is ever allocated.
#include "direct_call.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace peft_kernels {
namespace {

constexpr int64_t kVocabTile = 512;
constexpr int64_t kForwardGroups = 32;  // partials: [groups, N] log-sums
constexpr int64_t kBackwardGroups = 8;  // partials: [groups, N, H] dhidden sums

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct VocabSplit {
  int64_t tiles, groups, per_group;
  VocabSplit(int64_t V, int64_t max_groups) {
    tiles = (V + kVocabTile - 1) / kVocabTile;
    groups = std::max<int64_t>(1, std::min(tiles, max_groups));
    per_group = (tiles + groups - 1) / groups;
    groups = (tiles + per_group - 1) / per_group;
  }
};

// z = h @ w.T + bias for vocabulary rows [v0, v1); w (the tile in the accumulation dtype) is returned too.
std::pair<at::Tensor, at::Tensor> tile_logits(const at::Tensor& h, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias, int64_t v0, int64_t v1) {
  at::Tensor w = weight.narrow(0, v0, v1 - v0).to(h.scalar_type());
  at::Tensor z = at::mm(h, w.t());
  if (bias.has_value()) z.add_(bias->narrow(0, v0, v1 - v0).to(h.scalar_type()));
  return {z, w};
}

at::Tensor vocab_lse(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t N = h.size(0), V = weight.size(0);
  VocabSplit split(V, kForwardGroups);
  at::Tensor partial = at::full({split.groups, N}, -std::numeric_limits<double>::infinity(), h.options());
  at::parallel_for(0, split.groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      at::Tensor acc = partial[g];
      for (int64_t t = g * split.per_group; t < std::min(split.tiles, (g + 1) * split.per_group); ++t) {
        const int64_t v0 = t * kVocabTile, v1 = std::min(V, v0 + kVocabTile);
        acc.copy_(at::logaddexp(acc, at::logsumexp(tile_logits(h, weight, bias, v0, v1).first, {1})));
      }
    }
  });
  at::Tensor lse = partial[0].clone();
  for (int64_t g = 1; g < split.groups; ++g) lse = at::logaddexp(lse, partial[g]);
  return lse;
}

// The per-word log mixture log(alpha_w) - log(calibration_w) and alpha_w, in the accumulation dtype.
template <typename acc_t>
void word_mix(const std::vector<int64_t>& offsets, const c10::optional<at::Tensor>& word_weights,
              const c10::optional<at::Tensor>& calibration, std::vector<acc_t>& mix, std::vector<acc_t>& alpha) {
  const int64_t C = static_cast<int64_t>(offsets.size()) - 1, W = offsets.back();
  mix.assign(W, 0);
  alpha.assign(W, 0);
  at::Tensor ww, cal;
  if (word_weights.has_value()) ww = word_weights->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  if (calibration.has_value()) cal = calibration->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  for (int64_t c = 0; c < C; ++c) {
    const int64_t a = offsets[c], b = offsets[c + 1];
    if (ww.defined()) {
      const acc_t* p = ww.data_ptr<acc_t>();
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (int64_t w = a; w < b; ++w) m = std::max(m, p[w]);
      acc_t s = 0;
      for (int64_t w = a; w < b; ++w) s += std::exp(p[w] - m);
      const acc_t lse = std::log(s) + m;
      for (int64_t w = a; w < b; ++w) mix[w] = p[w] - lse;
    } else {
      for (int64_t w = a; w < b; ++w) mix[w] = -std::log(static_cast<acc_t>(b - a));
    }
    for (int64_t w = a; w < b; ++w) alpha[w] = std::exp(mix[w]);
  }
  if (cal.defined()) {
    const acc_t* p = cal.data_ptr<acc_t>();
    for (int64_t w = 0; w < W; ++w) mix[w] -= std::log(p[w]);
  }
}

struct Terms {
  at::Tensor h, rows, logits, y;  // [N, H], [W, H], [N, W] (log alpha p / calibration), [N, C]
};

template <typename acc_t>
Terms label_terms(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& word_ids, const std::vector<int64_t>& offsets, const std::vector<acc_t>& mix,
                  const at::Tensor& lse_in) {
  Terms t;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  t.h = hidden.to(acc).contiguous();
  const at::Tensor ids = word_ids.to(at::kLong);
  t.rows = weight.index_select(0, ids).to(acc).contiguous();
  at::Tensor zw = at::mm(t.h, t.rows.t());
  if (bias.has_value()) zw.add_(bias->index_select(0, ids).to(acc));
  const at::Tensor lse = lse_in.defined() ? lse_in.to(acc).contiguous() : vocab_lse(t.h, weight, bias);
  const int64_t N = t.h.size(0), W = offsets.back(), C = static_cast<int64_t>(offsets.size()) - 1;
  t.logits = zw.contiguous();
  t.y = at::empty({N, C}, t.h.options());
  acc_t* L = t.logits.data_ptr<acc_t>();
  acc_t* Y = t.y.data_ptr<acc_t>();
  const acc_t* S = lse.data_ptr<acc_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      acc_t* l = L + n * W;
      for (int64_t w = 0; w < W; ++w) l[w] = l[w] - S[n] + mix[w];
      for (int64_t c = 0; c < C; ++c) {
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t w = offsets[c]; w < offsets[c + 1]; ++w) m = std::max(m, l[w]);
        const acc_t shift = std::isfinite(m) ? m : acc_t(0);
        acc_t s = 0;
        for (int64_t w = offsets[c]; w < offsets[c + 1]; ++w) s += std::exp(l[w] - shift);
        Y[n * C + c] = std::log(s) + shift;
      }
    }
  });
  return t;
}

std::vector<int64_t> offsets_of(const at::Tensor& class_offsets) {
  const at::Tensor o = class_offsets.to(at::kLong).contiguous();
  return std::vector<int64_t>(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + o.numel());
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& word_ids,
                  const at::Tensor& class_offsets) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "label_word_logits: hidden [N, H] and weight [V, H] must share H, got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(word_ids.dim() == 1 && class_offsets.dim() == 1 && class_offsets.numel() >= 2,
              "label_word_logits: word_ids [W] and class_offsets [C+1] expected, got ", word_ids.sizes(), " and ",
              class_offsets.sizes());
}

std::tuple<at::Tensor, at::Tensor> label_word_logits_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& word_ids, const at::Tensor& class_offsets, const c10::optional<at::Tensor>& word_weights,
    const c10::optional<at::Tensor>& calibration) {
  check_inputs(hidden, weight, word_ids, class_offsets);
  const std::vector<int64_t> offsets = offsets_of(class_offsets);
  at::Tensor y, lse;
  AT_DISPATCH_FLOATING_TYPES(acc_type(hidden.scalar_type()), "label_word_logits_fwd", [&] {
    std::vector<scalar_t> mix, alpha;
    word_mix<scalar_t>(offsets, word_weights, calibration, mix, alpha);
    const at::Tensor h = hidden.to(c10::CppTypeToScalarType<scalar_t>::value).contiguous();
    lse = vocab_lse(h, weight, bias);
    y = label_terms<scalar_t>(h, weight, bias, word_ids, offsets, mix, lse).y.to(hidden.scalar_type());
  });
  return {y, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> label_word_logits_bwd_cpu(
    const at::Tensor& grad_y, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& hidden,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& word_ids,
    const at::Tensor& class_offsets, const c10::optional<at::Tensor>& word_weights,
    const c10::optional<at::Tensor>& calibration, const at::Tensor& lse, bool need_dweight, bool need_dbias) {
  check_inputs(hidden, weight, word_ids, class_offsets);
  const std::vector<int64_t> offsets = offsets_of(class_offsets);
  const int64_t N = hidden.size(0), V = weight.size(0), H = weight.size(1);
  const int64_t W = offsets.back(), C = static_cast<int64_t>(offsets.size()) - 1;
  need_dbias = need_dbias && bias.has_value();
  at::Tensor dh, dweight, dbias, dww;
  AT_DISPATCH_FLOATING_TYPES(acc_type(hidden.scalar_type()), "label_word_logits_bwd", [&] {
    const auto acc = c10::CppTypeToScalarType<scalar_t>::value;
    std::vector<scalar_t> mix, alpha;
    word_mix<scalar_t>(offsets, word_weights, calibration, mix, alpha);
    Terms t = label_terms<scalar_t>(hidden, weight, bias, word_ids, offsets, mix, lse);
    const at::Tensor gy = grad_y.to(acc).contiguous();
    const at::Tensor s = lse.to(acc).contiguous();
    // dl[n, w] = grad_y[n, c(w)] * r[n, w], r the word's share of its class's sum; G[n] = sum_c grad_y - grad_lse.
    at::Tensor dl = at::empty({N, W}, t.h.options());
    at::Tensor G = gy.sum(1);
    if (grad_lse.has_value()) G.sub_(grad_lse->to(acc));
    {
      scalar_t* D = dl.data_ptr<scalar_t>();
      const scalar_t* L = t.logits.data_ptr<scalar_t>();
      const scalar_t* Y = t.y.data_ptr<scalar_t>();
      const scalar_t* GY = gy.data_ptr<scalar_t>();
      at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t c = 0; c < C; ++c)
            for (int64_t w = offsets[c]; w < offsets[c + 1]; ++w)
              D[n * W + w] = GY[n * C + c] * std::exp(L[n * W + w] - Y[n * C + c]);
      });
    }
    dh = at::mm(dl, t.rows);
    dweight = need_dweight ? at::zeros({V, H}, t.h.options()) : at::empty({0, H}, weight.options());
    dbias = need_dbias ? at::zeros({V}, t.h.options()) : at::empty({0}, hidden.options());
    VocabSplit split(V, kBackwardGroups);
    at::Tensor partial = at::zeros({split.groups, N, H}, t.h.options());
    const at::Tensor Gc = G.unsqueeze(1), sc = s.unsqueeze(1);
    at::parallel_for(0, split.groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        at::Tensor acc_g = partial[g];
        for (int64_t i = g * split.per_group; i < std::min(split.tiles, (g + 1) * split.per_group); ++i) {
          const int64_t v0 = i * kVocabTile, v1 = std::min(V, v0 + kVocabTile);
          auto zw = tile_logits(t.h, weight, bias, v0, v1);
          at::Tensor gp = (zw.first - sc).exp_().mul_(Gc);  // G[n] * softmax(z[n])[v], [N, tile]
          acc_g.addmm_(gp, zw.second);
          if (need_dweight) dweight.narrow(0, v0, v1 - v0).copy_(at::mm(gp.t(), t.h).neg_());
          if (need_dbias) dbias.narrow(0, v0, v1 - v0).copy_(gp.sum(0).neg_());
        }
      }
    });
    for (int64_t g = 0; g < split.groups; ++g) dh.sub_(partial[g]);
    const at::Tensor ids = word_ids.to(at::kLong);
    if (need_dweight) dweight = dweight.index_add_(0, ids, at::mm(dl.t(), t.h)).to(weight.scalar_type());
    if (need_dbias) dbias = dbias.index_add_(0, ids, dl.sum(0)).to(bias->scalar_type());
    if (word_weights.has_value()) {
      std::vector<int64_t> word_class(W);
      for (int64_t c = 0; c < C; ++c) std::fill(word_class.begin() + offsets[c], word_class.begin() + offsets[c + 1], c);
      const at::Tensor classes = at::tensor(word_class, at::kLong);
      at::Tensor alpha_t = at::from_blob(alpha.data(), {W}, t.h.options()).clone();
      dww = (dl.sum(0) - alpha_t * gy.sum(0).index_select(0, classes)).to(word_weights->scalar_type());
    } else {
      dww = at::empty({0}, hidden.options());
    }
    dh = dh.to(hidden.scalar_type());
  });
  return {dh, dweight, dbias, dww};
}

}  // namespace
}  // namespace peft_kernels

TORCH_LIBRARY_FRAGMENT(peft_kernels, m) {
  m.def(
      "label_word_logits_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor word_ids, Tensor class_offsets, "
      "Tensor? word_weights, Tensor? calibration) -> (Tensor, Tensor)");
  m.def(
      "label_word_logits_bwd(Tensor grad_y, Tensor? grad_lse, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor word_ids, Tensor class_offsets, Tensor? word_weights, Tensor? calibration, Tensor lse, "
      "bool need_dweight, bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("label_word_logits_fwd", &peft_kernels::label_word_logits_fwd_cpu);
  m.impl("label_word_logits_bwd", &peft_kernels::label_word_logits_bwd_cpu);
}

PK_DIRECT_CALL(label_word_logits_fwd, peft_kernels::label_word_logits_fwd_cpu);
PK_DIRECT_CALL(label_word_logits_bwd, peft_kernels::label_word_logits_bwd_cpu);

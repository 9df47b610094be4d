// Fused ADAPT scoring on CPU: FiLM + fovea + pooling + cosine per (image, caption) pair, in one
// pass over the locals, without materialising the adapted tensors. Same math as
// adapt/similarity.py (which documents it); built by adapt/fused.py. Each direction has a forward
// and a backward kernel, which adapt/fused.py pairs in an autograd Function, so training uses
// them too; the backward recomputes each pair's fovea instead of saving it.
//
// Layout: locals are row-major (n_locals, d) so the inner loop runs over the d channels
// contiguously and vectorises (exp inlined, see softmax_exp; adapt/fused.py builds with
// -fopenmp-simd so that the `omp simd` pragmas hold without OpenMP threads). Work is split over
// images, and each image's locals stay in L2 while every caption is scored against them. Kernels
// are templated on the scalar type: float for speed, double for gradcheck.
#include <torch/extension.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
constexpr scalar_t kNormEps = scalar_t(1e-12);  // F.normalize's eps

// exp(x) for the softmax exponents, which are <= 0 (the maximum is subtracted). double (gradcheck)
// takes std::exp; float an inline Cephes expf: x = k ln2 + r with |r| <= ln2 / 2, a degree-6
// polynomial for exp(r), 2^k from the exponent bits. Relative error <= 1e-7 (libmvec's expf:
// 6e-8), and as it inlines into the `omp simd` loops it runs them 1.3x faster than libmvec's
// vector call (measured on the score loop, AVX2). Below -87, where float denormalises, it returns
// exp(-87) ~ 1.6e-38: every fovea sums to >= 1, so such terms are nothing next to it.
template <typename scalar_t>
inline scalar_t softmax_exp(scalar_t x) {
  return std::exp(x);
}

template <>
inline float softmax_exp<float>(float x) {
  x = std::max(x, -87.0f);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = std::fma(k, 2.12194440e-4f, std::fma(k, -0.693359375f, x));  // x - k ln2, 2 parts
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return p * two_k;
}

// A clear error unless `t` is a contiguous CPU tensor of `like`'s dtype and of shape `shape`.
void check(const torch::Tensor& t, const char* name, const torch::Tensor& like,
           c10::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "adapt fused kernels: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "adapt fused kernels: ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "adapt fused kernels: ", name, " has shape ", t.sizes(),
              ", expected ", shape);
  TORCH_CHECK(t.is_contiguous(), "adapt fused kernels: ", name, " must be contiguous");
}

// T2I inputs: regions (M, R, D) after BatchNorm; region_max / region_min (M, D) over R;
// scale = gamma + 1, shift = beta, query = unit caption vectors: (C, D).
template <typename scalar_t>
struct T2IInputs {
  T2IInputs(const torch::Tensor& regions, const torch::Tensor& region_max,
            const torch::Tensor& region_min, const torch::Tensor& scale,
            const torch::Tensor& shift, const torch::Tensor& query_unit, double smooth)
      : M(regions.size(0)), R(regions.size(1)), D(regions.size(2)), C(scale.size(0)),
        lambda(static_cast<scalar_t>(smooth)) {
    check(regions, "regions", regions, {M, R, D});
    check(region_max, "region_max", regions, {M, D});
    check(region_min, "region_min", regions, {M, D});
    check(scale, "scale", regions, {C, D});
    check(shift, "shift", regions, {C, D});
    check(query_unit, "query_unit", regions, {C, D});
    TORCH_CHECK(R > 0, "adapt fused kernels: images need at least one region");
    B = regions.data_ptr<scalar_t>();
    Bmax = region_max.data_ptr<scalar_t>();
    Bmin = region_min.data_ptr<scalar_t>();
    S = scale.data_ptr<scalar_t>();
    T = shift.data_ptr<scalar_t>();
    Q = query_unit.data_ptr<scalar_t>();
  }

  int64_t M, R, D, C;
  scalar_t lambda;
  const scalar_t *B, *Bmax, *Bmin, *S, *T, *Q;
};

// One thread's buffers for the (image, caption) pair being scored; all (D,) but exps (R, D).
template <typename scalar_t>
struct T2IPair {
  T2IPair(int64_t R, int64_t D, bool keep_exps)
      : logit_scale(D), offset(D), sum_e(D), mean(D), pooled(D), exps(keep_exps ? R * D : 0) {}

  std::vector<scalar_t> logit_scale, offset, sum_e, mean, pooled, exps;
  scalar_t norm = 0, score = 0;
};

// Scores image m against caption c. For channel j, with s = scale, t = shift, B = regions[m]:
// the fovea is p_ij = softmax_i(lambda s_j B_ij) (beta cancels), and since it sums to 1,
// mean_i(A_ij p_ij) = (s_j S_j + t_j) / R with S_j = sum_i p_ij B_ij. The softmax's max is known
// without a pass: lambda s_j (s_j >= 0 ? max_i B_ij : min_i B_ij), so every exponential is <= 1
// and sum_e >= 1 (no infinities or NaNs, as -ffast-math requires).
//
// Leaves in `pair`, per channel: logit_scale = lambda s_j, sum_e = sum_i e_ij with
// e_ij = exp(lambda s_j B_ij - offset_j), mean = S_j, pooled = P_j, and with kKeepExps the e_ij
// in exps (R, D); then norm = max(|P|, eps) and score = <P, q> / norm.
template <typename scalar_t, bool kKeepExps>
void score_t2i_pair(const T2IInputs<scalar_t>& in, int64_t m, int64_t c, T2IPair<scalar_t>& pair) {
  const int64_t R = in.R, D = in.D;
  const scalar_t* b = in.B + m * R * D;
  const scalar_t* bmax = in.Bmax + m * D;
  const scalar_t* bmin = in.Bmin + m * D;
  const scalar_t* s = in.S + c * D;
  const scalar_t* t = in.T + c * D;
  const scalar_t* q = in.Q + c * D;
  scalar_t* logit_scale = pair.logit_scale.data();
  scalar_t* offset = pair.offset.data();
  scalar_t* sum_e = pair.sum_e.data();
  scalar_t* mean = pair.mean.data();
  scalar_t* pooled = pair.pooled.data();
#pragma omp simd
  for (int64_t j = 0; j < D; ++j) {
    logit_scale[j] = in.lambda * s[j];
    offset[j] = logit_scale[j] * (s[j] >= scalar_t(0) ? bmax[j] : bmin[j]);
    sum_e[j] = 0;
    mean[j] = 0;
  }
  for (int64_t i = 0; i < R; ++i) {
    const scalar_t* bi = b + i * D;
    scalar_t* ei = kKeepExps ? pair.exps.data() + i * D : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      const scalar_t e = softmax_exp(logit_scale[j] * bi[j] - offset[j]);
      sum_e[j] += e;
      mean[j] += e * bi[j];
      if constexpr (kKeepExps) ei[j] = e;
    }
  }
  const scalar_t inv_R = scalar_t(1) / static_cast<scalar_t>(R);
  scalar_t dot = 0, norm2 = 0;
#pragma omp simd reduction(+ : dot, norm2)
  for (int64_t j = 0; j < D; ++j) {
    mean[j] /= sum_e[j];
    pooled[j] = (s[j] * mean[j] + t[j]) * inv_R;
    dot += pooled[j] * q[j];
    norm2 += pooled[j] * pooled[j];
  }
  pair.norm = std::max(std::sqrt(norm2), kNormEps<scalar_t>);
  pair.score = dot / pair.norm;
}

// Gradients of a loss L through the T2I scores, given grad = dL/dscores (M, C). Per pair, with
// g = dL/dscore and the quantities of score_t2i_pair:
//   u_j = dL/dP_j = g (q_j - score P_j / |P|) / |P|      (|P| is a constant where clamped to eps)
//   dL/dt_j = u_j / R,   dL/dq_j = g P_j / |P|,   dL/ds_j = u_j (S_j + lambda s_j V_j) / R
//   dL/dB_ij = u_j s_j / R * p_ij (1 + lambda s_j (B_ij - S_j))
// with V_j = sum_i p_ij (B_ij - S_j)^2, summed from deviations rather than as E[B^2] - S^2, which
// cancels badly in float when the fovea is sharp. grad_regions (M, R, D) is written per image,
// so threads never share a row; the per-caption gradients gather every image, so each thread
// adds into its own slice per_thread[thread] = (grad_scale, grad_shift, grad_query) (3, C, D).
template <typename scalar_t>
void t2i_backward(const T2IInputs<scalar_t>& in, const scalar_t* grad, scalar_t* grad_regions,
                  scalar_t* per_thread) {
  const int64_t R = in.R, D = in.D, C = in.C;
  const scalar_t inv_R = scalar_t(1) / static_cast<scalar_t>(R);
  at::parallel_for(0, in.M, 1, [&](int64_t m0, int64_t m1) {
    T2IPair<scalar_t> pair(R, D, /*keep_exps=*/true);
    std::vector<scalar_t> grad_pooled_buf(D), weight_buf(D), spread_buf(D);
    scalar_t* grad_pooled = grad_pooled_buf.data();
    scalar_t* weight = weight_buf.data();
    scalar_t* spread = spread_buf.data();
    scalar_t* acc = per_thread + at::get_thread_num() * 3 * C * D;
    for (int64_t m = m0; m < m1; ++m) {
      const scalar_t* b = in.B + m * R * D;
      scalar_t* grad_b = grad_regions + m * R * D;
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t g = grad[m * C + c];
        if (g == scalar_t(0)) continue;  // hinge losses leave many pairs without gradient
        score_t2i_pair<scalar_t, true>(in, m, c, pair);
        const scalar_t* s = in.S + c * D;
        const scalar_t* q = in.Q + c * D;
        const scalar_t* logit_scale = pair.logit_scale.data();
        const scalar_t* sum_e = pair.sum_e.data();
        const scalar_t* mean = pair.mean.data();
        const scalar_t* pooled = pair.pooled.data();
        const scalar_t* exps = pair.exps.data();
        const scalar_t inv_norm = scalar_t(1) / pair.norm;
        const scalar_t along = pair.norm > kNormEps<scalar_t> ? pair.score * inv_norm : 0;
        scalar_t* grad_s = acc + c * D;
        scalar_t* grad_t = acc + (C + c) * D;
        scalar_t* grad_q = acc + (2 * C + c) * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          grad_pooled[j] = g * (q[j] - along * pooled[j]) * inv_norm;
          grad_t[j] += grad_pooled[j] * inv_R;
          grad_q[j] += g * pooled[j] * inv_norm;
          weight[j] = grad_pooled[j] * s[j] * inv_R / sum_e[j];  // p_ij = e_ij / sum_e_j
          spread[j] = 0;
        }
        for (int64_t i = 0; i < R; ++i) {
          const scalar_t* bi = b + i * D;
          const scalar_t* ei = exps + i * D;
          scalar_t* gi = grad_b + i * D;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) {
            const scalar_t deviation = bi[j] - mean[j];
            gi[j] += weight[j] * ei[j] * (scalar_t(1) + logit_scale[j] * deviation);
            spread[j] += ei[j] * deviation * deviation;
          }
        }
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          grad_s[j] += grad_pooled[j] * inv_R * (mean[j] + logit_scale[j] * spread[j] / sum_e[j]);
        }
      }
    }
  });
}

// I2T inputs: words (C, T, D) after BatchNorm whose valid tokens are the first lengths[c] of each
// row; word_max / word_min (C, D) over the valid tokens; scale = gamma + 1, shift = beta and
// query = unit image vectors: (M, D).
template <typename scalar_t>
struct I2TInputs {
  I2TInputs(const torch::Tensor& words, const torch::Tensor& lengths, const torch::Tensor& word_max,
            const torch::Tensor& word_min, const torch::Tensor& scale, const torch::Tensor& shift,
            const torch::Tensor& query_unit, double smooth)
      : C(words.size(0)), Tn(words.size(1)), D(words.size(2)), M(scale.size(0)),
        lambda(static_cast<scalar_t>(smooth)) {
    TORCH_CHECK(lengths.device().is_cpu() && lengths.scalar_type() == torch::kLong &&
                    lengths.sizes() == c10::IntArrayRef{C} && lengths.is_contiguous(),
                "adapt fused kernels: lengths must be a contiguous int64 CPU tensor of shape (", C,
                ",)");
    check(words, "words", words, {C, Tn, D});
    check(word_max, "word_max", words, {C, D});
    check(word_min, "word_min", words, {C, D});
    check(scale, "scale", words, {M, D});
    check(shift, "shift", words, {M, D});
    check(query_unit, "query_unit", words, {M, D});
    L = lengths.data_ptr<int64_t>();
    for (int64_t c = 0; c < C; ++c) {
      TORCH_CHECK(L[c] >= 1 && L[c] <= Tn, "adapt fused kernels: caption ", c, " has length ", L[c],
                  ", expected 1 to ", Tn);
    }
    W = words.data_ptr<scalar_t>();
    Wmax = word_max.data_ptr<scalar_t>();
    Wmin = word_min.data_ptr<scalar_t>();
    S = scale.data_ptr<scalar_t>();
    Sh = shift.data_ptr<scalar_t>();
    Q = query_unit.data_ptr<scalar_t>();
  }

  int64_t C, Tn, D, M;
  scalar_t lambda;
  const int64_t* L;
  const scalar_t *W, *Wmax, *Wmin, *S, *Sh, *Q;
};

// One thread's buffers for the (image, caption) pair being scored; all (D,) but exps (T, D).
template <typename scalar_t>
struct I2TPair {
  I2TPair(int64_t Tn, int64_t D)
      : exps(Tn * D), offset(D), sum_e(D), best(D), weighted(D), best_word(D), best_exp(D),
        argmax(D) {}

  std::vector<scalar_t> exps, offset, sum_e, best, weighted, best_word, best_exp;
  std::vector<int32_t> argmax;  // int32 rather than int64: the argmax loop vectorises with it
  scalar_t norm = 0, score = 0;
};

// Scores image m against caption c. For channel j, with s = scale, t = shift and W = words[c]:
// A_kj = s_j W_kj + t_j, the fovea p_kj = softmax_k(lambda A_kj) over the valid tokens, and the
// pooled P_j = max_k A_kj p_kj. The softmax's max is known from the word extremes, so every
// exponential is <= 1 and sum_e >= 1.
//
// Leaves in `pair`: exps e_kj (T, D) for the valid tokens, sum_e, best = P; with kBackward also
// argmax = the k of each channel's max, best_word / best_exp = W and e at it, and
// weighted = sum_k e_kj W_kj; norm = max(|P|, eps) and
// score = <P, q> / norm.
template <typename scalar_t, bool kBackward>
void score_i2t_pair(const I2TInputs<scalar_t>& in, int64_t m, int64_t c, I2TPair<scalar_t>& pair) {
  const int64_t D = in.D, len = in.L[c];
  const scalar_t* w = in.W + c * in.Tn * D;
  const scalar_t* wmax = in.Wmax + c * D;
  const scalar_t* wmin = in.Wmin + c * D;
  const scalar_t* s = in.S + m * D;
  const scalar_t* sh = in.Sh + m * D;
  const scalar_t* q = in.Q + m * D;
  const scalar_t lambda = in.lambda;
  scalar_t* offset = pair.offset.data();
  scalar_t* sum_e = pair.sum_e.data();
  scalar_t* best = pair.best.data();
  scalar_t* weighted = pair.weighted.data();
  scalar_t* best_word = pair.best_word.data();
  scalar_t* best_exp = pair.best_exp.data();
  int32_t* argmax = pair.argmax.data();
#pragma omp simd
  for (int64_t j = 0; j < D; ++j) {
    offset[j] = lambda * (s[j] * (s[j] >= scalar_t(0) ? wmax[j] : wmin[j]) + sh[j]);
    sum_e[j] = 0;
    best[j] = std::numeric_limits<scalar_t>::lowest();  // finite: built with -ffast-math
    if constexpr (kBackward) {
      weighted[j] = 0;
      best_word[j] = best_exp[j] = 0;
      argmax[j] = 0;
    }
  }
  for (int64_t t = 0; t < len; ++t) {
    const scalar_t* wt = w + t * D;
    scalar_t* et = pair.exps.data() + t * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) {
      et[j] = softmax_exp(lambda * (s[j] * wt[j] + sh[j]) - offset[j]);
      sum_e[j] += et[j];
      if constexpr (kBackward) weighted[j] += et[j] * wt[j];
    }
  }
  for (int64_t t = 0; t < len; ++t) {
    const scalar_t* wt = w + t * D;
    const scalar_t* et = pair.exps.data() + t * D;
    if constexpr (kBackward) {
      // The first maximal token of each channel, as blends (no branch), so that it vectorises.
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        const scalar_t foveated = (s[j] * wt[j] + sh[j]) * et[j] / sum_e[j];
        const bool better = foveated > best[j];
        best[j] = better ? foveated : best[j];
        argmax[j] = better ? static_cast<int32_t>(t) : argmax[j];
        best_word[j] = better ? wt[j] : best_word[j];
        best_exp[j] = better ? et[j] : best_exp[j];
      }
    } else {
      // No omp simd: GCC 12 vectorises this max better unforced (measured 1.7x faster).
      for (int64_t j = 0; j < D; ++j) {
        best[j] = std::max(best[j], (s[j] * wt[j] + sh[j]) * et[j] / sum_e[j]);
      }
    }
  }
  scalar_t dot = 0, norm2 = 0;
#pragma omp simd reduction(+ : dot, norm2)
  for (int64_t j = 0; j < D; ++j) {
    dot += best[j] * q[j];
    norm2 += best[j] * best[j];
  }
  pair.norm = std::max(std::sqrt(norm2), kNormEps<scalar_t>);
  pair.score = dot / pair.norm;
}

// Gradients of a loss L through the I2T scores, given grad = dL/dscores (M, C). Per pair, with
// g = dL/dscore, u_j = dL/dP_j as in t2i_backward, k*_j the token of channel j's max,
// a_j = A_{k*_j j} and v_j = u_j p_{k*_j j}:
//   dL/dA_kj = v_j ([k = k*_j] (1 + lambda a_j) - lambda a_j p_kj)   (sums to v_j over k)
//   dL/dt_j = v_j,   dL/ds_j = v_j ((1 + lambda a_j) W_{k*_j j} - lambda a_j sum_k p_kj W_kj)
//   dL/dW_kj = s_j dL/dA_kj,   dL/dq_j = g P_j / |P|
// grad_words (C, T, D) is written per caption, so threads never share a row (padding gets 0);
// the per-image gradients gather every caption, so each thread adds into its own slice
// per_thread[thread] = (grad_scale, grad_shift, grad_query) (3, M, D).
template <typename scalar_t>
void i2t_backward(const I2TInputs<scalar_t>& in, const scalar_t* grad, scalar_t* grad_words,
                  scalar_t* per_thread) {
  const int64_t D = in.D, M = in.M, C = in.C;
  const scalar_t lambda = in.lambda;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    I2TPair<scalar_t> pair(in.Tn, D);
    std::vector<scalar_t> coefficient_buf(D), peak_grad_buf(D);
    scalar_t* coefficient = coefficient_buf.data();
    scalar_t* peak_grad = peak_grad_buf.data();
    scalar_t* acc = per_thread + at::get_thread_num() * 3 * M * D;
    for (int64_t c = c0; c < c1; ++c) {
      scalar_t* grad_w = grad_words + c * in.Tn * D;
      const int64_t len = in.L[c];
      for (int64_t m = 0; m < M; ++m) {
        const scalar_t g = grad[m * C + c];
        if (g == scalar_t(0)) continue;  // hinge losses leave many pairs without gradient
        score_i2t_pair<scalar_t, true>(in, m, c, pair);
        const scalar_t* s = in.S + m * D;
        const scalar_t* sh = in.Sh + m * D;
        const scalar_t* q = in.Q + m * D;
        const scalar_t* exps = pair.exps.data();
        const scalar_t* sum_e = pair.sum_e.data();
        const scalar_t* pooled = pair.best.data();
        const scalar_t* weighted = pair.weighted.data();
        const scalar_t* best_word = pair.best_word.data();
        const scalar_t* best_exp = pair.best_exp.data();
        const int32_t* argmax = pair.argmax.data();
        const scalar_t inv_norm = scalar_t(1) / pair.norm;
        const scalar_t along = pair.norm > kNormEps<scalar_t> ? pair.score * inv_norm : 0;
        scalar_t* grad_s = acc + m * D;
        scalar_t* grad_t = acc + (M + m) * D;
        scalar_t* grad_q = acc + (2 * M + m) * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          const scalar_t adapted = s[j] * best_word[j] + sh[j];
          const scalar_t inv_sum = scalar_t(1) / sum_e[j];
          const scalar_t v = g * (q[j] - along * pooled[j]) * inv_norm * best_exp[j] * inv_sum;
          const scalar_t peak = scalar_t(1) + lambda * adapted;
          grad_t[j] += v;
          grad_s[j] += v * (peak * best_word[j] - lambda * adapted * weighted[j] * inv_sum);
          grad_q[j] += g * pooled[j] * inv_norm;
          peak_grad[j] = s[j] * v * peak;                             // the max token's own term
          coefficient[j] = -s[j] * v * lambda * adapted * inv_sum;  // times e_kj: the p_kj term
        }
        // Per token, a blend adds the max token's term: no scatter, so the loop vectorises.
        for (int64_t t = 0; t < len; ++t) {
          const scalar_t* et = exps + t * D;
          scalar_t* gt = grad_w + t * D;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) {
            gt[j] += coefficient[j] * et[j] + (argmax[j] == t ? peak_grad[j] : scalar_t(0));
          }
        }
      }
    }
  });
}

// Scores every pair into `scores` (M, C) with `score_pair(m, c, pair)`, which leaves the score in
// pair.score. Threads split the images (T2I) or the captions (I2T): the locals of one then stay
// in cache while every global vector of the other side adapts them.
template <typename scalar_t, typename Pair, typename ScorePair>
void score_all_pairs(int64_t M, int64_t C, bool split_images, const Pair& buffers,
                     ScorePair score_pair, scalar_t* scores) {
  at::parallel_for(0, split_images ? M : C, 1, [&](int64_t begin, int64_t end) {
    Pair pair = buffers;
    for (int64_t outer = begin; outer < end; ++outer) {
      for (int64_t inner = 0; inner < (split_images ? C : M); ++inner) {
        const int64_t m = split_images ? outer : inner, c = split_images ? inner : outer;
        score_pair(m, c, pair);
        scores[m * C + c] = pair.score;
      }
    }
  });
}

// The backward entry points' frame: `run(grad_locals, per_thread)` fills zeroed gradients shaped
// like `locals` and one (3, n, D) slice per thread of the gradients of scale, shift and
// query_unit (n, D); returns (grad_locals, grad_scale, grad_shift, grad_query_unit).
template <typename Run>
std::vector<torch::Tensor> gradients(const torch::Tensor& locals, const torch::Tensor& scale,
                                     Run run) {
  auto grad_locals = torch::zeros_like(locals);
  auto per_thread = torch::zeros({at::get_num_threads(), 3, scale.size(0), scale.size(1)},
                                 locals.options());
  run(grad_locals, per_thread);
  const auto grads = per_thread.sum(0);
  return {grad_locals, grads[0], grads[1], grads[2]};
}

// Entry points: check the inputs, dispatch on float / double. T2I inputs as T2IInputs.
torch::Tensor t2i_scores(torch::Tensor regions, torch::Tensor region_max, torch::Tensor region_min,
                         torch::Tensor scale, torch::Tensor shift, torch::Tensor query_unit,
                         double smooth) {
  auto scores = torch::empty({regions.size(0), scale.size(0)}, regions.options());
  AT_DISPATCH_FLOATING_TYPES(regions.scalar_type(), "t2i_scores", [&] {
    const T2IInputs<scalar_t> in(regions, region_max, region_min, scale, shift, query_unit, smooth);
    score_all_pairs(in.M, in.C, /*split_images=*/true, T2IPair<scalar_t>(in.R, in.D, false),
                    [&](int64_t m, int64_t c, T2IPair<scalar_t>& pair) {
                      score_t2i_pair<scalar_t, false>(in, m, c, pair);
                    },
                    scores.data_ptr<scalar_t>());
  });
  return scores;
}

// Returns (grad_regions, grad_scale, grad_shift, grad_query_unit), shaped like those inputs;
// region_max / region_min only stabilise the softmax, so they get no gradient.
std::vector<torch::Tensor> t2i_scores_backward(torch::Tensor regions, torch::Tensor region_max,
                                               torch::Tensor region_min, torch::Tensor scale,
                                               torch::Tensor shift, torch::Tensor query_unit,
                                               double smooth, torch::Tensor grad_scores) {
  check(grad_scores, "grad_scores", regions, {regions.size(0), scale.size(0)});
  return gradients(regions, scale, [&](torch::Tensor& grad_regions, torch::Tensor& per_thread) {
    AT_DISPATCH_FLOATING_TYPES(regions.scalar_type(), "t2i_scores_backward", [&] {
      t2i_backward(T2IInputs<scalar_t>(regions, region_max, region_min, scale, shift, query_unit,
                                       smooth),
                   grad_scores.data_ptr<scalar_t>(), grad_regions.data_ptr<scalar_t>(),
                   per_thread.data_ptr<scalar_t>());
    });
  });
}

// I2T inputs as I2TInputs.
torch::Tensor i2t_scores(torch::Tensor words, torch::Tensor lengths, torch::Tensor word_max,
                         torch::Tensor word_min, torch::Tensor scale, torch::Tensor shift,
                         torch::Tensor query_unit, double smooth) {
  auto scores = torch::empty({scale.size(0), words.size(0)}, words.options());
  AT_DISPATCH_FLOATING_TYPES(words.scalar_type(), "i2t_scores", [&] {
    const I2TInputs<scalar_t> in(words, lengths, word_max, word_min, scale, shift, query_unit,
                                 smooth);
    score_all_pairs(in.M, in.C, /*split_images=*/false, I2TPair<scalar_t>(in.Tn, in.D),
                    [&](int64_t m, int64_t c, I2TPair<scalar_t>& pair) {
                      score_i2t_pair<scalar_t, false>(in, m, c, pair);
                    },
                    scores.data_ptr<scalar_t>());
  });
  return scores;
}

// Returns (grad_words, grad_scale, grad_shift, grad_query_unit), shaped like those inputs;
// word_max / word_min only stabilise the softmax, so they get no gradient.
std::vector<torch::Tensor> i2t_scores_backward(torch::Tensor words, torch::Tensor lengths,
                                               torch::Tensor word_max, torch::Tensor word_min,
                                               torch::Tensor scale, torch::Tensor shift,
                                               torch::Tensor query_unit, double smooth,
                                               torch::Tensor grad_scores) {
  check(grad_scores, "grad_scores", words, {scale.size(0), words.size(0)});
  return gradients(words, scale, [&](torch::Tensor& grad_words, torch::Tensor& per_thread) {
    AT_DISPATCH_FLOATING_TYPES(words.scalar_type(), "i2t_scores_backward", [&] {
      i2t_backward(I2TInputs<scalar_t>(words, lengths, word_max, word_min, scale, shift,
                                       query_unit, smooth),
                   grad_scores.data_ptr<scalar_t>(), grad_words.data_ptr<scalar_t>(),
                   per_thread.data_ptr<scalar_t>());
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("t2i_scores", &t2i_scores, "Fused ADAPT-T2I scores (M, C)");
  m.def("t2i_scores_backward", &t2i_scores_backward,
        "Gradients of the fused ADAPT-T2I scores: (regions, scale, shift, query_unit)");
  m.def("i2t_scores", &i2t_scores, "Fused ADAPT-I2T scores (M, C)");
  m.def("i2t_scores_backward", &i2t_scores_backward,
        "Gradients of the fused ADAPT-I2T scores: (words, scale, shift, query_unit)");
}

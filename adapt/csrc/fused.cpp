// Fused ADAPT scoring on CPU: FiLM + fovea + pooling + cosine per (image, caption) pair, in one
// pass over the locals, without materialising the adapted tensors. Same math as
// adapt/similarity.py (which documents it); built on first use by adapt/fused.py.
//
// Layout: locals are row-major (n_locals, d) so the inner loop runs over the d channels
// contiguously and vectorises (expf through libmvec with -ffast-math). Work is split over images,
// and each image's locals stay in L2 while every caption is scored against them.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

// T2I: regions (M, R, D) after BatchNorm; region_max / region_min (M, D) over R;
// scale = gamma + 1, shift = beta, query_unit: (C, D). Returns scores (M, C).
//
// For channel j: M_ij = softmax_i(lambda * scale_j * B_ij) (beta cancels), and since the mask sums
// to 1, mean_i(A_ij M_ij) = (scale_j * sum_i B_ij M_ij + beta_j) / R. The softmax's max is known
// without a pass: lambda * scale_j * (scale_j >= 0 ? max_i B_ij : min_i B_ij).
torch::Tensor t2i_scores(torch::Tensor regions, torch::Tensor region_max, torch::Tensor region_min,
                         torch::Tensor scale, torch::Tensor shift, torch::Tensor query_unit,
                         double smooth) {
  const int64_t M = regions.size(0), R = regions.size(1), D = regions.size(2), C = scale.size(0);
  auto scores = torch::empty({M, C}, regions.options());
  const float* B = regions.data_ptr<float>();
  const float* Bmax = region_max.data_ptr<float>();
  const float* Bmin = region_min.data_ptr<float>();
  const float* S = scale.data_ptr<float>();
  const float* T = shift.data_ptr<float>();
  const float* Q = query_unit.data_ptr<float>();
  float* out = scores.data_ptr<float>();
  const float lambda = static_cast<float>(smooth);

  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> sum_e(D), sum_eb(D), logit_scale(D), offset(D);
    for (int64_t m = m0; m < m1; ++m) {
      const float* b = B + m * R * D;
      for (int64_t c = 0; c < C; ++c) {
        const float* s = S + c * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          logit_scale[j] = lambda * s[j];
          offset[j] = logit_scale[j] * (s[j] >= 0.f ? Bmax[m * D + j] : Bmin[m * D + j]);
          sum_e[j] = 0.f;
          sum_eb[j] = 0.f;
        }
        for (int64_t i = 0; i < R; ++i) {
          const float* bi = b + i * D;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) {
            const float e = std::exp(logit_scale[j] * bi[j] - offset[j]);
            sum_e[j] += e;
            sum_eb[j] += e * bi[j];
          }
        }
        const float* t = T + c * D;
        const float* q = Q + c * D;
        float dot = 0.f, norm = 0.f;
#pragma omp simd reduction(+ : dot, norm)
        for (int64_t j = 0; j < D; ++j) {
          const float pooled = (s[j] * sum_eb[j] / sum_e[j] + t[j]) / static_cast<float>(R);
          dot += pooled * q[j];
          norm += pooled * pooled;
        }
        out[m * C + c] = dot / std::max(std::sqrt(norm), 1e-12f);
      }
    }
  });
  return scores;
}

// I2T: words (C, T, D) after BatchNorm, lengths (C,) of valid tokens (a prefix of each row);
// word_max / word_min (C, D) over the valid tokens; scale, shift, query_unit: (M, D) from images.
// Returns scores (M, C): cos(max_t(A_t * M_t), q) with A = scale * W + shift.
torch::Tensor i2t_scores(torch::Tensor words, torch::Tensor lengths, torch::Tensor word_max,
                         torch::Tensor word_min, torch::Tensor scale, torch::Tensor shift,
                         torch::Tensor query_unit, double smooth) {
  const int64_t C = words.size(0), Tn = words.size(1), D = words.size(2), M = scale.size(0);
  auto scores = torch::empty({M, C}, words.options());
  const float* W = words.data_ptr<float>();
  const int64_t* L = lengths.data_ptr<int64_t>();
  const float* Wmax = word_max.data_ptr<float>();
  const float* Wmin = word_min.data_ptr<float>();
  const float* S = scale.data_ptr<float>();
  const float* Sh = shift.data_ptr<float>();
  const float* Q = query_unit.data_ptr<float>();
  float* out = scores.data_ptr<float>();
  const float lambda = static_cast<float>(smooth);

  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> e(Tn * D), sum_e(D), best(D), offset(D);
    for (int64_t c = c0; c < c1; ++c) {
      const float* w = W + c * Tn * D;
      const int64_t len = L[c];
      for (int64_t m = 0; m < M; ++m) {
        const float* s = S + m * D;
        const float* sh = Sh + m * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) {
          // max_t of lambda * (s * w + sh), known from the word extremes.
          offset[j] = lambda * (s[j] * (s[j] >= 0.f ? Wmax[c * D + j] : Wmin[c * D + j]) + sh[j]);
          sum_e[j] = 0.f;
          best[j] = -std::numeric_limits<float>::max();  // finite: built with -ffast-math
        }
        for (int64_t t = 0; t < len; ++t) {
          const float* wt = w + t * D;
          float* et = e.data() + t * D;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) {
            et[j] = std::exp(lambda * (s[j] * wt[j] + sh[j]) - offset[j]);
            sum_e[j] += et[j];
          }
        }
        for (int64_t t = 0; t < len; ++t) {
          const float* wt = w + t * D;
          const float* et = e.data() + t * D;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) {
            best[j] = std::max(best[j], (s[j] * wt[j] + sh[j]) * et[j] / sum_e[j]);
          }
        }
        const float* q = Q + m * D;
        float dot = 0.f, norm = 0.f;
#pragma omp simd reduction(+ : dot, norm)
        for (int64_t j = 0; j < D; ++j) {
          dot += best[j] * q[j];
          norm += best[j] * best[j];
        }
        out[m * C + c] = dot / std::max(std::sqrt(norm), 1e-12f);
      }
    }
  });
  return scores;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("t2i_scores", &t2i_scores, "Fused ADAPT-T2I scores (M, C)");
  m.def("i2t_scores", &i2t_scores, "Fused ADAPT-I2T scores (M, C)");
}

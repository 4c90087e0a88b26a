// SwAV's swapped prediction on the CPU, fused: one pass over every crop's scores gives the loss AND its
// gradient (the loss is terminal, so the gradient is computed in the forward and only scaled by the upstream
// gradient in the backward). fp32 statistics (fp64 for double inputs).
//
// Crops v = 0..V-1 with scores P_v (B x K), the first S of them with codes Q_s (B x K, rows on the simplex:
// SwAV's Sinkhorn output, no gradient). SwAV (main_swav.py; lightly's SwaVLoss):
//   L = 1/S sum_s 1/(V-1) sum_{v != s} -1/B sum_b sum_k Q_sbk log softmax(P_vb / T)_k.
// Grouped by crop, with the targets T_vb = sum_{s != v} Q_sb (every code except the crop's own):
//   L = c sum_v sum_b [ n_vb lse_vb - <T_vb, P_vb> / T ],   c = 1 / (S (V-1) B),
//     computed shifted as n_vb log sum_k exp(x_k - m) - <T_vb, x - m> (x = P_vb / T, m = max_k x_k): n lse and
//     <T, x> are each ~|x| and cancel (at |x| ~ 1e30 to 0 instead of log 2 for tied scores);
//   lse_vb = logsumexp_k P_vbk / T,  n_vb = sum_k T_vbk (= S - [v < S] for exact simplex rows).
// Gradient (softmax cross-entropy with soft targets):
//   dL/dP_vbk = c / T (n_vb softmax(P_vb / T)_k - T_vbk).
// The targets of the first S crops are summed from the other codes (never total - own): a non-finite code row
// (a queue entry +Inf / NaN) then spoils only the crops that predict it, as in lightly / SwAV, and no rounding
// of the total remains where T_v is small.
// Schedule: rows b split over the threads; per row, the S code rows are summed once (sum_s Q_sb) and each crop's
// row is read once: max, the exponentials (kept in a row buffer) and <T, P>, then the gradient row from the
// kept exponentials. Memory traffic: the scores and codes read once, the gradients written once. Each row's
// loss term is kept and the terms are summed in row order: results do not depend on the number of threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec_math.h"

namespace ssl_fast {
namespace {

constexpr int64_t kGrainElems = 1 << 15;  // elements per task at least (below: the calling thread)

template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> swav_impl(const std::vector<at::Tensor>& scores, const std::vector<at::Tensor>& codes,
                                  double inv_temp, bool compute_grad) {
  const int64_t V = (int64_t)scores.size(), S = (int64_t)codes.size();
  const int64_t B = scores[0].size(0), K = scores[0].size(1);
  const auto acc_opts = scores[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  std::vector<const scalar_t*> P(V);
  std::vector<int64_t> ldp(V);
  for (int64_t v = 0; v < V; ++v) {
    P[v] = scores[v].data_ptr<scalar_t>();
    ldp[v] = scores[v].stride(0);
  }
  std::vector<const acc_t*> Q(S);
  std::vector<int64_t> ldq(S);
  for (int64_t s = 0; s < S; ++s) {
    Q[s] = codes[s].data_ptr<acc_t>();
    ldq[s] = codes[s].stride(0);
  }
  std::vector<at::Tensor> grads;
  std::vector<scalar_t*> G(V, nullptr);
  if (compute_grad) {
    for (int64_t v = 0; v < V; ++v) {
      grads.push_back(at::empty({B, K}, scores[v].options()));
      G[v] = grads.back().data_ptr<scalar_t>();
    }
  }
  const acc_t it = static_cast<acc_t>(inv_temp);
  const double c = 1.0 / ((double)S * (double)(V - 1) * (double)B);
  const acc_t gscale = static_cast<acc_t>(c * inv_temp);
  std::vector<double> row_loss(B);

  at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, V * K)), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> total_buf(K), e_buf(K), tgt_buf(K);
    acc_t* total = total_buf.data();
    acc_t* e = e_buf.data();
    std::vector<double> qsum(S);
    for (int64_t b = b0; b < b1; ++b) {
      // sum of the S code rows, and each row's mass
      std::fill(total, total + K, acc_t(0));
      for (int64_t s = 0; s < S; ++s) {
        const acc_t* q = Q[s] + b * ldq[s];
        acc_t m = 0;
#pragma omp simd reduction(+ : m)
        for (int64_t k = 0; k < K; ++k) {
          total[k] += q[k];
          m += q[k];
        }
        qsum[s] = m;
      }
      double loss_b = 0;
      for (int64_t v = 0; v < V; ++v) {
        const scalar_t* p = P[v] + b * ldp[v];
        // the targets: every code row but the crop's own
        const acc_t* t = total;
        double n = 0;
        for (int64_t s = 0; s < S; ++s) n += s != v ? qsum[s] : 0.0;
        if (S == 1 && v == 0) {  // the only code is the crop's own: no target, no term (not 0 * log p)
          if (compute_grad) std::fill(G[v] + b * K, G[v] + (b + 1) * K, scalar_t(0));
          continue;
        }
        if (v < S) {
          std::fill(tgt_buf.begin(), tgt_buf.end(), acc_t(0));
          for (int64_t s = 0; s < S; ++s) {
            if (s == v) continue;
            const acc_t* q = Q[s] + b * ldq[s];
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) tgt_buf[k] += q[k];
          }
          t = tgt_buf.data();
        }
        // x = P_vb / T is stored once and read back: recomputed, the compiler may contract x - mx into
        // fma(p, 1/T, -mx), the rounding error of the product (~1e23 nats at |x| ~ 1e30: exp -> inf, loss -inf)
        acc_t mx = neg_inf<acc_t>();
#pragma omp simd reduction(max : mx)
        for (int64_t k = 0; k < K; ++k) {
          const acc_t x = static_cast<acc_t>(p[k]) * it;
          e[k] = x;
          mx = x > mx ? x : mx;
        }
        acc_t sum = 0, dot = 0;
#pragma omp simd reduction(+ : sum, dot)
        for (int64_t k = 0; k < K; ++k) {
          const acc_t x = e[k];
          const acc_t ex = vexp(x - mx);
          e[k] = ex;
          sum += ex;
          dot += t[k] * (x - mx);
        }
        loss_b += n * std::log((double)sum) - (double)dot;
        if (compute_grad) {
          scalar_t* g = G[v] + b * K;
          const acc_t a = static_cast<acc_t>((double)gscale * n / (double)sum);  // c/T * n / sum
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) g[k] = static_cast<scalar_t>(a * e[k] - gscale * t[k]);
        }
      }
      row_loss[b] = loss_b;
    }
  });
  double total_loss = 0;
  for (double r : row_loss) total_loss += r;
  std::vector<at::Tensor> out;
  out.push_back(at::full({}, total_loss * c, acc_opts));
  for (auto& g : grads) out.push_back(g);
  return out;
}

// scores: V >= 2 tensors (B, K), one dtype, unit stride along K; codes: 1 <= S <= V tensors (B, K) in the
// accumulation dtype (float32; float64 for double scores), the codes of scores[0..S-1]. -> [loss (0-dim,
// accumulation dtype), and with compute_grad dL/dscores_v (B, K, the scores' dtype) for every v].
std::vector<at::Tensor> swav_loss_cpp(const std::vector<at::Tensor>& scores, const std::vector<at::Tensor>& codes,
                                      double inv_temp, bool compute_grad) {
  TORCH_CHECK(scores.size() >= 2, "scores: SwAV needs at least two crops, got ", scores.size());
  TORCH_CHECK(!codes.empty() && codes.size() <= scores.size(), "codes: between 1 and ", scores.size(),
              " code crops, got ", codes.size());
  TORCH_CHECK(std::isfinite(inv_temp) && inv_temp > 0, "temperature must be finite and > 0");
  const auto& s0 = scores[0];
  const auto st = s0.scalar_type();
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  for (size_t v = 0; v < scores.size(); ++v) {
    const auto& s = scores[v];
    TORCH_CHECK(s.device().is_cpu() && s.dim() == 2, "scores[", v, "] must be a 2-D CPU tensor");
    TORCH_CHECK(s.sizes() == s0.sizes(), "scores[", v, "] has shape ", s.sizes(), ", scores[0] ", s0.sizes());
    TORCH_CHECK(s.scalar_type() == st, "scores[", v, "] is ", s.scalar_type(), ", scores[0] ", st);
    TORCH_CHECK(s.size(1) == 1 || s.stride(1) == 1, "scores[", v, "] must have unit stride along K");
  }
  TORCH_CHECK(s0.size(0) >= 1 && s0.size(1) >= 1, "scores must not be empty");
  for (size_t i = 0; i < codes.size(); ++i) {
    const auto& q = codes[i];
    TORCH_CHECK(q.device().is_cpu() && q.sizes() == s0.sizes(), "codes[", i, "] must be a CPU tensor of shape ",
                s0.sizes());
    TORCH_CHECK(q.scalar_type() == acc, "codes[", i, "] must be ", acc, ", got ", q.scalar_type());
    TORCH_CHECK(q.size(1) == 1 || q.stride(1) == 1, "codes[", i, "] must have unit stride along K");
  }
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "swav_loss_cpp", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = swav_impl<scalar_t, acc_t>(scores, codes, inv_temp, compute_grad);
  });
  return out;
}

}  // namespace
}  // namespace ssl_fast

TORCH_LIBRARY_FRAGMENT(ssl_fast, m) {
  m.def("swav_loss_cpp(Tensor[] scores, Tensor[] codes, float inv_temp, bool compute_grad) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ssl_fast, CPU, m) {
  m.impl("swav_loss_cpp", &ssl_fast::swav_loss_cpp);
}

// SwAV's swapped prediction on the CPU, fused: one pass over every crop's scores gives the loss AND its
// gradient (the loss is terminal, so the gradient is computed in the forward and only scaled by the upstream
// gradient in the backward). fp32 statistics (fp64 for double inputs).
//
// Crops v = 0..V-1 with scores P_v (B x K), the first S of them with codes Q_s (B x K, rows on the simplex:
// SwAV's Sinkhorn output, no gradient). The codes are not read from memory: the op takes the Sinkhorn sweeps'
// prototype scalings u_s (K, see sinkhorn.cpp) and forms each code row where it is used,
//   Q_sb = softmax_k(P_sb / eps + u_s)       (sinkhorn.cpp's output pass, the same loops: the same values),
// so the B x K codes are never stored (SwAV's loss then needs no memory beyond its gradients).
// SwAV (main_swav.py; lightly's SwaVLoss):
//   L = 1/S sum_s 1/(V-1) sum_{v != s} -1/B sum_b sum_k Q_sbk log softmax(P_vb / T)_k.
// Grouped by crop, with the targets T_vb = sum_{s != v} Q_sb (every code except the crop's own):
//   L = c sum_v sum_b [ n_vb lse_vb - <T_vb, P_vb> / T ],   c = 1 / (S (V-1) B),
//   lse_vb = logsumexp_k P_vbk / T,  n_vb = sum_k T_vbk (= S - [v < S] for exact simplex rows).
// Gradient (softmax cross-entropy with soft targets):
//   dL/dP_vbk = c / T (n_vb softmax(P_vb / T)_k - T_vbk).
// Each row's term is computed shifted as n_vb log sum_k exp(x_k - m) - <T_vb, x - m> (x = P_vb / T, m = max_k x_k):
// n lse and <T, x> are each ~|x| and cancel (at |x| ~ 1e30 to 0 instead of log 2 for tied scores). x is stored
// once and read back: recomputed, the compiler may contract x - m into fma(p, 1/T, -m), keeping the product's
// rounding error (~1e23 nats at |x| ~ 1e30: exp -> inf, loss -inf).
// The targets of the first S crops are summed from the other codes (never total - own): a non-finite code row
// (a queue entry +Inf / NaN) then spoils only the crops that predict it, as in lightly / SwAV, and no rounding
// of the total remains where T_v is small. With one code crop, that crop has no target and no term.
// Schedule: rows b split over the threads; per row, the S code rows are formed and summed once (sum_s Q_sb) and
// each crop's row is read once more: max, the exponentials (kept in a row buffer) and <T, P>, then the gradient
// row from the kept exponentials. Memory traffic: the scores read once (the S code crops' rows twice, from
// cache), the gradients written once. Each row's
// loss term is kept and the terms are summed in row order: results do not depend on the number of threads.
// fp16 scores get fp32 gradients (the python layer scales them by the upstream gradient, then rounds to fp16): the
// gradient of a unit upstream gradient can pass fp16's 65504 where the scaled one does not (c / T = 2.5e5 at
// T = 1e-6 for one crop pair), and eager torch, which scales first, returns it finite.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "scratch.h"
#include "vec_math.h"

namespace ssl_fast {
namespace {

constexpr int64_t kGrainElems = 1 << 15;  // elements per task at least (below: the calling thread)
// gradients from this size on are mapped by empty_scratch_many (scratch.h): freed together at the next step, they
// would otherwise come back as fresh 4 KiB pages
constexpr size_t kScratchBytes = size_t(4) << 20;

// The row loops, each a function of restrict-qualified rows so that the compiler vectorizes it (written
// inline in the parallel body, gcc kept them scalar: it could not rule out aliasing between the rows).

// x[k] = acc(p[k]) * it; returns max_k x[k]
template <typename scalar_t, typename acc_t>
inline acc_t scale_and_max(const scalar_t* __restrict p, int64_t K, acc_t it, acc_t* __restrict x) {
  acc_t mx = neg_inf<acc_t>();
#pragma omp simd reduction(max : mx)
  for (int64_t k = 0; k < K; ++k) {
    const acc_t v = static_cast<acc_t>(p[k]) * it;
    x[k] = v;
    mx = v > mx ? v : mx;
  }
  return mx;
}

// dst[k] += src[k]; returns sum_k src[k]
template <typename acc_t>
inline acc_t add_row(const acc_t* __restrict src, int64_t K, acc_t* __restrict dst) {
  acc_t m = 0;
#pragma omp simd reduction(+ : m)
  for (int64_t k = 0; k < K; ++k) {
    dst[k] += src[k];
    m += src[k];
  }
  return m;
}

// e[k] = exp(x[k] - mx); sum = sum_k e[k]; dot = sum_k t[k] (x[k] - mx)
template <typename acc_t>
inline void exp_sum_dot(const acc_t* __restrict x, const acc_t* __restrict t, int64_t K, acc_t mx,
                        acc_t* __restrict e, acc_t& sum, acc_t& dot) {
  acc_t s = 0, d = 0;
#pragma omp simd reduction(+ : s, d)
  for (int64_t k = 0; k < K; ++k) {
    const acc_t xs = x[k] - mx;
    const acc_t ex = vexp(xs);
    e[k] = ex;
    s += ex;
    d += t[k] * xs;
  }
  sum = s;
  dot = d;
}

// g[k] = a e[k] - c t[k]
template <typename scalar_t, typename acc_t>
inline void grad_row(const acc_t* __restrict e, const acc_t* __restrict t, int64_t K, acc_t a, acc_t c,
                     scalar_t* __restrict g) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) g[k] = static_cast<scalar_t>(a * e[k] - c * t[k]);
}

template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> swav_impl(const std::vector<at::Tensor>& scores, const std::vector<at::Tensor>& u,
                                  double inv_eps, double inv_temp, bool compute_grad) {
  const int64_t V = (int64_t)scores.size(), S = (int64_t)u.size();
  const int64_t B = scores[0].size(0), K = scores[0].size(1);
  const auto acc_opts = scores[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  std::vector<const scalar_t*> P(V);
  std::vector<int64_t> ldp(V);
  for (int64_t v = 0; v < V; ++v) {
    P[v] = scores[v].data_ptr<scalar_t>();
    ldp[v] = scores[v].stride(0);
  }
  std::vector<const acc_t*> U(S);
  for (int64_t s = 0; s < S; ++s) U[s] = u[s].data_ptr<acc_t>();
  const acc_t ie = static_cast<acc_t>(inv_eps);
  using grad_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, acc_t, scalar_t>;
  const auto grad_opts = scores[0].options().dtype(c10::CppTypeToScalarType<grad_t>::value);
  std::vector<at::Tensor> grads;
  std::vector<grad_t*> G(V, nullptr);
  if (compute_grad) {
    // the V gradients in one mapping, each its own storage (a custom op's outputs must not alias each other:
    // torch.compile checks it)
    grads = empty_scratch_many(V, {B, K}, grad_opts, kScratchBytes);
    for (int64_t v = 0; v < V; ++v) G[v] = grads[v].data_ptr<grad_t>();
  }
  const acc_t it = static_cast<acc_t>(inv_temp);
  const double c = 1.0 / ((double)S * (double)(V - 1) * (double)B);
  const acc_t gscale = static_cast<acc_t>(c * inv_temp);
  ScratchArray<double> row_loss((size_t)B);
  ThreadScratch<acc_t> bufs((size_t)((4 + S) * K));

  at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, V * K)), [&](int64_t b0, int64_t b1) {
    acc_t* total = bufs.local();  // sum_s Q_sb
    acc_t* target = total + K;  // T_vb for v < S (S > 2): the sum of the other codes
    acc_t* x = target + K;      // P_vb / T
    acc_t* e = x + K;           // exp(P_vb / T - max)
    acc_t* q = e + K;           // the S code rows Q_sb
    std::vector<double> qsum(S);
    for (int64_t b = b0; b < b1; ++b) {
      // the S code rows, their sum and each row's mass
      std::fill(total, total + K, acc_t(0));
      double all = 0;
      for (int64_t s = 0; s < S; ++s) {
        code_row<scalar_t, acc_t>(P[s] + b * ldp[s], K, ie, U[s], q + s * K);
        qsum[s] = add_row<acc_t>(q + s * K, K, total);
        all += qsum[s];
      }
      double loss_b = 0;
      for (int64_t v = 0; v < V; ++v) {
        // the targets: every code row but the crop's own, summed from the others (see the header)
        const acc_t* t = total;
        double n = all;
        if (S == 1 && v == 0) {  // the only code is the crop's own: no target, no term (not 0 * log p)
          if (compute_grad) std::fill(G[v] + b * K, G[v] + (b + 1) * K, grad_t(0));
          continue;
        }
        if (v < S) {
          n = 0;
          for (int64_t s = 0; s < S; ++s) n += s != v ? qsum[s] : 0.0;
          if (S == 2) {
            t = q + (1 - v) * K;
          } else {
            std::fill(target, target + K, acc_t(0));
            for (int64_t s = 0; s < S; ++s)
              if (s != v) add_row<acc_t>(q + s * K, K, target);
            t = target;
          }
        }
        const acc_t mx = scale_and_max<scalar_t, acc_t>(P[v] + b * ldp[v], K, it, x);
        acc_t sum, dot;
        exp_sum_dot<acc_t>(x, t, K, mx, e, sum, dot);
        loss_b += n * std::log((double)sum) - (double)dot;
        if (compute_grad) {
          const acc_t a = static_cast<acc_t>((double)gscale * n / (double)sum);  // c/T * n / sum
          grad_row<grad_t, acc_t>(e, t, K, a, gscale, G[v] + b * K);
        }
      }
      row_loss[b] = loss_b;
    }
  });
  double total_loss = 0;
  for (int64_t b = 0; b < B; ++b) total_loss += row_loss[b];
  std::vector<at::Tensor> out;
  out.push_back(at::full({}, total_loss * c, acc_opts));
  for (auto& g : grads) out.push_back(g);
  return out;
}

// scores: V >= 2 tensors (B, K), one dtype, unit stride along K; u: 1 <= S <= V tensors (K) in the accumulation
// dtype (float32; float64 for double scores), the Sinkhorn scalings of scores[0..S-1] (their codes are
// softmax_k(scores[s] * inv_eps + u[s])). -> [loss (0-dim, accumulation dtype), and with compute_grad
// dL/dscores_v (B, K, the scores' dtype) for every v].
std::vector<at::Tensor> swav_loss_cpp(const std::vector<at::Tensor>& scores, const std::vector<at::Tensor>& u,
                                      double inv_eps, double inv_temp, bool compute_grad) {
  TORCH_CHECK(scores.size() >= 2, "scores: SwAV needs at least two crops, got ", scores.size());
  TORCH_CHECK(!u.empty() && u.size() <= scores.size(), "u: between 1 and ", scores.size(), " code crops, got ",
              u.size());
  TORCH_CHECK(std::isfinite(inv_temp) && inv_temp > 0, "temperature must be finite and > 0");
  TORCH_CHECK(std::isfinite(inv_eps) && inv_eps > 0, "epsilon must be finite and > 0");
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
  for (size_t i = 0; i < u.size(); ++i) {
    const auto& t = u[i];
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == s0.size(1) && t.is_contiguous(), "u[", i,
                "] must be a contiguous CPU tensor of shape (", s0.size(1), ")");
    TORCH_CHECK(t.scalar_type() == acc, "u[", i, "] must be ", acc, ", got ", t.scalar_type());
  }
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "swav_loss_cpp", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = swav_impl<scalar_t, acc_t>(scores, u, inv_eps, inv_temp, compute_grad);
  });
  return out;
}

}  // namespace
}  // namespace ssl_fast

TORCH_LIBRARY_FRAGMENT(ssl_fast, m) {
  m.def("swav_loss_cpp(Tensor[] scores, Tensor[] u, float inv_eps, float inv_temp, bool compute_grad) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ssl_fast, CPU, m) {
  m.impl("swav_loss_cpp", &ssl_fast::swav_loss_cpp);
}

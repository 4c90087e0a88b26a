// Fused Sinkhorn-Knopp (SwAV's equal-partition codes) on the CPU, in the log domain with max-shifted
// fp32 statistics (fp64 for double inputs). Extra memory: O(K * chunks + threads * rows_per_block * K).
//
// SwAV's distributed_sinkhorn on scores X (B x K), eps > 0, n sweeps:
//   Q = exp(X / eps)^T (K x B);  Q /= sum(Q)
//   repeat n times:  Q /= rowsum(Q) (K prototype sums); Q /= K;  Q /= colsum(Q) (B sample sums); Q /= B
//   Q *= B; return Q^T
// Log-domain form. Let s_bk = x_bk / eps and keep the matrix implicit as
//   Q_kb = exp(s_bk + u_k + v_b - c)      u (K) prototype scalings, v (B) sample scalings, c a constant.
// Every normalization multiplies Q by a per-row, per-column or global factor, so it only updates u, v or c:
//   row step t:    u_k <- -log sum_b exp(s_bk + v_b)   (c, 1/K absorbed: uniform in k and b)
//   column step t: v_b <- -log sum_k exp(s_bk + u_k)   (then 1/B: uniform)
// The initial total, the 1/K and the 1/B are uniform factors; the column step that follows each of them
// divides them out again, and the final Q *= B restores columns that sum to exactly 1. Hence, with v = 0
// initially and u_t the prototype scaling of sweep t:
//   u_1,k = -LSE_b s_bk                                   (first row step, v = 0)
//   u_t+1,k = -LSE_b (s_bk + v_t,b),  v_t,b = -LSE_k (s_bk + u_t,k)
//   Q_bk (returned, B x K) = softmax_k (s_b + u_n)_k      (last column step and final scaling)
// Shifts. The first row step is a max-shifted column log-sum-exp: m_k = max_b s_bk, z_k = sum_b exp(s_bk -
// m_k), u_1 = -(m_k + log z_k)  [op sinkhorn_col_lse_cpp -> (m, z)]. Later row steps need no max: with the
// previous u as shift,
//   u_t+1,k = u_t,k - log c_k,  c_k = sum_b exp(s_bk + u_t,k + v_t,b) = sum_b softmax_k(s_b + u_t)_k,
// the column mass of the column-normalized codes, and 1/K <= c_k <= B (P_bk = exp(s_bk + u_t,k + v_t-1,b)
// has unit prototype sums, so its sample sums r_b add up to K and c_k = sum_b P_bk / r_b >= 1/K).
// No overflow and no underflow in fp32 for any score range.
// Fusion (one pass over the rows per sweep) [op sinkhorn_row_pass_cpp -> c]: per row b, one exp per element
// e_bk = exp(s_bk + u_k - max_k), r_b = sum_k e_bk gives v_b (the column step of sweep t), and the same
// exponentials divided by r_b accumulate c_k (the row step of sweep t+1). The last sweep's column step is
// the output pass [op sinkhorn_apply_cpp -> Q]: Q_bk = e_bk / r_b, written once.
// Passes over X for n sweeps: 1 (column statistics) + (n - 1) (fused) + 1 (output) = n + 1, one exp per
// element in each. No gradient: Q is a target (SwAV computes it under no_grad).
//
// Determinism: rows are split into a number of chunks that depends on B only; each chunk owns its partial
// statistics, combined in chunk order. Results do not depend on the number of threads.
// Distributed (the python layer): (m, z) and c are all-reduced across ranks between the passes.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "scratch.h"
#include "vec_math.h"

namespace ssl_fast {
namespace {

// Rows per chunk at least, and at most kMaxChunks chunks. Every pass keeps chunks x K partials (the column pass
// two sets), fresh pages each call (scratch.h): 16-row chunks made 64 chunks at B = 1024, K = 3000 (2.3 MiB of
// partials per crop's Sinkhorn, ~1600 page faults a SwAV step, ~2 ms at 2 threads on the 2-core AMD EPYC);
// 64-row chunks make 16 there, still 8 per thread at 2 threads and 1 at 16.
constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kGrainElems = 1 << 16;  // below this many elements per task, stay on the calling thread

int64_t num_chunks(int64_t B) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (B + kMinChunkRows - 1) / kMinChunkRows));
}

// Rows per block in the column pass: a block of converted rows stays in L2 (~128 KiB).
template <typename acc_t>
int64_t rows_per_block(int64_t K) {
  const int64_t r = (128 * 1024) / std::max<int64_t>(1, K * (int64_t)sizeof(acc_t));
  return std::max<int64_t>(4, std::min<int64_t>(32, r));
}

void check_scores(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "scores must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, "scores must have shape (B, K), got rank ", x.dim());
  TORCH_CHECK(x.size(0) >= 1, "scores is an empty batch (B = 0)");
  TORCH_CHECK(x.size(1) >= 1, "scores has no prototypes (K = 0)");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1, "scores must have unit stride along K");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "scores must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_u(const at::Tensor& u, const at::Tensor& x) {
  TORCH_CHECK(u.device().is_cpu() && u.dim() == 1 && u.size(0) == x.size(1) && u.is_contiguous(),
              "u must be a contiguous CPU vector of K = ", x.size(1), " values");
  TORCH_CHECK(u.scalar_type() == acc_type(x), "u must be ", acc_type(x), ", got ", u.scalar_type());
}

// ------------------------------------------------------------------------------------------------
// column statistics: m_k = max_b s_bk, z_k = sum_b exp(s_bk - m_k)

template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> col_lse_impl(const at::Tensor& x, acc_t inv_eps) {
  const int64_t B = x.size(0), K = x.size(1), ld = x.stride(0);
  const int64_t nc = num_chunks(B), per = (B + nc - 1) / nc, R = rows_per_block<acc_t>(K);
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  ScratchArray<acc_t> partials((size_t)(2 * nc * K));  // the chunks' maxima, then their sums
  const scalar_t* X = x.data_ptr<scalar_t>();
  acc_t* PM = partials.data();
  acc_t* PZ = PM + nc * K;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, per * K));
  ThreadScratch<acc_t> bufs((size_t)((R + 1) * K));  // R converted rows, then the block's column maxima
  at::parallel_for(0, nc, grain, [&](int64_t c0, int64_t c1) {
    acc_t* const buf = bufs.local();
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* m = PM + c * K;
      acc_t* z = PZ + c * K;
      std::fill(m, m + K, neg_inf<acc_t>());
      std::fill(z, z + K, acc_t(0));
      const int64_t r0 = c * per, r1 = std::min(B, r0 + per);
      for (int64_t b = r0; b < r1; b += R) {
        const int64_t nr = std::min(R, r1 - b);
        for (int64_t r = 0; r < nr; ++r) {
          load_scaled<scalar_t, acc_t>(X + (b + r) * ld, K, inv_eps, nullptr, &buf[r * K]);
        }
        acc_t* bm = buf + R * K;
        std::copy(m, m + K, bm);
        for (int64_t r = 0; r < nr; ++r) {
          const acc_t* row = &buf[r * K];
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) bm[k] = row[k] > bm[k] ? row[k] : bm[k];
        }
        // rescale the running sums to the new maxima (exp(-inf) = 0 for the first block)
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          const acc_t d = m[k] - bm[k];
          z[k] = m[k] == neg_inf<acc_t>() ? acc_t(0) : z[k] * vexp(d);
          m[k] = bm[k];
        }
        for (int64_t r = 0; r < nr; ++r) {
          const acc_t* row = &buf[r * K];
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) z[k] += vexp(row[k] - m[k]);
        }
      }
    }
  });
  // combine the chunks in order
  at::Tensor mo = at::empty({K}, opts), zo = at::empty({K}, opts);
  acc_t* M = mo.data_ptr<acc_t>();
  acc_t* Z = zo.data_ptr<acc_t>();
  at::parallel_for(0, K, std::max<int64_t>(1, kGrainElems / nc), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      acc_t mx = neg_inf<acc_t>();
      for (int64_t c = 0; c < nc; ++c) mx = std::max(mx, PM[c * K + k]);
      acc_t s = 0;
      if (mx != neg_inf<acc_t>()) {
        for (int64_t c = 0; c < nc; ++c) {
          const acc_t mc = PM[c * K + k];
          if (mc != neg_inf<acc_t>()) s += PZ[c * K + k] * vexp(mc - mx);
        }
      }
      M[k] = mx;
      Z[k] = s;
    }
  });
  return {mo, zo};
}

// ------------------------------------------------------------------------------------------------
// fused sweep: c_k = sum_b softmax_k(s_b + u)_k

template <typename scalar_t, typename acc_t>
at::Tensor row_pass_impl(const at::Tensor& x, acc_t inv_eps, const at::Tensor& u) {
  const int64_t B = x.size(0), K = x.size(1), ld = x.stride(0);
  const int64_t nc = num_chunks(B), per = (B + nc - 1) / nc;
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  ScratchArray<acc_t> part((size_t)(nc * K));
  const scalar_t* X = x.data_ptr<scalar_t>();
  const acc_t* U = u.data_ptr<acc_t>();
  acc_t* P = part.data();
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, per * K));
  at::parallel_for(0, nc, grain, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> row((size_t)K);
    acc_t* e = row.data();
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* acc = P + c * K;
      std::fill(acc, acc + K, acc_t(0));
      const int64_t r0 = c * per, r1 = std::min(B, r0 + per);
      for (int64_t b = r0; b < r1; ++b) {
        load_scaled<scalar_t, acc_t>(X + b * ld, K, inv_eps, U, e);
        const acc_t inv = acc_t(1) / exp_shifted<acc_t>(e, K);
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) acc[k] += e[k] * inv;
      }
    }
  });
  at::Tensor out = at::empty({K}, opts);
  acc_t* O = out.data_ptr<acc_t>();
  at::parallel_for(0, K, std::max<int64_t>(1, kGrainElems / nc), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) O[k] = 0;
    for (int64_t c = 0; c < nc; ++c) {
      const acc_t* pc = P + c * K;
#pragma omp simd
      for (int64_t k = k0; k < k1; ++k) O[k] += pc[k];
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// output: Q_bk = softmax_k(s_b + u)_k

template <typename scalar_t, typename acc_t>
at::Tensor apply_impl(const at::Tensor& x, acc_t inv_eps, const at::Tensor& u) {
  const int64_t B = x.size(0), K = x.size(1), ld = x.stride(0);
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor q = at::empty({B, K}, opts);
  const scalar_t* X = x.data_ptr<scalar_t>();
  const acc_t* U = u.data_ptr<acc_t>();
  acc_t* Q = q.data_ptr<acc_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, kGrainElems / K), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      code_row<scalar_t, acc_t>(X + b * ld, K, inv_eps, U, Q + b * K);
    }
  });
  return q;
}

void check_inv_eps(double inv_eps) {
  TORCH_CHECK(std::isfinite(inv_eps) && inv_eps > 0, "epsilon must be finite and > 0 (got 1/epsilon = ", inv_eps,
              ")");
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// ops (schemas below; fake impls and the driver in ssl_fast/ops/sinkhorn.py)

std::tuple<at::Tensor, at::Tensor> sinkhorn_col_lse(const at::Tensor& scores, double inv_eps) {
  check_scores(scores);
  check_inv_eps(inv_eps);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "sinkhorn_col_lse", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = col_lse_impl<scalar_t, acc_t>(scores, static_cast<acc_t>(inv_eps));
  });
  return out;
}

at::Tensor sinkhorn_row_pass(const at::Tensor& scores, double inv_eps, const at::Tensor& u) {
  check_scores(scores);
  check_inv_eps(inv_eps);
  check_u(u, scores);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "sinkhorn_row_pass", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = row_pass_impl<scalar_t, acc_t>(scores, static_cast<acc_t>(inv_eps), u);
  });
  return out;
}

at::Tensor sinkhorn_apply(const at::Tensor& scores, double inv_eps, const at::Tensor& u) {
  check_scores(scores);
  check_inv_eps(inv_eps);
  check_u(u, scores);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "sinkhorn_apply", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = apply_impl<scalar_t, acc_t>(scores, static_cast<acc_t>(inv_eps), u);
  });
  return out;
}

}  // namespace ssl_fast

TORCH_LIBRARY_FRAGMENT(ssl_fast, m) {
  m.def("sinkhorn_col_lse_cpp(Tensor scores, float inv_eps) -> (Tensor, Tensor)");
  m.def("sinkhorn_row_pass_cpp(Tensor scores, float inv_eps, Tensor u) -> Tensor");
  m.def("sinkhorn_apply_cpp(Tensor scores, float inv_eps, Tensor u) -> Tensor");
}

TORCH_LIBRARY_IMPL(ssl_fast, CPU, m) {
  m.impl("sinkhorn_col_lse_cpp", &ssl_fast::sinkhorn_col_lse);
  m.impl("sinkhorn_row_pass_cpp", &ssl_fast::sinkhorn_row_pass);
  m.impl("sinkhorn_apply_cpp", &ssl_fast::sinkhorn_apply);
}

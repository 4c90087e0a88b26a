// Fused InfoNCE / NT-Xent on the CPU: tiled logits, fp32 (fp64 for double inputs) log-sum-exp, tiles
// recomputed in the backward; extra memory O(N*D) plus one B x B tile per thread.
//
// NT-Xent (SimCLR). Views x1, x2: (N, D) -> rows x_k of X = [x1; x2], M = 2N, k in [0, M).
//   z_k = x_k / max(|x_k|, eps) (or z_k = x_k when normalize = false), only the first d columns.
//   S = Z Z^T / T (M x M), S_kk = -inf, p(k) = (k + N) mod M,
//   lse_k = logsumexp_j S_kj,  L = (1/M) sum_k (lse_k - S_{k,p(k)}).
// Gradient. With P_kj = exp(S_kj - lse_k) (0 on the diagonal) and Y_kj = [j == p(k)]:
//   dL/dS = (P - Y) / M,  dL/dZ = (dL/dS + dL/dS^T) Z / T
//         = g/(M T) * (P + P^T - 2 Y) Z     (Y is a symmetric permutation; the targets are subtracted in the tile).
// Symmetry: S is symmetric, so the upper-triangle tile (I, J) gives the row statistics of block I AND
// (by its columns) of block J in the forward, and in the backward A = P_IJ + P_JI^T (two exps of the one
// recomputed tile) feeds dZ_I += A Z_J and dZ_J += A^T Z_I. Cost: forward 0.5 M^2 d multiply-adds,
// backward 1.5 M^2 d (eager code: 1 + 2).
// Cross-view InfoNCE. q, k: (N, D) -> Q, K normalized; S = Q K^T / T; row lse r_i, column lse c_j;
//   L = a/N sum_i (r_i - S_ii) + b/N sum_j (c_j - S_jj) with (a, b) = (1, 0), or (1/2, 1/2) symmetric.
//   dL/dS = a/N (P^row - I) + b/N (P^col - I);  dQ = dL/dS K / T,  dK = dL/dS^T Q / T.
// Normalization backward: dx = (g - z <z, g>) / |x| when |x| > eps, else g / eps.
// Saved statistics: each lse is kept as its two parts (m, log l) = (max_j S_kj, log sum_j exp(S_kj - m)), one
// flat tensor of 2 x rows values (the maxima, then the log-sums), and the backward takes
// P = exp((S - m) - log l): S - m is exact near the max, whereas the rounding of lse = m + log l in fp32 is
// eps |S| nats (at |S| ~ 1e5 a 0.4% error in P, at |S| ~ 1e11 P = inf).
// Temperature: sum_k <dL/dz_k, z_k> = -c T dL/dT (c = 2 for NT-Xent, 1 cross-view); returned as gz.
//
// Scheduling without atomic updates of results or per-thread copies: tiles are processed in rounds in
// which no two tiles touch the same block of rows (threads take a round's tiles from a shared counter).
// NT-Xent: a round-robin tournament over the nb row blocks (each round a perfect matching of blocks,
// every unordered pair exactly once), then one round of diagonal tiles.
// Cross-view: round r holds the tiles (I, (I + r) mod nb), a Latin square. Results do not depend on the
// number of threads.
//
// The tile GEMM, online log-sum-exp, row loads, gradient store and scheduler are in infonce_common.h (shared
// with the rectangular op, csrc/cpu/infonce_rect.cpp).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "infonce_common.h"

namespace ssl_fast {
namespace {

// Column statistics of a bi x bj tile (row-major), merged into mx[j], sm[j]; `buf` holds 2*bj values.
template <typename T>
inline void lse_update_cols(T* mx, T* sm, const T* s, int64_t bi, int64_t bj, T* buf) {
  T* cmax = buf;
  T* csum = buf + bj;
  for (int64_t j = 0; j < bj; ++j) cmax[j] = mx[j];
  for (int64_t a = 0; a < bi; ++a) {
    const T* row = s + a * bj;
#pragma omp simd
    for (int64_t j = 0; j < bj; ++j) cmax[j] = row[j] > cmax[j] ? row[j] : cmax[j];
  }
  for (int64_t j = 0; j < bj; ++j) csum[j] = 0;
  for (int64_t a = 0; a < bi; ++a) {
    const T* row = s + a * bj;
#pragma omp simd
    for (int64_t j = 0; j < bj; ++j) csum[j] += vexp(row[j] - cmax[j]);
  }
  for (int64_t j = 0; j < bj; ++j) {
    if (cmax[j] == neg_inf<T>()) continue;
    sm[j] = (mx[j] == neg_inf<T>() ? T(0) : sm[j] * vexp(mx[j] - cmax[j])) + csum[j];
    mx[j] = cmax[j];
  }
}

// A diagonal tile S = it * A A^T made bitwise symmetric (the lower triangle a copy of the upper): a GEMM need
// not round S_aj and S_ja alike, and the backward takes P_ja = exp(S_ja - lse_j) from S_aj (W = P + P^T in one
// pass), which must be the logit the forward summed: at |S| ~ 5e10 one fp32 ulp is 4096 nats.
template <typename acc_t>
inline void symmetrize(acc_t* S, int64_t b) {
  for (int64_t a = 1; a < b; ++a)
    for (int64_t j = 0; j < a; ++j) S[a * b + j] = S[j * b + a];
}

// Forward of one tile: S = it * A B^T (bi x bj, row-major in `S`). Its rows update the row statistics
// (rmx, rsm); its columns, when `cmx` is given, the statistics of the rows of B (buf: 2 * bj values).
// diag: A and B are the same block of Z (NT-Xent), S_aa = -inf and the columns are the rows again.
template <typename acc_t>
void forward_tile(const acc_t* A, const acc_t* Bm, int64_t bi, int64_t bj, int64_t d, acc_t it, bool diag,
                  acc_t* rmx, acc_t* rsm, acc_t* cmx, acc_t* csm, acc_t* S, acc_t* buf) {
  logits_rm<acc_t>(bi, bj, d, it, A, d, Bm, d, S);
  if (diag) symmetrize(S, bi);
  for (int64_t a = 0; a < bi; ++a) {
    if (diag) S[a * bj + a] = neg_inf<acc_t>();
    lse_update(rmx[a], rsm[a], S + a * bj, bj);
  }
  if (cmx != nullptr) lse_update_cols(cmx, csm, S, bi, bj, buf);
}

// Backward of one recomputed tile S = it * A B^T: W = wr exp(S - lse_r[a]) + wc exp(S - lse_c[j]) (the row
// and the column softmax of the same logits; wc = 0 skips the second exp), each lse given as its max (mr, mc)
// and log-sum (lr, lc) parts, exp((S - m) - log l); the targets are subtracted in the tile, W_a,p(a) -= wr + wc
// with p(a) = (r0 + a + shift) mod period - c0 when it is a column of the tile (r0, c0: the tile's first row and
// column), so that P - Y cancels before the GEMM as in eager torch (subtracting Y Z apart leaves the rounding of
// |P Z| where the gradient is ~0); then GA += scale W B and
// GB += scale W^T A. diag (NT-Xent block with itself): W_aa = 0 and, W being symmetric, one GEMM into GA.
template <typename acc_t>
void backward_tile(const acc_t* A, const acc_t* Bm, int64_t bi, int64_t bj, int64_t d, acc_t it, bool diag,
                   const acc_t* mr, const acc_t* lr, const acc_t* mc, const acc_t* lc, acc_t wr, acc_t wc,
                   int64_t r0, int64_t c0, int64_t shift, int64_t period, acc_t scale, acc_t* GA, acc_t* GB,
                   acc_t* S) {
  logits_rm<acc_t>(bi, bj, d, it, A, d, Bm, d, S);
  if (diag) symmetrize(S, bi);
  for (int64_t a = 0; a < bi; ++a) {
    acc_t* row = S + a * bj;
    const acc_t ma = mr[a], la = lr[a];
    if (wc != 0) {
#pragma omp simd
      for (int64_t j = 0; j < bj; ++j) row[j] = wr * vexp((row[j] - ma) - la) + wc * vexp((row[j] - mc[j]) - lc[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < bj; ++j) row[j] = wr * vexp((row[j] - ma) - la);
    }
    if (diag) row[a] = 0;
    const int64_t p = (r0 + a + shift) % period - c0;
    if (p >= 0 && p < bj) row[p] -= wr + wc;
  }
  gemm_rm<acc_t>(false, false, bi, d, bj, scale, S, bj, Bm, d, 1, GA, d);
  if (!diag) gemm_rm<acc_t>(true, false, bj, d, bi, scale, S, bj, A, d, 1, GB, d);
}

// Round-robin tournament over nb blocks: rounds of disjoint unordered pairs (I < J), each pair once.
std::vector<std::vector<std::pair<int64_t, int64_t>>> tournament(int64_t nb) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
  const int64_t E = nb + (nb & 1);  // participants; index nb is a bye when nb is odd
  for (int64_t r = 0; r + 1 < E; ++r) {
    std::vector<std::pair<int64_t, int64_t>> pairs;
    auto add = [&](int64_t a, int64_t b) {
      if (a >= nb || b >= nb) return;
      pairs.emplace_back(std::min(a, b), std::max(a, b));
    };
    add(E - 1, r);
    for (int64_t k = 1; k < E / 2; ++k) add((r + k) % (E - 1), (r - k + (E - 1)) % (E - 1));
    if (!pairs.empty()) rounds.push_back(std::move(pairs));
  }
  return rounds;
}

// ------------------------------------------------------------------------------------------------
// NT-Xent

template <typename scalar_t>
std::vector<at::Tensor> ntxent_fwd_impl(const at::Tensor& z1, const at::Tensor& z2, double inv_temp,
                                        bool normalize, int64_t d, int64_t block) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t N = z1.size(0), M = 2 * N;
  auto opts = z1.options().dtype(acc_dtype(z1.scalar_type()));
  at::Tensor zn = at::empty({M, d}, opts);
  at::Tensor norms = at::empty({M}, opts);
  acc_t* Z = zn.data_ptr<acc_t>();
  acc_t* nr = norms.data_ptr<acc_t>();
  load_rows<scalar_t, acc_t>(z1, d, normalize, Z, nr);
  load_rows<scalar_t, acc_t>(z2, d, normalize, Z + N * d, nr + N);

  const int64_t B = pick_block(M, block), nb = (M + B - 1) / B;
  const acc_t it = (acc_t)inv_temp;
  std::vector<acc_t> mx(M, neg_inf<acc_t>()), sm(M, 0);

  for (const auto& pairs : tournament(nb)) {
    parallel_tasks<acc_t>((int64_t)pairs.size(), B * B + 2 * B, B * B * d, [&](int64_t t, acc_t* tile) {
      const int64_t i0 = pairs[t].first * B, j0 = pairs[t].second * B;
      const int64_t bi = std::min(B, M - i0), bj = std::min(B, M - j0);
      forward_tile<acc_t>(Z + i0 * d, Z + j0 * d, bi, bj, d, it, false, &mx[i0], &sm[i0], &mx[j0], &sm[j0], tile,
                          tile + B * B);
    });
  }
  parallel_tasks<acc_t>(nb, B * B + 2 * B, B * B * d, [&](int64_t I, acc_t* tile) {
    const int64_t i0 = I * B, bi = std::min(B, M - i0);
    forward_tile<acc_t>(Z + i0 * d, Z + i0 * d, bi, bi, d, it, true, &mx[i0], &sm[i0], nullptr, nullptr, tile,
                        nullptr);
  });

  at::Tensor lse = at::empty({2 * M}, opts);  // (max, log-sum) of each row: the M maxima, then the M log-sums
  acc_t* LM = lse.data_ptr<acc_t>();
  acc_t* LL = LM + M;
  std::vector<double> row_loss(M);
  at::parallel_for(0, M, row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      LM[k] = mx[k];
      LL[k] = std::log(sm[k]);
      const acc_t* zk = Z + k * d;
      const acc_t* zp = Z + ((k + N) % M) * d;
      double pos = 0;
      for (int64_t c = 0; c < d; ++c) pos += (double)zk[c] * zp[c];
      row_loss[k] = ((double)LM[k] - pos * (double)it) + (double)LL[k];
    }
  });
  double total = 0;
  for (double v : row_loss) total += v;
  at::Tensor loss = at::full({}, total / (double)M, opts);
  return {loss, lse, zn, norms};
}

template <typename scalar_t>
std::vector<at::Tensor> ntxent_bwd_impl(double grad, const at::Tensor& z1, const at::Tensor& z2,
                                        const at::Tensor& zn, const at::Tensor& norms, const at::Tensor& lse,
                                        double inv_temp, bool normalize, int64_t d, int64_t block) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t N = z1.size(0), M = 2 * N;
  const acc_t* Z = zn.data_ptr<acc_t>();
  const acc_t* LM = lse.data_ptr<acc_t>();
  const acc_t* LL = LM + M;
  at::Tensor gz_t = at::zeros({M, d}, zn.options());
  acc_t* G = gz_t.data_ptr<acc_t>();
  const acc_t it = (acc_t)inv_temp;
  const acc_t coef = (acc_t)(grad * inv_temp / (double)M);  // g / (M T)
  const int64_t B = pick_block(M, block), nb = (M + B - 1) / B;

  for (const auto& pairs : tournament(nb)) {
    parallel_tasks<acc_t>((int64_t)pairs.size(), B * B + 2 * B, B * B * d, [&](int64_t t, acc_t* tile) {
      const int64_t i0 = pairs[t].first * B, j0 = pairs[t].second * B;
      const int64_t bi = std::min(B, M - i0), bj = std::min(B, M - j0);
      backward_tile<acc_t>(Z + i0 * d, Z + j0 * d, bi, bj, d, it, false, LM + i0, LL + i0, LM + j0, LL + j0, 1, 1,
                           i0, j0, N, M, coef, G + i0 * d, G + j0 * d, tile);
    });
  }
  parallel_tasks<acc_t>(nb, B * B + 2 * B, B * B * d, [&](int64_t I, acc_t* tile) {
    const int64_t i0 = I * B, bi = std::min(B, M - i0);
    backward_tile<acc_t>(Z + i0 * d, Z + i0 * d, bi, bi, d, it, true, LM + i0, LL + i0, LM + i0, LL + i0, 1, 1, i0,
                         i0, N, M, coef, G + i0 * d, nullptr, tile);
  });

  at::Tensor dz1 = at::empty(z1.sizes(), z1.options());
  at::Tensor dz2 = at::empty(z2.sizes(), z2.options());
  const acc_t* nr = norms.data_ptr<acc_t>();
  double gz = store_grad<scalar_t, acc_t>(G, Z, nr, N, d, normalize, dz1);
  gz += store_grad<scalar_t, acc_t>(G + N * d, Z + N * d, nr + N, N, d, normalize, dz2);
  return {dz1, dz2, at::full({}, gz, zn.options())};
}

// ------------------------------------------------------------------------------------------------
// Cross-view InfoNCE

template <typename scalar_t>
std::vector<at::Tensor> info_nce_fwd_impl(const at::Tensor& q, const at::Tensor& k, double inv_temp,
                                          bool normalize, bool symmetric, int64_t d, int64_t block) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t N = q.size(0);
  auto opts = q.options().dtype(acc_dtype(q.scalar_type()));
  at::Tensor qn = at::empty({N, d}, opts), kn = at::empty({N, d}, opts);
  at::Tensor qnorm = at::empty({N}, opts), knorm = at::empty({N}, opts);
  acc_t* Q = qn.data_ptr<acc_t>();
  acc_t* K = kn.data_ptr<acc_t>();
  load_rows<scalar_t, acc_t>(q, d, normalize, Q, qnorm.data_ptr<acc_t>());
  load_rows<scalar_t, acc_t>(k, d, normalize, K, knorm.data_ptr<acc_t>());

  const int64_t B = pick_block(N, block), nb = (N + B - 1) / B;
  const acc_t it = (acc_t)inv_temp;
  std::vector<acc_t> rmx(N, neg_inf<acc_t>()), rsm(N, 0), cmx(N, neg_inf<acc_t>()), csm(N, 0);
  for (int64_t r = 0; r < nb; ++r) {
    parallel_tasks<acc_t>(nb, B * B + 2 * B, B * B * d, [&](int64_t I, acc_t* tile) {
      const int64_t i0 = I * B, j0 = ((I + r) % nb) * B;
      const int64_t bi = std::min(B, N - i0), bj = std::min(B, N - j0);
      forward_tile<acc_t>(Q + i0 * d, K + j0 * d, bi, bj, d, it, false, &rmx[i0], &rsm[i0],
                          symmetric ? &cmx[j0] : nullptr, symmetric ? &csm[j0] : nullptr, tile, tile + B * B);
    });
  }
  at::Tensor lse_r = at::empty({2 * N}, opts);  // (max, log-sum) of each row / column, as above
  at::Tensor lse_c = at::empty({2 * (symmetric ? N : 0)}, opts);
  acc_t* LR = lse_r.data_ptr<acc_t>();
  acc_t* LC = symmetric ? lse_c.data_ptr<acc_t>() : nullptr;
  std::vector<double> row_loss(N);
  at::parallel_for(0, N, row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double pos = 0;
      for (int64_t c = 0; c < d; ++c) pos += (double)Q[i * d + c] * K[i * d + c];
      pos *= (double)it;
      LR[i] = rmx[i];
      LR[N + i] = std::log(rsm[i]);
      if (symmetric) {
        LC[i] = cmx[i];
        LC[N + i] = std::log(csm[i]);
        row_loss[i] = 0.5 * ((((double)LR[i] - pos) + (double)LR[N + i]) + (((double)LC[i] - pos) + (double)LC[N + i]));
      } else {
        row_loss[i] = ((double)LR[i] - pos) + (double)LR[N + i];
      }
    }
  });
  double total = 0;
  for (double v : row_loss) total += v;
  at::Tensor loss = at::full({}, total / (double)N, opts);
  return {loss, lse_r, lse_c, qn, kn, qnorm, knorm};
}

template <typename scalar_t>
std::vector<at::Tensor> info_nce_bwd_impl(double grad, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& qn, const at::Tensor& kn, const at::Tensor& qnorm,
                                          const at::Tensor& knorm, const at::Tensor& lse_r,
                                          const at::Tensor& lse_c, double inv_temp, bool normalize,
                                          bool symmetric, int64_t d, int64_t block) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t N = q.size(0);
  const acc_t* Q = qn.data_ptr<acc_t>();
  const acc_t* K = kn.data_ptr<acc_t>();
  const acc_t* LR = lse_r.data_ptr<acc_t>();
  const acc_t* LC = symmetric ? lse_c.data_ptr<acc_t>() : nullptr;
  at::Tensor gq_t = at::zeros({N, d}, qn.options()), gk_t = at::zeros({N, d}, qn.options());
  acc_t* GQ = gq_t.data_ptr<acc_t>();
  acc_t* GK = gk_t.data_ptr<acc_t>();
  const acc_t it = (acc_t)inv_temp;
  const double w = symmetric ? 0.5 : 1.0;
  const acc_t cr = (acc_t)(grad * w / (double)N), cc = symmetric ? cr : (acc_t)0;
  const int64_t B = pick_block(N, block), nb = (N + B - 1) / B;

  for (int64_t r = 0; r < nb; ++r) {
    parallel_tasks<acc_t>(nb, B * B + 2 * B, B * B * d, [&](int64_t I, acc_t* tile) {
      const int64_t i0 = I * B, j0 = ((I + r) % nb) * B;
      const int64_t bi = std::min(B, N - i0), bj = std::min(B, N - j0);
      backward_tile<acc_t>(Q + i0 * d, K + j0 * d, bi, bj, d, it, false, LR + i0, LR + N + i0,
                           symmetric ? LC + j0 : nullptr, symmetric ? LC + N + j0 : nullptr,
                           cr, cc, i0, j0, 0, N, it, GQ + i0 * d, GK + j0 * d, tile);
    });
  }
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  const double gz = store_grad<scalar_t, acc_t>(GQ, Q, qnorm.data_ptr<acc_t>(), N, d, normalize, dq);
  store_grad<scalar_t, acc_t>(GK, K, knorm.data_ptr<acc_t>(), N, d, normalize, dk);
  return {dq, dk, at::full({}, gz, qn.options())};
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// entry points (bound in csrc/bindings.cpp)

// The tile GEMM in use: "blas" (torch's sgemm_/dgemm_, single-threaded per tile) or "aten" (at::addmm_out).
// set_cpu_gemm("aten") forces the portable path (tests); returns the previous setting.
std::string set_cpu_gemm(const std::string& which) {
  TORCH_CHECK(which == "blas" || which == "aten", "cpu gemm must be 'blas' or 'aten', got ", which);
  const bool prev = g_use_blas.exchange(which == "blas");
  return prev ? "blas" : "aten";
}

std::string cpu_gemm() {
  return blas_symbol<float>() != nullptr ? "blas" : "aten";
}

std::vector<at::Tensor> ntxent_fwd(const at::Tensor& z1, const at::Tensor& z2, double inv_temp, bool normalize,
                                   int64_t d, int64_t block) {
  check_view(z1, "z1");
  check_view(z2, "z2");
  TORCH_CHECK(z1.sizes() == z2.sizes(), "z1 and z2 must have the same shape");
  TORCH_CHECK(z1.scalar_type() == z2.scalar_type(), "z1 and z2 must have the same dtype");
  TORCH_CHECK(d >= 1 && d <= z1.size(1), "feature_dim must be in [1, D]");
  TORCH_CHECK(inv_temp > 0 && std::isfinite(inv_temp), "temperature must be finite and > 0");
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z1.scalar_type(), "ntxent_fwd", [&] {
    out = ntxent_fwd_impl<scalar_t>(z1, z2, inv_temp, normalize, d, block);
  });
  return out;
}

std::vector<at::Tensor> ntxent_bwd(double grad, const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& zn,
                                   const at::Tensor& norms, const at::Tensor& lse, double inv_temp,
                                   bool normalize, int64_t d, int64_t block) {
  check_view(z1, "z1");
  check_view(z2, "z2");
  TORCH_CHECK(zn.is_contiguous() && zn.size(0) == 2 * z1.size(0) && zn.size(1) == d, "zn: bad saved tensor");
  TORCH_CHECK(lse.is_contiguous() && lse.dim() == 1 && lse.size(0) == 4 * z1.size(0),
              "lse: bad saved tensor");
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z1.scalar_type(), "ntxent_bwd", [&] {
    out = ntxent_bwd_impl<scalar_t>(grad, z1, z2, zn, norms, lse, inv_temp, normalize, d, block);
  });
  return out;
}

std::vector<at::Tensor> info_nce_fwd(const at::Tensor& q, const at::Tensor& k, double inv_temp, bool normalize,
                                     bool symmetric, int64_t d, int64_t block) {
  check_view(q, "query");
  check_view(k, "key");
  TORCH_CHECK(q.sizes() == k.sizes(), "query and key must have the same shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "query and key must have the same dtype");
  TORCH_CHECK(d >= 1 && d <= q.size(1), "feature_dim must be in [1, D]");
  TORCH_CHECK(inv_temp > 0 && std::isfinite(inv_temp), "temperature must be finite and > 0");
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "info_nce_fwd", [&] {
    out = info_nce_fwd_impl<scalar_t>(q, k, inv_temp, normalize, symmetric, d, block);
  });
  return out;
}

std::vector<at::Tensor> info_nce_bwd(double grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& qn,
                                     const at::Tensor& kn, const at::Tensor& qnorm, const at::Tensor& knorm,
                                     const at::Tensor& lse_r, const at::Tensor& lse_c, double inv_temp,
                                     bool normalize, bool symmetric, int64_t d, int64_t block) {
  check_view(q, "query");
  check_view(k, "key");
  TORCH_CHECK(qn.is_contiguous() && qn.size(0) == q.size(0) && qn.size(1) == d, "qn: bad saved tensor");
  TORCH_CHECK(lse_r.is_contiguous() && lse_r.dim() == 1 && lse_r.size(0) == 2 * q.size(0), "lse_r: bad saved tensor");
  TORCH_CHECK(!symmetric || (lse_c.is_contiguous() && lse_c.dim() == 1 && lse_c.size(0) == 2 * q.size(0)),
              "lse_c: bad saved tensor");
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "info_nce_bwd", [&] {
    out = info_nce_bwd_impl<scalar_t>(grad, q, k, qn, kn, qnorm, knorm, lse_r, lse_c, inv_temp, normalize,
                                      symmetric, d, block);
  });
  return out;
}

// ------------------------------------------------------------------------------------------------
// Dispatcher ops (torch.ops.ssl_fast.*_cpp): schema and CPU kernels registered when ssl_fast._C loads;
// their fake implementations are in ssl_fast/ops/infonce.py. 1/T and the upstream gradient come as 0-dim
// CPU tensors (read here, no device sync on CPU).

namespace {

double scalar_arg(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu(), name, " must be a 1-element CPU tensor");
  return t.item<double>();
}

std::vector<at::Tensor> ntxent_fwd_op(const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& inv_temp,
                                      bool normalize, int64_t d, int64_t block) {
  return ntxent_fwd(z1, z2, scalar_arg(inv_temp, "inv_temp"), normalize, d, block);
}

std::vector<at::Tensor> ntxent_bwd_op(const at::Tensor& grad, const at::Tensor& z1, const at::Tensor& z2,
                                      const at::Tensor& lse, const at::Tensor& zn, const at::Tensor& norms,
                                      const at::Tensor& inv_temp, bool normalize, int64_t d, int64_t block) {
  return ntxent_bwd(scalar_arg(grad, "grad"), z1, z2, zn, norms, lse, scalar_arg(inv_temp, "inv_temp"),
                    normalize, d, block);
}

std::vector<at::Tensor> info_nce_fwd_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& inv_temp,
                                        bool normalize, bool symmetric, int64_t d, int64_t block) {
  return info_nce_fwd(q, k, scalar_arg(inv_temp, "inv_temp"), normalize, symmetric, d, block);
}

std::vector<at::Tensor> info_nce_bwd_op(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& lse_r, const at::Tensor& lse_c, const at::Tensor& qn,
                                        const at::Tensor& kn, const at::Tensor& qnorm, const at::Tensor& knorm,
                                        const at::Tensor& inv_temp, bool normalize, bool symmetric, int64_t d,
                                        int64_t block) {
  return info_nce_bwd(scalar_arg(grad, "grad"), q, k, qn, kn, qnorm, knorm, lse_r, lse_c,
                      scalar_arg(inv_temp, "inv_temp"), normalize, symmetric, d, block);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssl_fast, m) {
  // saved tensors follow the loss in the forward's output and come back in the same order
  m.def("ntxent_fwd_cpp(Tensor z1, Tensor z2, Tensor inv_temp, bool normalize, int d, int block) -> Tensor[]");
  m.def("ntxent_bwd_cpp(Tensor grad, Tensor z1, Tensor z2, Tensor lse, Tensor zn, Tensor norms, Tensor inv_temp, "
        "bool normalize, int d, int block) -> Tensor[]");
  m.def("info_nce_fwd_cpp(Tensor q, Tensor k, Tensor inv_temp, bool normalize, bool symmetric, int d, "
        "int block) -> Tensor[]");
  m.def("info_nce_bwd_cpp(Tensor grad, Tensor q, Tensor k, Tensor lse_r, Tensor lse_c, Tensor qn, Tensor kn, "
        "Tensor qnorm, Tensor knorm, Tensor inv_temp, bool normalize, bool symmetric, int d, int block) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ssl_fast, CPU, m) {
  m.impl("ntxent_fwd_cpp", &ntxent_fwd_op);
  m.impl("ntxent_bwd_cpp", &ntxent_bwd_op);
  m.impl("info_nce_fwd_cpp", &info_nce_fwd_op);
  m.impl("info_nce_bwd_cpp", &info_nce_bwd_op);
}

}  // namespace ssl_fast

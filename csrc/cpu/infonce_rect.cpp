// Fused rectangular InfoNCE on the CPU: local anchors against global candidates (distributed NT-Xent /
// InfoNCE, queues of negatives, gradient caching). Rows x (R x d) and candidates y (Cn x d), all d columns
// used (callers slice a feature_dim), each row normalized when asked: a_i = x_i / max(|x_i|, eps), c_j likewise.
//   S = A C^T / T (R x Cn),  S_i,e(i) = -inf where e(i) = excl[i] >= 0 (the anchor itself, NT-Xent),
//   lse_i = logsumexp_j S_ij,  t_i = lse_i - S_i,p(i)  with p(i) = pos[i] (t_i = lse_i when p(i) = -1).
// The per-row terms t (R) are the output; the loss is a weighting of them chosen by the caller.
// Gradient, for upstream per-row weights w_i = dL/dt_i:
//   W_ij = w_i (P_ij - [j == p(i)]),  P_ij = exp(S_ij - lse_i) (0 at j = e(i)),
//   dL/dA = W C / T (R x d),  dL/dC = W^T A / T (Cn x d; only the first grad_cols rows are returned:
//   appended negatives such as a queue get none), then the normalization backward of every row.
// Temperature: sum_i <dL/da_i, a_i> = sum_ij W_ij S_ij = -T dL/dT (returned as gz; c = 1).
// Schedule (no atomics; results independent of the thread count): the forward and dA run one task per
// row block, each sweeping every column block (online LSE / its own rows of dA); dC runs one task per
// column block, each sweeping every row block with the stored row LSEs (flash-attention's dK/dV).
// Cost (multiply-adds): forward R Cn d; backward 4 R Cn d (a logit recompute + a gradient GEMM per pass).
// Extra memory: fp32 copies of the normalized rows and candidates (O((R + Cn) d)), one tile per thread.
// The tile GEMM, online log-sum-exp, row loads, gradient store and scheduler are infonce_common.h's.
// Dispatcher ops: ssl_fast::infonce_rect_fwd_cpp / infonce_rect_bwd_cpp (fake impls in ssl_fast/ops/infonce_rect.py).

#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "infonce_common.h"

namespace ssl_fast {
namespace {

int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t>
std::vector<at::Tensor> rect_fwd_impl(const at::Tensor& x, const at::Tensor& y, const int64_t* P, const int64_t* E,
                                      double inv_temp, bool normalize, int64_t block) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t R = x.size(0), Cn = y.size(0), d = x.size(1);
  auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor an = at::empty({R, d}, opts), cn = at::empty({Cn, d}, opts);
  at::Tensor anorm = at::empty({R}, opts), cnorm = at::empty({Cn}, opts);
  acc_t* A = an.data_ptr<acc_t>();
  acc_t* C = cn.data_ptr<acc_t>();
  load_rows<scalar_t, acc_t>(x, d, normalize, A, anorm.data_ptr<acc_t>());
  load_rows<scalar_t, acc_t>(y, d, normalize, C, cnorm.data_ptr<acc_t>());
  at::Tensor lse = at::empty({R}, opts), terms = at::empty({R}, opts);
  acc_t* L = lse.data_ptr<acc_t>();
  acc_t* Tm = terms.data_ptr<acc_t>();
  const acc_t it = (acc_t)inv_temp;
  const int64_t Br = pick_block(R, block), Bc = block > 0 ? block : 256;
  const int64_t nbr = cdiv64(R, Br), nbc = cdiv64(Cn, Bc);
  parallel_tasks<acc_t>(nbr, Br * Bc + 2 * Br, Br * Cn * d, [&](int64_t I, acc_t* tile) {
    const int64_t i0 = I * Br, bi = std::min(Br, R - i0);
    acc_t* S = tile;
    acc_t* mx = tile + Br * Bc;
    acc_t* sm = mx + Br;
    for (int64_t a = 0; a < bi; ++a) {
      mx[a] = neg_inf<acc_t>();
      sm[a] = 0;
    }
    for (int64_t J = 0; J < nbc; ++J) {
      const int64_t j0 = J * Bc, bj = std::min(Bc, Cn - j0);
      gemm_rm<acc_t>(false, true, bi, bj, d, it, A + i0 * d, d, C + j0 * d, d, 0, S, bj);
      for (int64_t a = 0; a < bi; ++a) {
        const int64_t e = E[i0 + a];
        if (e >= j0 && e < j0 + bj) S[a * bj + (e - j0)] = neg_inf<acc_t>();
        lse_update(mx[a], sm[a], S + a * bj, bj);
      }
    }
    for (int64_t a = 0; a < bi; ++a) {
      const int64_t i = i0 + a, p = P[i];
      L[i] = sm[a] > 0 ? mx[a] + std::log(sm[a]) : neg_inf<acc_t>();
      double spos = 0;
      if (p >= 0) {
        for (int64_t c = 0; c < d; ++c) spos += (double)A[i * d + c] * C[p * d + c];
        spos *= (double)it;
      }
      Tm[i] = (acc_t)((double)L[i] - spos);
    }
  });
  return {terms, lse, an, cn, anorm, cnorm};
}

template <typename scalar_t>
std::vector<at::Tensor> rect_bwd_impl(const at::Tensor& w, const at::Tensor& an, const at::Tensor& cn,
                                      const at::Tensor& anorm, const at::Tensor& cnorm, const at::Tensor& lse,
                                      const int64_t* P, const int64_t* E, double inv_temp, bool normalize,
                                      int64_t grad_cols, int64_t block) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t R = an.size(0), Cn = cn.size(0), d = an.size(1);
  const acc_t* A = an.data_ptr<acc_t>();
  const acc_t* C = cn.data_ptr<acc_t>();
  const acc_t* L = lse.data_ptr<acc_t>();
  at::Tensor wc = w.to(an.scalar_type()).contiguous();
  const acc_t* Wt = wc.data_ptr<acc_t>();
  at::Tensor ga = at::zeros({R, d}, an.options()), gc = at::zeros({grad_cols, d}, an.options());
  acc_t* GA = ga.data_ptr<acc_t>();
  acc_t* GC = gc.data_ptr<acc_t>();
  const acc_t it = (acc_t)inv_temp;

  // dA: one task per row block, sweeping all columns.
  {
    const int64_t Br = pick_block(R, block), Bc = block > 0 ? block : 256;
    const int64_t nbr = cdiv64(R, Br), nbc = cdiv64(Cn, Bc);
    parallel_tasks<acc_t>(nbr, Br * Bc, 2 * Br * Cn * d, [&](int64_t I, acc_t* S) {
      const int64_t i0 = I * Br, bi = std::min(Br, R - i0);
      for (int64_t J = 0; J < nbc; ++J) {
        const int64_t j0 = J * Bc, bj = std::min(Bc, Cn - j0);
        gemm_rm<acc_t>(false, true, bi, bj, d, it, A + i0 * d, d, C + j0 * d, d, 0, S, bj);
        for (int64_t a = 0; a < bi; ++a) {
          acc_t* row = S + a * bj;
          const acc_t wi = Wt[i0 + a], li = L[i0 + a];
#pragma omp simd
          for (int64_t j = 0; j < bj; ++j) row[j] = wi * vexp(row[j] - li);
          const int64_t e = E[i0 + a], p = P[i0 + a];
          if (e >= j0 && e < j0 + bj) row[e - j0] = 0;
          if (p >= j0 && p < j0 + bj) row[p - j0] -= wi;
        }
        gemm_rm<acc_t>(false, false, bi, d, bj, it, S, bj, C + j0 * d, d, 1, GA + i0 * d, d);
      }
    });
  }
  // dC: one task per column block (of the first grad_cols), sweeping all rows; the tile is S^T = C_J A_I^T / T.
  if (grad_cols > 0) {
    const int64_t Bc = pick_block(grad_cols, block), Br = block > 0 ? block : 256;
    const int64_t nbc = cdiv64(grad_cols, Bc), nbr = cdiv64(R, Br);
    parallel_tasks<acc_t>(nbc, Bc * Br, 2 * Bc * R * d, [&](int64_t J, acc_t* S) {
      const int64_t j0 = J * Bc, bj = std::min(Bc, grad_cols - j0);
      for (int64_t I = 0; I < nbr; ++I) {
        const int64_t i0 = I * Br, bi = std::min(Br, R - i0);
        gemm_rm<acc_t>(false, true, bj, bi, d, it, C + j0 * d, d, A + i0 * d, d, 0, S, bi);
        const acc_t* wi = Wt + i0;
        const acc_t* li = L + i0;
        for (int64_t b = 0; b < bj; ++b) {
          acc_t* row = S + b * bi;
#pragma omp simd
          for (int64_t a = 0; a < bi; ++a) row[a] = wi[a] * vexp(row[a] - li[a]);
        }
        for (int64_t a = 0; a < bi; ++a) {
          const int64_t e = E[i0 + a], p = P[i0 + a];
          if (e >= j0 && e < j0 + bj) S[(e - j0) * bi + a] = 0;
          if (p >= j0 && p < j0 + bj) S[(p - j0) * bi + a] -= wi[a];
        }
        gemm_rm<acc_t>(false, false, bj, d, bi, it, S, bi, A + i0 * d, d, 1, GC + j0 * d, d);
      }
    });
  }
  at::Tensor da = at::empty({R, d}, an.options()), dc = at::empty({grad_cols, d}, an.options());
  const double gz = store_grad<acc_t, acc_t>(GA, A, anorm.data_ptr<acc_t>(), R, d, normalize, da);
  if (grad_cols > 0) store_grad<acc_t, acc_t>(GC, C, cnorm.data_ptr<acc_t>(), grad_cols, d, normalize, dc);
  return {da, dc, at::full({}, gz, an.options())};
}

void check_index(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == rows,
              name, " must be a CPU int64 tensor of shape (R,) = (", rows, ",)");
  const int64_t* v = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(v[i] >= -1 && v[i] < cols, name, "[", i, "] = ", v[i], " is outside [-1, ", cols, ")");
}

double read_inv_temp(const at::Tensor& inv_temp) {
  TORCH_CHECK(inv_temp.numel() == 1 && inv_temp.device().is_cpu(), "inv_temp must be a 1-element CPU tensor");
  const double v = inv_temp.item<double>();
  TORCH_CHECK(v > 0 && std::isfinite(v), "temperature must be finite and > 0");
  return v;
}

// rows (R, d), cands (Cn, d), pos / excl (R,) int64 in [-1, Cn) -> [terms (R), lse (R), rows_n, cands_n,
// row norms, candidate norms] (accumulation dtype).
std::vector<at::Tensor> infonce_rect_fwd_cpp(const at::Tensor& rows, const at::Tensor& cands, const at::Tensor& pos,
                                             const at::Tensor& excl, const at::Tensor& inv_temp, bool normalize,
                                             int64_t block) {
  check_view(rows, "rows");
  check_view(cands, "candidates");
  TORCH_CHECK(rows.size(1) == cands.size(1), "rows and candidates must have the same width, got ", rows.size(1),
              " and ", cands.size(1));
  TORCH_CHECK(rows.scalar_type() == cands.scalar_type(), "rows and candidates must have the same dtype");
  const int64_t R = rows.size(0), Cn = cands.size(0);
  at::Tensor p = pos.contiguous(), e = excl.contiguous();
  check_index(p, "pos", R, Cn);
  check_index(e, "excl", R, Cn);
  const double it = read_inv_temp(inv_temp);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "infonce_rect_fwd", [&] {
    out = rect_fwd_impl<scalar_t>(rows, cands, p.data_ptr<int64_t>(), e.data_ptr<int64_t>(), it, normalize, block);
  });
  return out;
}

// -> [d rows (R, d), d candidates (grad_cols, d), gz (0-dim)], accumulation dtype.
std::vector<at::Tensor> infonce_rect_bwd_cpp(const at::Tensor& w, const at::Tensor& rows_n,
                                             const at::Tensor& cands_n, const at::Tensor& row_norms,
                                             const at::Tensor& cand_norms, const at::Tensor& lse,
                                             const at::Tensor& pos, const at::Tensor& excl,
                                             const at::Tensor& inv_temp, bool normalize, int64_t grad_cols,
                                             int64_t block) {
  const int64_t R = rows_n.size(0), Cn = cands_n.size(0);
  TORCH_CHECK(rows_n.is_contiguous() && cands_n.is_contiguous() && rows_n.size(1) == cands_n.size(1),
              "rows_n / cands_n: bad saved tensors");
  TORCH_CHECK(rows_n.scalar_type() == at::kFloat || rows_n.scalar_type() == at::kDouble, "rows_n: bad dtype");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == R && w.device().is_cpu(), "w must be a CPU tensor of shape (R,)");
  TORCH_CHECK(lse.is_contiguous() && lse.size(0) == R, "lse: bad saved tensor");
  TORCH_CHECK(grad_cols >= 0 && grad_cols <= Cn, "grad_cols must be in [0, Cn]");
  at::Tensor p = pos.contiguous(), e = excl.contiguous();
  check_index(p, "pos", R, Cn);
  check_index(e, "excl", R, Cn);
  const double it = read_inv_temp(inv_temp);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(rows_n.scalar_type(), "infonce_rect_bwd", [&] {
    out = rect_bwd_impl<scalar_t>(w, rows_n, cands_n, row_norms, cand_norms, lse, p.data_ptr<int64_t>(),
                                  e.data_ptr<int64_t>(), it, normalize, grad_cols, block);
  });
  return out;
}

}  // namespace
}  // namespace ssl_fast

TORCH_LIBRARY_FRAGMENT(ssl_fast, m) {
  m.def("infonce_rect_fwd_cpp(Tensor rows, Tensor cands, Tensor pos, Tensor excl, Tensor inv_temp, bool normalize, "
        "int block) -> Tensor[]");
  m.def("infonce_rect_bwd_cpp(Tensor w, Tensor rows_n, Tensor cands_n, Tensor row_norms, Tensor cand_norms, "
        "Tensor lse, Tensor pos, Tensor excl, Tensor inv_temp, bool normalize, int grad_cols, int block) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ssl_fast, CPU, m) {
  m.impl("infonce_rect_fwd_cpp", &ssl_fast::infonce_rect_fwd_cpp);
  m.impl("infonce_rect_bwd_cpp", &ssl_fast::infonce_rect_bwd_cpp);
}

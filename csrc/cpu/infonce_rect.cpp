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
//
// The rows' gradient is a softmax-weighted mean of the candidates, computed in the forward:
//   (dL/dA)_i = (w_i / T) (sum_j P_ij c_j - c_p(i)) = (w_i / T) (U_i - c_p(i)),  U_i = sum_j P_ij c_j (R x d),
// and U is what flash attention's forward computes (softmax(Q K^T) V with V = K = C): over column chunks J,
// with the running max m_i and sum l_i = sum_{j seen} exp(S_ij - m_i) and acc_i = sum_{j seen} exp(S_ij - m_i) c_j,
//   m'_i = max(m_i, max_{j in J} S_ij),  l_i <- l_i e^{m_i - m'_i} + sum_{j in J} e^{S_ij - m'_i},
//   acc_i <- acc_i e^{m_i - m'_i} + sum_{j in J} e^{S_ij - m'_i} c_j   (a GEMM of the chunk's P with C_J),
// and at the end lse_i = m_i + log l_i, U_i = acc_i / l_i. Partial states over disjoint column ranges merge the
// same way: m = max_s m_s, l = sum_s l_s e^{m_s - m}, acc = sum_s acc_s e^{m_s - m}. So a forward that will be
// differentiated (with_grad) saves U (R x d, fp32) and the backward's dA costs O(R d) with no logit recompute;
// only the dC part recomputes its tiles, and only over the first grad_cols columns (a queue needs none).
// A forward without gradient (no_grad, eval) sweeps the LSE alone (the same tiles and the same exp values,
// so the terms are bitwise those of the with_grad forward).
// Schedule (no atomics; results independent of the thread count): the forward runs one task per (row block,
// column range): row blocks of up to 256 rows (few re-reads of C) and the column chunks of each row block split
// into ns ranges so that a round has ~16 tasks even for a few hundred rows (a MoCo batch); the partial
// (m, l, acc) are merged in range order. dC runs one task per forward column chunk that holds some of the first
// grad_cols candidates, each sweeping every row block with the stored row LSEs (flash-attention's dK/dV) and
// recomputing the forward's own tiles (bitwise its logits). All block sizes and ns depend on the shapes (and the
// requested block) only.
// Cost (multiply-adds): forward R Cn d (LSE only) or 2 R Cn d (with U); backward 2 R grad_cols d + O((R + Cn) d)
// (was R Cn d forward + 2 R Cn d + 2 R grad_cols d backward: one whole recompute and one GEMM pass less for a queue).
// Extra memory: fp32 copies of the normalized rows and candidates (O((R + Cn) d)), U (R x d), ns partial
// (m, l, acc) when ns > 1 (ns R (d + 2)), one tile per thread.
// The tile GEMM, row loads, gradient store and scheduler are infonce_common.h's.
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

// Every logit tile is a multiple of kColAlign candidates wide. MKL's sgemm sums the columns of a tile whose width is
// not a multiple of 4 in different orders (measured here with 1-256 rows, d = 4-128: two equal candidates got two
// logits an ulp apart at every width 4k + 1..3 tried, equal ones at every multiple of 4), and a tie split by an ulp
// of |S| ~ 700 moved the softmax by 1e-5 (the fuzz tests: a candidates' gradient 3x past the rule). The
// normalized candidate copy therefore holds round_up(Cn, 4) rows (the extra ones zero, their logits masked).
constexpr int64_t kColAlign = 4;
int64_t round_up(int64_t a, int64_t b) { return cdiv64(a, b) * b; }

// Forward tiling, from the shapes and the requested block only. Rows per block: up to 256 (one block of a MoCo
// batch reads C once per GEMM pass), balanced; columns per chunk: 128 (a 256 x 128 fp32 tile is 128 KiB and stays
// in L2 with the chunk of C and the accumulator); the chunks of a row block split into ns ranges, ~16 tasks a round.
struct FwdTiling {
  int64_t Br, nbr, Bc, nbc, ns;
};

inline constexpr int64_t kFwdRows = 256, kFwdCols = 128, kFwdTasks = 16;

FwdTiling fwd_tiling(int64_t R, int64_t Cn, int64_t block) {
  FwdTiling t;
  t.nbr = cdiv64(R, block > 0 ? block : kFwdRows);
  t.Br = block > 0 ? block : cdiv64(R, t.nbr);
  t.Bc = block > 0 ? round_up(block, kColAlign) : kFwdCols;
  t.nbc = cdiv64(Cn, t.Bc);
  t.ns = std::min(t.nbc, std::max<int64_t>(1, cdiv64(kFwdTasks, t.nbr)));
  return t;
}

// One row's online update with the chunk's logits v (n values, -inf where masked): v becomes
// exp(v - m') (the chunk's unnormalized probabilities), l and m are updated; returns the factor e^{m - m'} by
// which the row's earlier sums must be rescaled (0 when there were none).
template <typename T>
inline T online_row(T& m, T& l, T* v, int64_t n) {
  T tmax = neg_inf<T>();
#pragma omp simd reduction(max : tmax)
  for (int64_t j = 0; j < n; ++j) tmax = v[j] > tmax ? v[j] : tmax;
  const T newm = tmax > m ? tmax : m;
  if (newm == neg_inf<T>()) {  // every logit so far masked: nothing to add
    for (int64_t j = 0; j < n; ++j) v[j] = 0;
    return T(1);
  }
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    v[j] = vexp(v[j] - newm);
    s += v[j];
  }
  const T scale = m == neg_inf<T>() ? T(0) : vexp(m - newm);
  l = l * scale + s;
  m = newm;
  return scale;
}

// -> terms, lse, normalized rows / candidates, their norms, and U (R x d) when with_grad ((0, d) otherwise).
template <typename scalar_t>
std::vector<at::Tensor> rect_fwd_impl(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& z,
                                      const int64_t* P, const int64_t* E, double inv_temp, bool normalize,
                                      bool with_grad, int64_t block) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t R = x.size(0), Cy = y.size(0), Cn = Cy + (z ? z->size(0) : 0), d = x.size(1);
  auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  const int64_t Cw = round_up(Cn, kColAlign);  // rows of the candidate copy (see kColAlign)
  at::Tensor an = at::empty({R, d}, opts), cw = empty_scratch({Cw, d}, opts);
  // returned: the copy's first Cn rows over its whole storage (not a view of cw: an op output must not be one)
  at::Tensor cn = at::empty({0}, opts);
  cn.set_(cw.storage(), 0, {Cn, d}, {d, 1});
  at::Tensor anorm = at::empty({R}, opts), cnorm = at::empty({Cn}, opts);
  acc_t* A = an.data_ptr<acc_t>();
  acc_t* C = cw.data_ptr<acc_t>();
  std::fill(C + Cn * d, C + Cw * d, acc_t(0));
  load_rows<scalar_t, acc_t>(x, d, normalize, A, anorm.data_ptr<acc_t>());
  load_rows<scalar_t, acc_t>(y, d, normalize, C, cnorm.data_ptr<acc_t>());
  if (z) load_rows<scalar_t, acc_t>(*z, d, normalize, C + Cy * d, cnorm.data_ptr<acc_t>() + Cy);
  // lse kept as (max, log-sum): the R row maxima, then the R log-sums; the backward's exp((S - max) - log-sum) is
  // exact where S ~ max (two tied logits at |S| ~ 700 give 1/2, 1/2; m + log l rounded to fp32 is 3e-5 nats off)
  at::Tensor lse = at::empty({2 * R}, opts), terms = at::empty({R}, opts);
  at::Tensor u = at::empty({with_grad ? R : 0, d}, opts);
  acc_t* LM = lse.data_ptr<acc_t>();
  acc_t* LL = LM + R;
  acc_t* Tm = terms.data_ptr<acc_t>();
  // each row's positive logit as its tile computed it (the term is (max - S_ip) + log-sum: exactly log 2 for a
  // positive tied with one other candidate, whatever |S|)
  std::vector<acc_t> spos_tile((size_t)R, acc_t(0));
  const acc_t it = (acc_t)inv_temp;
  const FwdTiling tl = fwd_tiling(R, Cn, block);
  const int64_t Br = tl.Br, Bc = tl.Bc, nbc = tl.nbc, ns = tl.ns;
  // partial states of range s: pm / pl (ns x R), pacc (ns x R x d; U itself when ns == 1)
  at::Tensor pml = at::empty({2 * ns * R}, opts);
  at::Tensor pacc_t = with_grad && ns > 1 ? at::empty({ns * R * d}, opts) : u;
  acc_t* pm = pml.data_ptr<acc_t>();
  acc_t* pl = pm + ns * R;
  acc_t* pacc = with_grad ? pacc_t.data_ptr<acc_t>() : nullptr;
  const int64_t work = Br * cdiv64(Cn, ns) * d * (with_grad ? 2 : 1);
  parallel_tasks<acc_t>(tl.nbr * ns, Br * Bc, work, [&](int64_t task, acc_t* S) {
    const int64_t I = task / ns, s = task % ns;
    const int64_t i0 = I * Br, bi = std::min(Br, R - i0);
    acc_t* m = pm + s * R + i0;
    acc_t* l = pl + s * R + i0;
    acc_t* acc = with_grad ? pacc + (s * R + i0) * d : nullptr;
    for (int64_t a = 0; a < bi; ++a) {
      m[a] = neg_inf<acc_t>();
      l[a] = 0;
    }
    if (with_grad) std::fill(acc, acc + bi * d, acc_t(0));
    for (int64_t J = s * nbc / ns; J < (s + 1) * nbc / ns; ++J) {
      const int64_t j0 = J * Bc, bj = std::min(Bc, Cn - j0), bw = std::min(Bc, Cw - j0);  // bw: bj rounded up
      logits_rm<acc_t>(bi, bw, d, it, A + i0 * d, d, C + j0 * d, d, S);
      for (int64_t a = 0; a < bi; ++a) {
        const int64_t e = E[i0 + a];
        acc_t* row = S + a * bw;
        const int64_t p = P[i0 + a];
        if (p >= j0 && p < j0 + bj) spos_tile[i0 + a] = row[p - j0];
        for (int64_t j = bj; j < bw; ++j) row[j] = neg_inf<acc_t>();
        if (e >= j0 && e < j0 + bj) row[e - j0] = neg_inf<acc_t>();
        const acc_t scale = online_row(m[a], l[a], row, bw);
        if (with_grad && scale != acc_t(1)) {
          acc_t* r = acc + a * d;
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) r[c] *= scale;
        }
      }
      if (with_grad) gemm_rm<acc_t>(false, false, bi, d, bw, acc_t(1), S, bw, C + j0 * d, d, 1, acc, d);
    }
  });
  // merge the ranges in order (per row: independent of the thread count), then the terms
  acc_t* U = with_grad ? u.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, R, row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      acc_t mx = neg_inf<acc_t>();
      for (int64_t s = 0; s < ns; ++s) mx = std::max(mx, pm[s * R + i]);
      acc_t sm = 0;
      if (mx != neg_inf<acc_t>())
        for (int64_t s = 0; s < ns; ++s)
          if (pm[s * R + i] != neg_inf<acc_t>()) sm += pl[s * R + i] * vexp(pm[s * R + i] - mx);
      LM[i] = mx;
      LL[i] = std::log(sm);  // -inf for a row with every logit masked; NaN from a NaN logit, carried on
      if (with_grad) {
        acc_t* ui = U + i * d;
        if (sm == 0) {
          std::fill(ui, ui + d, acc_t(0));
        } else if (ns == 1) {  // pacc is U
          const acc_t f = acc_t(1) / sm;
          for (int64_t c = 0; c < d; ++c) ui[c] *= f;
        } else {
          std::fill(ui, ui + d, acc_t(0));
          for (int64_t s = 0; s < ns; ++s) {
            if (pm[s * R + i] == neg_inf<acc_t>()) continue;
            const acc_t f = vexp(pm[s * R + i] - mx) / sm;
            const acc_t* ps = pacc + (s * R + i) * d;
            for (int64_t c = 0; c < d; ++c) ui[c] += f * ps[c];
          }
        }
      }
      const double spos = P[i] >= 0 ? (double)spos_tile[i] : 0.0;
      Tm[i] = sm == 0 ? neg_inf<acc_t>() : (acc_t)(((double)mx - spos) + (double)LL[i]);
    }
  });
  return {terms, lse, an, cn, anorm, cnorm, u};
}

template <typename scalar_t>
std::vector<at::Tensor> rect_bwd_impl(const at::Tensor& w, const at::Tensor& an, const at::Tensor& cn,
                                      const at::Tensor& anorm, const at::Tensor& cnorm, const at::Tensor& u,
                                      const at::Tensor& lse, const int64_t* P, const int64_t* E, double inv_temp,
                                      bool normalize, int64_t grad_cols, int64_t block) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t R = an.size(0), Cn = cn.size(0), d = an.size(1), Cw = round_up(Cn, kColAlign);
  const acc_t* A = an.data_ptr<acc_t>();
  // the forward's candidate copy holds Cw rows (kColAlign); another tensor is copied into one that does
  at::Tensor cw = cn;
  if (Cw > Cn && (int64_t)cn.storage().nbytes() < (cn.storage_offset() + Cw * d) * (int64_t)sizeof(acc_t)) {
    cw = at::zeros({Cw, d}, cn.options());
    cw.narrow(0, 0, Cn).copy_(cn);
  }
  const acc_t* C = cw.data_ptr<acc_t>();
  const acc_t* U = u.data_ptr<acc_t>();
  const acc_t* LM = lse.data_ptr<acc_t>();  // (max, log-sum), see the forward
  const acc_t* LL = LM + R;
  at::Tensor wc = w.to(an.scalar_type()).contiguous();
  const acc_t* Wt = wc.data_ptr<acc_t>();
  at::Tensor ga = at::empty({R, d}, an.options()), gc = at::zeros({grad_cols, d}, an.options());
  acc_t* GA = ga.data_ptr<acc_t>();
  acc_t* GC = gc.data_ptr<acc_t>();
  const acc_t it = (acc_t)inv_temp;

  // dA_i = (w_i / T) (U_i - c_p(i)): no recompute.
  at::parallel_for(0, R, row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const acc_t f = Wt[i] * it;
      const int64_t p = P[i];
      const acc_t* ui = U + i * d;
      acc_t* g = GA + i * d;
      if (p >= 0) {
        const acc_t* cp = C + p * d;
        for (int64_t c = 0; c < d; ++c) g[c] = f * (ui[c] - cp[c]);
      } else {
        for (int64_t c = 0; c < d; ++c) g[c] = f * ui[c];
      }
    }
  });
  // dC: one task per column chunk of the forward that holds some of the first grad_cols candidates, sweeping
  // every row block; each tile is recomputed exactly as the forward computed it (the forward's tiling, the same
  // logits_rm call on the same saved copies), so P_ij = exp(S_ij - lse_i) uses the logits the forward summed: a
  // transposed recompute (C_J A_I^T) need not round alike (MKL sums in another order; at |S| ~ 1e6 an ulp is
  // 0.06 nats, found by the fuzz tests as a wrong candidates' gradient). GC_J += (1/T) W^T A_I.
  if (grad_cols > 0) {
    const FwdTiling tl = fwd_tiling(R, Cn, block);
    const int64_t Br = tl.Br, Bc = tl.Bc, nbr = tl.nbr, nbcg = cdiv64(grad_cols, Bc);
    parallel_tasks<acc_t>(nbcg, Br * Bc, 2 * Bc * R * d, [&](int64_t J, acc_t* S) {
      const int64_t j0 = J * Bc, bw = std::min(Bc, Cw - j0), bg = std::min(bw, grad_cols - j0);
      for (int64_t I = 0; I < nbr; ++I) {
        const int64_t i0 = I * Br, bi = std::min(Br, R - i0);
        logits_rm<acc_t>(bi, bw, d, it, A + i0 * d, d, C + j0 * d, d, S);
        for (int64_t a = 0; a < bi; ++a) {
          acc_t* row = S + a * bw;
          const acc_t wa = Wt[i0 + a], ma = LM[i0 + a], la = LL[i0 + a];
          if (ma == neg_inf<acc_t>()) {  // every logit of the row masked: no probability
            std::fill(row, row + bg, acc_t(0));
          } else {
#pragma omp simd
            for (int64_t j = 0; j < bg; ++j) row[j] = wa * vexp((row[j] - ma) - la);
          }
          const int64_t e = E[i0 + a], p = P[i0 + a];
          if (e >= j0 && e < j0 + bg) row[e - j0] = 0;
          if (p >= j0 && p < j0 + bg) row[p - j0] -= wa;
        }
        gemm_rm<acc_t>(true, false, bg, d, bi, it, S, bw, A + i0 * d, d, 1, GC + j0 * d, d);
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

// rows (R, d), cands (Cy, d), negatives None or (M, d) (candidates appended after cands: a queue, not copied into
// one tensor first), Cn = Cy + M; pos / excl (R,) int64 in [-1, Cn) -> [terms (R), lse (2R), rows_n, cands_n,
// row norms, candidate norms, u (R, d) if with_grad else (0, d)] (accumulation dtype).
std::vector<at::Tensor> infonce_rect_fwd_cpp(const at::Tensor& rows, const at::Tensor& cands,
                                             const c10::optional<at::Tensor>& negatives, const at::Tensor& pos,
                                             const at::Tensor& excl, const at::Tensor& inv_temp, bool normalize,
                                             bool with_grad, int64_t block) {
  check_view(rows, "rows");
  check_view(cands, "candidates");
  TORCH_CHECK(rows.size(1) == cands.size(1), "rows and candidates must have the same width, got ", rows.size(1),
              " and ", cands.size(1));
  TORCH_CHECK(rows.scalar_type() == cands.scalar_type(), "rows and candidates must have the same dtype");
  if (negatives) {
    check_view(*negatives, "negatives");
    TORCH_CHECK(negatives->size(1) == rows.size(1) && negatives->scalar_type() == rows.scalar_type(),
                "negatives must have the width and dtype of the rows");
  }
  const int64_t R = rows.size(0), Cn = cands.size(0) + (negatives ? negatives->size(0) : 0);
  at::Tensor p = pos.contiguous(), e = excl.contiguous();
  check_index(p, "pos", R, Cn);
  check_index(e, "excl", R, Cn);
  const double it = read_inv_temp(inv_temp);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "infonce_rect_fwd", [&] {
    out = rect_fwd_impl<scalar_t>(rows, cands, negatives, p.data_ptr<int64_t>(), e.data_ptr<int64_t>(), it,
                                  normalize, with_grad, block);
  });
  return out;
}

// -> [d rows (R, d), d candidates (grad_cols, d), gz (0-dim)], accumulation dtype.
std::vector<at::Tensor> infonce_rect_bwd_cpp(const at::Tensor& w, const at::Tensor& rows_n,
                                             const at::Tensor& cands_n, const at::Tensor& row_norms,
                                             const at::Tensor& cand_norms, const at::Tensor& u, const at::Tensor& lse,
                                             const at::Tensor& pos, const at::Tensor& excl,
                                             const at::Tensor& inv_temp, bool normalize, int64_t grad_cols,
                                             int64_t block) {
  const int64_t R = rows_n.size(0), Cn = cands_n.size(0);
  TORCH_CHECK(rows_n.is_contiguous() && cands_n.is_contiguous() && rows_n.size(1) == cands_n.size(1),
              "rows_n / cands_n: bad saved tensors");
  TORCH_CHECK(rows_n.scalar_type() == at::kFloat || rows_n.scalar_type() == at::kDouble, "rows_n: bad dtype");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == R && w.device().is_cpu(), "w must be a CPU tensor of shape (R,)");
  TORCH_CHECK(lse.is_contiguous() && lse.size(0) == 2 * R, "lse: bad saved tensor (2R: maxima, then log-sums)");
  TORCH_CHECK(u.is_contiguous() && u.dim() == 2 && u.size(1) == rows_n.size(1) &&
                  u.scalar_type() == rows_n.scalar_type(),
              "u: bad saved tensor");
  TORCH_CHECK(u.size(0) == R, "u: the forward ran with with_grad=False, so it saved no U for the backward");
  TORCH_CHECK(grad_cols >= 0 && grad_cols <= Cn, "grad_cols must be in [0, Cn]");
  at::Tensor p = pos.contiguous(), e = excl.contiguous();
  check_index(p, "pos", R, Cn);
  check_index(e, "excl", R, Cn);
  const double it = read_inv_temp(inv_temp);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(rows_n.scalar_type(), "infonce_rect_bwd", [&] {
    out = rect_bwd_impl<scalar_t>(w, rows_n, cands_n, row_norms, cand_norms, u, lse, p.data_ptr<int64_t>(),
                                  e.data_ptr<int64_t>(), it, normalize, grad_cols, block);
  });
  return out;
}

}  // namespace
}  // namespace ssl_fast

TORCH_LIBRARY_FRAGMENT(ssl_fast, m) {
  m.def("infonce_rect_fwd_cpp(Tensor rows, Tensor cands, Tensor? negatives, Tensor pos, Tensor excl, Tensor inv_temp, "
        "bool normalize, bool with_grad, int block) -> Tensor[]");
  m.def("infonce_rect_bwd_cpp(Tensor w, Tensor rows_n, Tensor cands_n, Tensor row_norms, Tensor cand_norms, "
        "Tensor u, Tensor lse, Tensor pos, Tensor excl, Tensor inv_temp, bool normalize, int grad_cols, "
        "int block) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ssl_fast, CPU, m) {
  m.impl("infonce_rect_fwd_cpp", &ssl_fast::infonce_rect_fwd_cpp);
  m.impl("infonce_rect_bwd_cpp", &ssl_fast::infonce_rect_bwd_cpp);
}

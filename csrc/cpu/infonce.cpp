// Fused InfoNCE / NT-Xent on the CPU: tiled logits, fp32 (fp64 for double inputs) log-sum-exp, tiles
// recomputed in the backward; extra memory O(N*D) plus one B x B tile per thread.
//
// NT-Xent (SimCLR). Views x1, x2: (N, D) -> rows x_k of X = [x1; x2], M = 2N, k in [0, M).
//   z_k = x_k / max(|x_k|, eps) (or z_k = x_k when normalize = false), only the first d columns.
//   S = Z Z^T / T (M x M), S_kk = -inf, p(k) = (k + N) mod M,
//   lse_k = logsumexp_j S_kj,  L = (1/M) sum_k (lse_k - S_{k,p(k)}).
// Gradient. With P_kj = exp(S_kj - lse_k) (0 on the diagonal) and Y_kj = [j == p(k)]:
//   dL/dS = (P - Y) / M,  dL/dZ = (dL/dS + dL/dS^T) Z / T
//         = g/(M T) * [ (P + P^T) Z - 2 Z_p ]     (Y is a symmetric permutation, Z_p = rows z_p(k)).
// Symmetry: S is symmetric, so the upper-triangle tile (I, J) gives the row statistics of block I AND
// (by its columns) of block J in the forward, and in the backward A = P_IJ + P_JI^T (two exps of the one
// recomputed tile) feeds dZ_I += A Z_J and dZ_J += A^T Z_I. Cost: forward 0.5 M^2 d multiply-adds,
// backward 1.5 M^2 d (eager code: 1 + 2).
// Cross-view InfoNCE. q, k: (N, D) -> Q, K normalized; S = Q K^T / T; row lse r_i, column lse c_j;
//   L = a/N sum_i (r_i - S_ii) + b/N sum_j (c_j - S_jj) with (a, b) = (1, 0), or (1/2, 1/2) symmetric.
//   dL/dS = a/N (P^row - I) + b/N (P^col - I);  dQ = dL/dS K / T,  dK = dL/dS^T Q / T.
// Normalization backward: dx = (g - z <z, g>) / |x| when |x| > eps, else g / eps.
// Temperature: sum_k <dL/dz_k, z_k> = -c T dL/dT (c = 2 for NT-Xent, 1 cross-view); returned as gz.
//
// Scheduling without atomic updates of results or per-thread copies: tiles are processed in rounds in
// which no two tiles touch the same block of rows (threads take a round's tiles from a shared counter).
// NT-Xent: a round-robin tournament over the nb row blocks (each round a perfect matching of blocks,
// every unordered pair exactly once), then one round of diagonal tiles.
// Cross-view: round r holds the tiles (I, (I + r) mod nb), a Latin square. Results do not depend on the
// number of threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "vec_math.h"

namespace ssl_fast {
namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's eps: a zero row maps to zero, never NaN

// ------------------------------------------------------------------------------------------------
// Row-major GEMM on raw pointers: C = alpha * op(A) op(B) + beta * C.
// Uses the BLAS that torch ships (sgemm_/dgemm_, found at run time) and falls back to at::addmm_out.

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*,
                          const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*,
                          const int*);

// torch loads libtorch_cpu.so with RTLD_LOCAL, so its BLAS is not in the global scope: look there first.
void* torch_symbol(const char* name) {
  static void* handle = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
  void* fn = handle != nullptr ? dlsym(handle, name) : nullptr;
  return fn != nullptr ? fn : dlsym(RTLD_DEFAULT, name);
}

std::atomic<bool> g_use_blas{true};  // false: at::addmm_out for every tile (tested; the portable path)

template <typename T>
void* blas_symbol();
template <>
void* blas_symbol<float>() {
  static void* fn = torch_symbol("sgemm_");
  return g_use_blas.load(std::memory_order_relaxed) ? fn : nullptr;
}
template <>
void* blas_symbol<double>() {
  static void* fn = torch_symbol("dgemm_");
  return g_use_blas.load(std::memory_order_relaxed) ? fn : nullptr;
}

// Every tile GEMM runs with the BLAS single-threaded, on the calling thread of a small round as inside a worker
// of the pool (parallel_tasks): the same tile then takes the same code path whichever thread runs it, and a
// small tile never wakes the BLAS's own thread pool. (Inside an OpenMP region MKL runs one thread anyway; the
// explicit setting also covers the calling thread.)
class SerialBlas {
 public:
  SerialBlas() {
    static auto fn = reinterpret_cast<int (*)(int)>(torch_symbol("MKL_Set_Num_Threads_Local"));
    set_ = fn;
    if (set_ != nullptr) prev_ = set_(1);
  }
  ~SerialBlas() {
    if (set_ != nullptr) set_(prev_);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  int (*set_)(int) = nullptr;
  int prev_ = 0;
};

template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
             int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  void* sym = blas_symbol<T>();
  if (sym != nullptr && k > 0) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T on the same pointers.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int mm = (int)n, nn = (int)m, kk = (int)k, la = (int)ldb, lb = (int)lda, lc = (int)ldc;
    if constexpr (std::is_same_v<T, float>) {
      reinterpret_cast<sgemm_fn>(sym)(&ta, &tb, &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc);
    } else {
      reinterpret_cast<dgemm_fn>(sym)(&ta, &tb, &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc);
    }
    return;
  }
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor ta = trans_a ? at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opts).t()
                          : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  at::Tensor tb = trans_b ? at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts).t()
                          : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  at::Tensor tc = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(tc, tc, ta, tb, beta, alpha);
}


// Online (max, sum of exp) update of one row's statistics with `n` new logits.
template <typename T>
inline void lse_update(T& mx, T& sm, const T* v, int64_t n) {
  T tmax = neg_inf<T>();
#pragma omp simd reduction(max : tmax)
  for (int64_t j = 0; j < n; ++j) tmax = v[j] > tmax ? v[j] : tmax;
  if (tmax == neg_inf<T>()) return;  // every logit masked
  const T newm = tmax > mx ? tmax : mx;
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += vexp(v[j] - newm);
  sm = (mx == neg_inf<T>() ? T(0) : sm * vexp(mx - newm)) + s;
  mx = newm;
}

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

// Forward of one tile: S = it * A B^T (bi x bj, row-major in `S`). Its rows update the row statistics
// (rmx, rsm); its columns, when `cmx` is given, the statistics of the rows of B (buf: 2 * bj values).
// diag: A and B are the same block of Z (NT-Xent), S_aa = -inf and the columns are the rows again.
template <typename acc_t>
void forward_tile(const acc_t* A, const acc_t* Bm, int64_t bi, int64_t bj, int64_t d, acc_t it, bool diag,
                  acc_t* rmx, acc_t* rsm, acc_t* cmx, acc_t* csm, acc_t* S, acc_t* buf) {
  gemm_rm<acc_t>(false, true, bi, bj, d, it, A, d, Bm, d, 0, S, bj);
  for (int64_t a = 0; a < bi; ++a) {
    if (diag) S[a * bj + a] = neg_inf<acc_t>();
    lse_update(rmx[a], rsm[a], S + a * bj, bj);
  }
  if (cmx != nullptr) lse_update_cols(cmx, csm, S, bi, bj, buf);
}

// Backward of one recomputed tile S = it * A B^T: W = wr exp(S - lse_r[a]) + wc exp(S - lse_c[j]) (the row
// and the column softmax of the same logits; wc = 0 skips the second exp), then GA += scale W B and
// GB += scale W^T A. diag (NT-Xent block with itself): W_aa = 0 and, W being symmetric, one GEMM into GA.
template <typename acc_t>
void backward_tile(const acc_t* A, const acc_t* Bm, int64_t bi, int64_t bj, int64_t d, acc_t it, bool diag,
                   const acc_t* lse_r, const acc_t* lse_c, acc_t wr, acc_t wc, acc_t scale, acc_t* GA, acc_t* GB,
                   acc_t* S) {
  gemm_rm<acc_t>(false, true, bi, bj, d, it, A, d, Bm, d, 0, S, bj);
  for (int64_t a = 0; a < bi; ++a) {
    acc_t* row = S + a * bj;
    const acc_t la = lse_r[a];
    if (wc != 0) {
#pragma omp simd
      for (int64_t j = 0; j < bj; ++j) row[j] = wr * vexp(row[j] - la) + wc * vexp(row[j] - lse_c[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < bj; ++j) row[j] = wr * vexp(row[j] - la);
    }
    if (diag) row[a] = 0;
  }
  gemm_rm<acc_t>(false, false, bi, d, bj, scale, S, bj, Bm, d, 1, GA, d);
  if (!diag) gemm_rm<acc_t>(true, false, bj, d, bi, scale, S, bj, A, d, 1, GB, d);
}

// Rows per chunk of the O(rows * d) loops, so that a chunk is worth ~32K values.
int64_t row_grain(int64_t d) { return std::max<int64_t>(64, (int64_t(1) << 15) / std::max<int64_t>(d, 1)); }

// Copies rows [0, rows) of x (row stride `ld`, first d columns) into dst (rows x d, acc type),
// normalized if asked; norms[k] = |x_k| (used by the backward).
template <typename scalar_t, typename acc_t>
void load_rows(const at::Tensor& x, int64_t d, bool normalize, acc_t* dst, acc_t* norms) {
  const scalar_t* src = x.data_ptr<scalar_t>();
  const int64_t ld = x.stride(0);
  at::parallel_for(0, x.size(0), row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const scalar_t* row = src + k * ld;
      acc_t* out = dst + k * d;
      double ss = 0;
      for (int64_t c = 0; c < d; ++c) {
        const acc_t v = static_cast<acc_t>(row[c]);
        out[c] = v;
        ss += (double)v * v;
      }
      const double nrm = std::sqrt(ss);
      norms[k] = (acc_t)nrm;
      if (normalize) {
        const acc_t inv = (acc_t)(1.0 / std::max(nrm, kNormEps));
        for (int64_t c = 0; c < d; ++c) out[c] *= inv;
      }
    }
  });
}

// Writes dx (input dtype, full width D) from the gradient g w.r.t. the normalized rows z; returns
// sum_k <g_k, z_k> for the temperature gradient.
template <typename scalar_t, typename acc_t>
double store_grad(const acc_t* g, const acc_t* z, const acc_t* norms, int64_t rows, int64_t d,
                  bool normalize, at::Tensor& out) {
  scalar_t* dst = out.data_ptr<scalar_t>();
  const int64_t D = out.size(1);
  std::vector<double> dots(rows);
  at::parallel_for(0, rows, row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const acc_t* gk = g + k * d;
      const acc_t* zk = z + k * d;
      double dot = 0;
      for (int64_t c = 0; c < d; ++c) dot += (double)gk[c] * zk[c];
      dots[k] = dot;
      scalar_t* o = dst + k * D;
      if (!normalize) {
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(gk[c]);
      } else if ((double)norms[k] > kNormEps) {
        const acc_t inv = (acc_t)(1.0 / (double)norms[k]);
        const acc_t dd = (acc_t)dot;
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>((gk[c] - zk[c] * dd) * inv);
      } else {
        const acc_t inv = (acc_t)(1.0 / kNormEps);
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(gk[c] * inv);
      }
      for (int64_t c = d; c < D; ++c) o[c] = static_cast<scalar_t>(0);
    }
  });
  double total = 0;
  for (double v : dots) total += v;
  return total;
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

// Runs body(t, scratch) for t in [0, n) on the intra-op threads. Tasks are handed out one at a time from a
// shared counter, so a thread slowed by a busy core does fewer tiles instead of stalling the round; every
// worker owns `scratch_len` values of scratch. Which thread runs a task never changes its result.
// A round worth less than kMinParallelWork multiply-adds runs on the calling thread: waking the pool costs
// more than it saves, and far more when another process holds a core.
constexpr int64_t kMinParallelWork = int64_t(1) << 22;

// Per-worker scratch, 64-byte aligned: a BLAS may pick its code path by the alignment of its operands, so every
// worker's tile buffer has the same alignment (a std::vector's depends on the allocator and the thread).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : p_(static_cast<T*>(std::aligned_alloc(64, std::max<size_t>(64, (n * sizeof(T) + 63) / 64 * 64)))) {
    TORCH_CHECK(p_ != nullptr, "ssl_fast: out of memory for a tile buffer of ", n, " values");
  }
  ~Scratch() { std::free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() const { return p_; }

 private:
  T* p_;
};

template <typename T, typename F>
void parallel_tasks(int64_t n, int64_t scratch_len, int64_t work_per_task, const F& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers =
      n * work_per_task < kMinParallelWork ? 1 : std::min<int64_t>(n, at::get_num_threads());
  if (workers == 1) {
    SerialBlas serial_blas;
    Scratch<T> scratch(scratch_len);
    for (int64_t t = 0; t < n; ++t) body(t, scratch.data());
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    SerialBlas serial_blas;
    Scratch<T> scratch(scratch_len);
    for (int64_t t; (t = next.fetch_add(1)) < n;) body(t, scratch.data());
  });
}

// Rows per tile: 256 (measured best of 64/128/256 at M = 8192, d = 128: the tile and two Z blocks stay in L2 for
// d <= 256; 128 is 6% slower there, 64 16%), halved while there are fewer than 16 row blocks, so that a round
// has work for several threads. It depends on the shape alone, never on the thread count: the tiling fixes
// the order of every sum, so results are bitwise the same with any number of threads.
int64_t pick_block(int64_t rows, int64_t requested) {
  if (requested > 0) return requested;
  int64_t b = 256;
  while (b > 32 && (rows + b - 1) / b < 16) b /= 2;
  return b;
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_view(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, name, " must have shape (N, D)");
  TORCH_CHECK(x.size(1) == 1 || x.stride(1) == 1, name, " must have unit stride along D");
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0, name, " must not be empty");
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

  at::Tensor lse = at::empty({M}, opts);
  acc_t* L = lse.data_ptr<acc_t>();
  std::vector<double> row_loss(M);
  at::parallel_for(0, M, row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      L[k] = mx[k] + std::log(sm[k]);
      const acc_t* zk = Z + k * d;
      const acc_t* zp = Z + ((k + N) % M) * d;
      double pos = 0;
      for (int64_t c = 0; c < d; ++c) pos += (double)zk[c] * zp[c];
      row_loss[k] = (double)L[k] - pos * (double)it;
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
  const acc_t* L = lse.data_ptr<acc_t>();
  at::Tensor gz_t = at::zeros({M, d}, zn.options());
  acc_t* G = gz_t.data_ptr<acc_t>();
  const acc_t it = (acc_t)inv_temp;
  const acc_t coef = (acc_t)(grad * inv_temp / (double)M);  // g / (M T)
  const int64_t B = pick_block(M, block), nb = (M + B - 1) / B;

  for (const auto& pairs : tournament(nb)) {
    parallel_tasks<acc_t>((int64_t)pairs.size(), B * B + 2 * B, B * B * d, [&](int64_t t, acc_t* tile) {
      const int64_t i0 = pairs[t].first * B, j0 = pairs[t].second * B;
      const int64_t bi = std::min(B, M - i0), bj = std::min(B, M - j0);
      backward_tile<acc_t>(Z + i0 * d, Z + j0 * d, bi, bj, d, it, false, L + i0, L + j0, 1, 1, coef, G + i0 * d,
                           G + j0 * d, tile);
    });
  }
  parallel_tasks<acc_t>(nb, B * B + 2 * B, B * B * d, [&](int64_t I, acc_t* tile) {
    const int64_t i0 = I * B, bi = std::min(B, M - i0);
    backward_tile<acc_t>(Z + i0 * d, Z + i0 * d, bi, bi, d, it, true, L + i0, L + i0, 1, 1, coef, G + i0 * d,
                         nullptr, tile);
  });
  // Positive pairs: -2 g/(M T) z_p(k).
  at::parallel_for(0, M, row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const acc_t* zp = Z + ((k + N) % M) * d;
      acc_t* gk = G + k * d;
      for (int64_t c = 0; c < d; ++c) gk[c] -= 2 * coef * zp[c];
    }
  });

  at::Tensor dz1 = at::empty(z1.sizes(), z1.options());
  at::Tensor dz2 = at::empty(z2.sizes(), z2.options());
  const acc_t* nr = norms.data_ptr<acc_t>();
  double gz = store_grad<scalar_t, acc_t>(G, Z, nr, N, d, normalize, dz1);
  gz += store_grad<scalar_t, acc_t>(G + N * d, Z + N * d, nr + N, N, d, normalize, dz2);
  return {dz1, dz2, at::full({}, gz, zn.options())};
}

// ------------------------------------------------------------------------------------------------
// Rectangular InfoNCE: local anchors against global candidates (distributed NT-Xent / InfoNCE, queues of
// negatives, gradient caching). Rows x (R x d) and candidates y (Cn x d), all d columns used (callers
// slice a feature_dim), each row normalized when asked: a_i = x_i / max(|x_i|, eps), c_j likewise.
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

}  // namespace
}  // namespace ssl_fast

#include <torch/library.h>

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

namespace ssl_fast {
namespace {

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
  at::Tensor lse_r = at::empty({N}, opts);
  at::Tensor lse_c = at::empty({symmetric ? N : 0}, opts);
  acc_t* LR = lse_r.data_ptr<acc_t>();
  acc_t* LC = symmetric ? lse_c.data_ptr<acc_t>() : nullptr;
  std::vector<double> row_loss(N);
  at::parallel_for(0, N, row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double pos = 0;
      for (int64_t c = 0; c < d; ++c) pos += (double)Q[i * d + c] * K[i * d + c];
      pos *= (double)it;
      LR[i] = rmx[i] + std::log(rsm[i]);
      if (symmetric) {
        LC[i] = cmx[i] + std::log(csm[i]);
        row_loss[i] = 0.5 * ((double)LR[i] + (double)LC[i]) - pos;
      } else {
        row_loss[i] = (double)LR[i] - pos;
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
      backward_tile<acc_t>(Q + i0 * d, K + j0 * d, bi, bj, d, it, false, LR + i0, symmetric ? LC + j0 : nullptr,
                           cr, cc, it, GQ + i0 * d, GK + j0 * d, tile);
    });
  }
  const acc_t diag = (cr + cc) * it;  // identity targets: -(a + b) g / (N T)
  at::parallel_for(0, N, row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t c = 0; c < d; ++c) {
        GQ[i * d + c] -= diag * K[i * d + c];
        GK[i * d + c] -= diag * Q[i * d + c];
      }
  });
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

// Helpers shared by the fused InfoNCE CPU kernels (csrc/cpu/infonce.cpp: NT-Xent and cross-view InfoNCE;
// csrc/cpu/infonce_rect.cpp: the rectangular op): the tile GEMM on torch's BLAS, the online log-sum-exp
// update, row loads with normalization, the gradient store with the normalization backward, the task
// scheduler over the intra-op threads and the tile size. Everything here is `inline` (or a template) in
// namespace ssl_fast: one definition across the translation units, so the GEMM switch (g_use_blas,
// set_cpu_gemm) is the same variable for every kernel.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "scratch.h"
#include "vec_math.h"

namespace ssl_fast {

inline constexpr double kNormEps = 1e-12;  // F.normalize's eps: a zero row maps to zero, never NaN

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
inline void* torch_symbol(const char* name) {
  static void* handle = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
  void* fn = handle != nullptr ? dlsym(handle, name) : nullptr;
  return fn != nullptr ? fn : dlsym(RTLD_DEFAULT, name);
}

inline std::atomic<bool> g_use_blas{true};  // false: at::addmm_out for every tile (tested; the portable path)

template <typename T>
void* blas_symbol();
template <>
inline void* blas_symbol<float>() {
  static void* fn = torch_symbol("sgemm_");
  return g_use_blas.load(std::memory_order_relaxed) ? fn : nullptr;
}
template <>
inline void* blas_symbol<double>() {
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

// Logits S = it * A B^T (m x n, row-major, ldc = n): the GEMM with alpha = 1, then one multiply per logit.
// MKL's sgemm applies alpha in a way that depends on which operand is A (on 64 x 48 x d normal data, x 1e4, 1/1.5:
// 1039 of 3072 entries of it A B^T and (it B A^T)^T differ at d = 1, 2152 at d = 128), while A B^T and (B A^T)^T
// are bitwise equal: every path that recomputes a logit (the transposed tile of the candidates' gradient, the
// mirror of a symmetric tile) must get the value the forward summed (at |S| ~ 3e9 one fp32 ulp is 256 nats), and
// equal inputs must give equal logits (ties stay ties, as in eager torch).
template <typename T>
void logits_rm(int64_t m, int64_t n, int64_t k, T it, const T* a, int64_t lda, const T* b, int64_t ldb, T* c) {
  gemm_rm<T>(false, true, m, n, k, T(1), a, lda, b, ldb, T(0), c, n);
  const int64_t mn = m * n;
#pragma omp simd
  for (int64_t i = 0; i < mn; ++i) c[i] *= it;
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

// out[c] = acc(row[c]); returns sum_c out[c]^2 in double (a function of restrict rows: it vectorizes).
template <typename scalar_t, typename acc_t>
inline double load_row(const scalar_t* __restrict row, int64_t d, acc_t* __restrict out) {
  double ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t c = 0; c < d; ++c) {
    const acc_t v = static_cast<acc_t>(row[c]);
    out[c] = v;
    ss += (double)v * (double)v;
  }
  return ss;
}

// x[c] = x[c] / den, divided in double
template <typename acc_t>
inline void div_row(acc_t* __restrict x, int64_t d, double den) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) x[c] = (acc_t)((double)x[c] / den);
}

// Rows per chunk of the O(rows * d) loops, so that a chunk is worth ~32K values.
inline int64_t row_grain(int64_t d) { return std::max<int64_t>(64, (int64_t(1) << 15) / std::max<int64_t>(d, 1)); }

// Copies rows [0, rows) of x (row stride `ld`, first d columns) into dst (rows x d, acc type),
// normalized if asked; norms[k] = |x_k| (used by the backward).
template <typename scalar_t, typename acc_t>
void load_rows(const at::Tensor& x, int64_t d, bool normalize, acc_t* dst, acc_t* norms) {
  const scalar_t* src = x.data_ptr<scalar_t>();
  const int64_t ld = x.stride(0);
  at::parallel_for(0, x.size(0), row_grain(d), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const double nrm = std::sqrt(load_row<scalar_t, acc_t>(src + k * ld, d, dst + k * d));
      norms[k] = (acc_t)nrm;
      // divided, not multiplied by a rounded 1/|x|: a 1-D row becomes exactly +-1, and the normalization's
      // gradient g - z <z, g> exactly 0 (else ~eps |g| / |x|)
      if (normalize) div_row<acc_t>(dst + k * d, d, std::max(nrm, kNormEps));
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

// Runs body(t, scratch) for t in [0, n) on the intra-op threads. Tasks are handed out one at a time from a
// shared counter, so a thread slowed by a busy core does fewer tiles instead of stalling the round; every
// worker owns `scratch_len` values of scratch. Which thread runs a task never changes its result.
// A round worth less than kMinParallelWork multiply-adds runs on the calling thread: waking the pool costs
// more than it saves, and far more when another process holds a core.
inline constexpr int64_t kMinParallelWork = int64_t(1) << 22;

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
inline int64_t pick_block(int64_t rows, int64_t requested) {
  if (requested > 0) return requested;
  int64_t b = 256;
  while (b > 32 && (rows + b - 1) / b < 16) b /= 2;
  return b;
}

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_view(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, name, " must have shape (N, D)");
  TORCH_CHECK(x.size(1) == 1 || x.stride(1) == 1, name, " must have unit stride along D");
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0, name, " must not be empty");
}

}  // namespace ssl_fast

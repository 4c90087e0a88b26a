// Scalar math and row helpers shared by the CPU kernels, written so that the compiler vectorizes the loops using them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace ssl_fast {

// exp that vectorizes (Cephes range reduction + degree-6 polynomial, ~2 ulp); exp(-inf) = 0 exactly.
inline float vexp(float x) {
  const bool tiny = x < -87.0f;
  float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float fx = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - fx * 0.693359375f + fx * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  int32_t bits = ((int32_t)fx + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return tiny ? 0.0f : y * scale;
}
inline double vexp(double x) { return std::exp(x); }

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// dst[k] = acc(src[k]) * inv_eps (+ u[k])
template <typename scalar_t, typename acc_t>
inline void load_scaled(const scalar_t* __restrict src, int64_t K, acc_t inv_eps, const acc_t* __restrict u,
                        acc_t* __restrict dst) {
  if (u != nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<acc_t>(src[k]) * inv_eps + u[k];
  } else {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<acc_t>(src[k]) * inv_eps;
  }
}

// In place: x[k] <- exp(x[k] - max x); returns the sum of the exponentials (>= 1).
template <typename acc_t>
inline acc_t exp_shifted(acc_t* __restrict x, int64_t K) {
  acc_t mx = neg_inf<acc_t>();
#pragma omp simd reduction(max : mx)
  for (int64_t k = 0; k < K; ++k) mx = x[k] > mx ? x[k] : mx;
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < K; ++k) {
    const acc_t e = vexp(x[k] - mx);
    x[k] = e;
    sum += e;
  }
  return sum;
}

// One row of Sinkhorn's codes: q[k] = softmax_k(acc(x[k]) * inv_eps + u[k]) (the scalings u from the sweeps).
template <typename scalar_t, typename acc_t>
inline void code_row(const scalar_t* __restrict x, int64_t K, acc_t inv_eps, const acc_t* __restrict u,
                     acc_t* __restrict q) {
  load_scaled<scalar_t, acc_t>(x, K, inv_eps, u, q);
  const acc_t inv = acc_t(1) / exp_shifted<acc_t>(q, K);
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) q[k] *= inv;
}

}  // namespace ssl_fast

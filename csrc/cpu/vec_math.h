// Scalar math helpers shared by the CPU kernels, written so that the compiler vectorizes the loops using them.
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

}  // namespace ssl_fast

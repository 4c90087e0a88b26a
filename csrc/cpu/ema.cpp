// Multi-tensor EMA (teacher) update on the CPU, and the schema of the op ssl_fast::ema_update_.
//
// Math. For every pair (e, o) = (ema[i], online[i]) of the same shape and every element j:
//     e_j <- m e_j + (1 - m) o_j  =  e_j + w (o_j - e_j)  =  o_j - m (o_j - e_j),   w = 1 - m,  m in [0, 1].
// The lerp form is used, with torch.lerp's choice of side: e + w (o - e) when w < 1/2 (every EMA in
// practice), o - m (o - e) otherwise. One subtraction and one multiply-add per element; e_j stays exactly
// e_j when o_j == e_j (a converged teacher does not drift by rounding), m = 1 leaves e unchanged and m = 0
// copies o exactly, and the fp32 result equals torch._foreach_lerp_'s. Both operands are converted to the
// accumulation type A (fp32; fp64 when either tensor is fp64), the update is one rounding of
// e + w (o - e) in A, then one rounding to e's dtype on the store. Compared with the eager pair
// `e.mul_(m); e.add_(o, alpha=1 - m)` in bf16 / fp16, which rounds to the 16-bit type twice per step, the
// 16-bit result here is the correctly rounded fp32 value. w is formed in double from a float momentum
// (1 - 0.996 is exact in double, not in fp32). No gradient: this is an in-place optimizer-like update,
// called under no_grad.
//
// Why it is bandwidth bound. Per element: read e and o, write e = sizeof(E) + sizeof(O) + sizeof(E) bytes
// (fp32/fp32: 12 B; bf16/bf16: 6 B; fp32 EMA of bf16 online weights: 10 B) for 2 flops: 1/6 flop per byte
// at best, far below any CPU's or GPU's flops-per-byte balance point (tens). So the target is the memory
// bandwidth, and the only costs to remove are extra passes (eager mul_ then add_ reads e twice and
// writes it twice: 20 B per fp32 element) and per-tensor overheads (one parallel region per tensor).
//
// Layout of the work. One call gets a list of tensors; they are grouped by (ema dtype, online dtype)
// (csrc/cpu/ema.h). Per group, the tensors are seen as one virtual array of sum(numel) elements (prefix
// offsets); ONE at::parallel_for splits that range evenly over the threads, and each thread walks its
// [begin, end) through the tensors it overlaps (binary search for the first). Inner loop: fp32 / fp64
// operands directly (`omp simd`); fp32 / bf16 mixes in the same single loop with the bf16 conversions
// inlined (bit shifts, round-to-nearest-even on the store); fp16 (and fp64 mixes) in blocks of 256
// elements converted to the accumulation type in L1-resident buffers (fp16: F16C vcvtph2ps / vcvtps2ph when
// the compiler targets it, c10's scalar conversion otherwise), so every loop vectorizes.
// Strided views: see csrc/cpu/ema.h (flat layouts in place, others through a contiguous copy).

#include "ema.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define SSL_FAST_EMA_F16C 1
#endif

namespace ssl_fast {
namespace {

constexpr int64_t kBlock = 256;        // elements per conversion block (2 x 1 KiB of fp32 in L1)
constexpr int64_t kGrain = 1 << 15;    // below 32K elements a group runs on the calling thread

// ---- conversions to / from the accumulation type -------------------------------------------------

template <typename T, typename A>
inline void load(const T* p, A* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<A>(static_cast<float>(p[i]));
}
template <>
inline void load<float, float>(const float* p, float* out, int64_t n) {
  std::memcpy(out, p, n * sizeof(float));
}
template <>
inline void load<double, double>(const double* p, double* out, int64_t n) {
  std::memcpy(out, p, n * sizeof(double));
}
template <>
inline void load<float, double>(const float* p, double* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = p[i];
}
template <>
inline void load<c10::BFloat16, float>(const c10::BFloat16* p, float* out, int64_t n) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(p);
  uint32_t bits[kBlock];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) bits[i] = static_cast<uint32_t>(u[i]) << 16;
  std::memcpy(out, bits, n * sizeof(float));
}
template <>
inline void load<c10::Half, float>(const c10::Half* p, float* out, int64_t n) {
  int64_t i = 0;
#ifdef SSL_FAST_EMA_F16C
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
#endif
  for (; i < n; ++i) out[i] = static_cast<float>(p[i]);
}

template <typename T, typename A>
inline void store(T* p, const A* in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(in[i]);
}
template <>
inline void store<float, float>(float* p, const float* in, int64_t n) {
  std::memcpy(p, in, n * sizeof(float));
}
template <>
inline void store<double, double>(double* p, const double* in, int64_t n) {
  std::memcpy(p, in, n * sizeof(double));
}
template <>
inline void store<c10::BFloat16, float>(c10::BFloat16* p, const float* in, int64_t n) {
  // fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
  uint32_t bits[kBlock];
  std::memcpy(bits, in, n * sizeof(float));
  uint16_t* u = reinterpret_cast<uint16_t*>(p);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t x = bits[i];
    const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    u[i] = static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
  }
}
template <>
inline void store<c10::Half, float>(c10::Half* p, const float* in, int64_t n) {
  int64_t i = 0;
#ifdef SSL_FAST_EMA_F16C
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) p[i] = static_cast<c10::Half>(in[i]);
}

// ---- fused fp32 / bf16 path: conversions inside the one vectorized loop (no L1 round trips) --------

template <typename T>
struct Raw {
  using type = T;
};
template <>
struct Raw<c10::BFloat16> {
  using type = uint16_t;
};

inline float to_f(float x) { return x; }
inline float to_f(uint16_t bf16_bits) { return __builtin_bit_cast(float, static_cast<uint32_t>(bf16_bits) << 16); }
inline void from_f(float& dst, float v) { dst = v; }
inline void from_f(uint16_t& dst, float v) {  // round to nearest even; NaN stays a quiet NaN
  const uint32_t x = __builtin_bit_cast(uint32_t, v);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  dst = static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

template <typename T>
constexpr bool kFusable = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

template <bool FROM_E, typename RE, typename RO>
inline void lerp_fused(RE* __restrict e, const RO* __restrict o, int64_t n, float w, float m) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float a = to_f(e[i]);
    const float b = to_f(o[i]);
    from_f(e[i], FROM_E ? a + w * (b - a) : b - m * (b - a));
  }
}

// ---- one contiguous span ---------------------------------------------------------------------------

// e <- e + w (o - e) (FROM_E: w < 1/2) or o - m (o - e) (otherwise), over n contiguous elements.
template <bool FROM_E, typename A>
inline void lerp_acc(A* __restrict e, const A* __restrict o, int64_t n, A w, A m) {
  if constexpr (FROM_E) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) e[i] = e[i] + w * (o[i] - e[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) e[i] = o[i] - m * (o[i] - e[i]);
  }
}

template <bool FROM_E, typename E, typename O, typename A>
inline void lerp_span(E* e, const O* o, int64_t n, A w, A m) {
  if constexpr (std::is_same_v<E, A> && std::is_same_v<O, A>) {
    lerp_acc<FROM_E, A>(e, o, n, w, m);
  } else if constexpr (std::is_same_v<A, float> && kFusable<E> && kFusable<O>) {
    lerp_fused<FROM_E>(reinterpret_cast<typename Raw<E>::type*>(e), reinterpret_cast<const typename Raw<O>::type*>(o),
                       n, w, m);
  } else {
    alignas(64) A eb[kBlock];
    alignas(64) A ob[kBlock];
    for (int64_t s = 0; s < n; s += kBlock) {
      const int64_t len = std::min(kBlock, n - s);
      load<E, A>(e + s, eb, len);
      load<O, A>(o + s, ob, len);
      lerp_acc<FROM_E, A>(eb, ob, len, w, m);
      store<E, A>(e + s, eb, len);
    }
  }
}

// ---- one group: one parallel region over the concatenation of its tensors ------------------------

template <typename E, typename O>
void run_group(const ema::Group& g, double momentum) {
  using A = std::conditional_t<std::is_same_v<E, double> || std::is_same_v<O, double>, double, float>;
  const size_t n = g.pairs.size();
  std::vector<int64_t> offs(n + 1, 0);
  std::vector<E*> ep(n);
  std::vector<const O*> op(n);
  for (size_t i = 0; i < n; ++i) {
    ep[i] = static_cast<E*>(ema::flat_begin(g.pairs[i].ema_work));
    op[i] = static_cast<const O*>(ema::flat_begin(g.pairs[i].online_work));
    offs[i + 1] = offs[i] + g.pairs[i].ema_work.numel();
  }
  const A w = static_cast<A>(1.0 - momentum);
  const A m = static_cast<A>(momentum);
  const bool from_e = w < A(0.5);
  at::parallel_for(0, offs[n], kGrain, [&](int64_t begin, int64_t end) {
    size_t t = static_cast<size_t>(std::upper_bound(offs.begin(), offs.end(), begin) - offs.begin()) - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offs[t + 1]);
      const int64_t off = begin - offs[t];
      if (from_e) {
        lerp_span<true, E, O, A>(ep[t] + off, op[t] + off, stop - begin, w, m);
      } else {
        lerp_span<false, E, O, A>(ep[t] + off, op[t] + off, stop - begin, w, m);
      }
      begin = stop;
      ++t;
    }
  });
}

template <typename E>
void dispatch_online(const ema::Group& g, double m) {
  switch (g.online_dtype) {
    case at::kFloat: return run_group<E, float>(g, m);
    case at::kDouble: return run_group<E, double>(g, m);
    case at::kBFloat16: return run_group<E, c10::BFloat16>(g, m);
    case at::kHalf: return run_group<E, c10::Half>(g, m);
    default: TORCH_CHECK_TYPE(false, "online_tensors: unsupported dtype ", g.online_dtype);
  }
}

void dispatch(const ema::Group& g, double m) {
  switch (g.ema_dtype) {
    case at::kFloat: return dispatch_online<float>(g, m);
    case at::kDouble: return dispatch_online<double>(g, m);
    case at::kBFloat16: return dispatch_online<c10::BFloat16>(g, m);
    case at::kHalf: return dispatch_online<c10::Half>(g, m);
    default: TORCH_CHECK_TYPE(false, "ema_tensors: unsupported dtype ", g.ema_dtype);
  }
}

void ema_update_cpu(at::TensorList ema, at::TensorList online, double momentum,
                    const c10::optional<at::Tensor>& momentum_tensor) {
  ema::check_lists(ema, online, momentum, momentum_tensor);
  double m = momentum;
  if (momentum_tensor.has_value() && momentum_tensor->defined()) {
    m = momentum_tensor->item<double>();  // a CPU scalar: no device synchronization
    TORCH_CHECK_VALUE(m >= 0.0 && m <= 1.0, "momentum must be in [0, 1], got ", m);
  }
  for (const at::Tensor& e : ema)
    TORCH_CHECK_VALUE(e.device().is_cpu(), "ema_tensors: the CPU kernel got a tensor on ", e.device());
  const std::vector<ema::Group> groups = ema::make_groups(ema, online);
  for (const ema::Group& g : groups) dispatch(g, m);
  ema::copy_back(groups);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssl_fast, m) {
  m.def("ema_update_(Tensor(a!)[] ema, Tensor[] online, float momentum, Tensor? momentum_tensor) -> ()");
}

TORCH_LIBRARY_IMPL(ssl_fast, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace ssl_fast

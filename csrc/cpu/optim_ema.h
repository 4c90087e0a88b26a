// Shared by csrc/cpu/optim_ema.cpp and csrc/cuda/optim_ema.cu: the per-element math of the fused optimizer
// step + EMA (derived in csrc/cpu/optim_ema.cpp), argument checks, and the layout / dtype grouping of the
// tensor lists (built on csrc/cpu/ema.h's flat-layout rule).
//
// Every function of the math takes and returns fp32 values; `Round<T>` is the rounding to the parameters'
// dtype T that torch.optim's foreach path applies when it materializes an intermediate tensor (identity for
// fp32, round-to-nearest-even to bf16 for bf16 parameters). The arithmetic goes through op_* helpers: on the
// host plain operators (the .cpp is compiled with -ffp-contract=off, so nothing is fused behind our back) and
// std::fma where torch fuses; on the device the _rn intrinsics, which --use_fast_math leaves exact.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SSL_FAST_HD __host__ __device__ __forceinline__
#else
#define SSL_FAST_HD inline
#endif

#ifndef __CUDACC_RTC__
#include "ema.h"
#endif

namespace ssl_fast {
namespace optim_ema {

// ---- exact fp32 arithmetic -------------------------------------------------------------------------

SSL_FAST_HD float op_mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SSL_FAST_HD float op_add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
SSL_FAST_HD float op_sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
SSL_FAST_HD float op_div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
SSL_FAST_HD float op_fma(float a, float b, float c) {  // a * b + c, one rounding
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}
SSL_FAST_HD float op_sqrt(float a) {  // correctly rounded
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

// ---- bf16 <-> fp32 (bf16 held as its raw uint16_t bits) -----------------------------------------------

SSL_FAST_HD uint32_t f2u(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}
SSL_FAST_HD float u2f(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}
SSL_FAST_HD float to_f(float x) { return x; }
SSL_FAST_HD float to_f(uint16_t bits) { return u2f(static_cast<uint32_t>(bits) << 16); }
// The fp32 bit pattern of v rounded to bf16, round to nearest even (low 16 bits zero); NaN stays a quiet NaN.
// All in 32-bit lanes: the CPU loops using it vectorize (a uint16 round trip in registers would not).
SSL_FAST_HD uint32_t bf16_round32(float v) {
  const uint32_t x = f2u(v);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) & 0xffff0000u;
  return (x & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : rounded;
}
SSL_FAST_HD uint16_t bf16_bits(float v) { return static_cast<uint16_t>(bf16_round32(v) >> 16); }
SSL_FAST_HD void from_f(float& dst, float v) { dst = v; }
SSL_FAST_HD void from_f(uint16_t& dst, float v) { dst = bf16_bits(v); }

// Round<T>: the rounding applied to the intermediate results of the math for parameters of dtype T. The
// identity for every T: the math runs in fp32 (ATen's opmath type) and a bf16 result is rounded to nearest
// even only where it is stored (from_f), as torch's fused=True kernels do (one rounding per stored value
// instead of one per foreach op: cheaper and closer to the exact step than torch's foreach bf16 path).
// Kept as a parameter of the math functions so that one place states it.
template <typename T>
struct Round {
  SSL_FAST_HD float operator()(float v) const { return v; }
};

// The fp32 value of v once stored as a T: what the EMA of a bf16 parameter follows (the stored weight).
template <typename T>
SSL_FAST_HD float stored(float v) { return v; }
template <>
SSL_FAST_HD float stored<uint16_t>(float v) { return u2f(bf16_round32(v)); }

// sel(c, a, b) = c ? a : b for a loop-invariant c. On the host as a bit mask: GCC's vectorizer gives up on a
// bool select in loops that mix 16-bit and 32-bit lanes (bf16 parameters), and loses 10x there.
SSL_FAST_HD float sel(bool c, float a, float b) {
#ifdef __CUDA_ARCH__
  return c ? a : b;
#else
  const uint32_t m = c ? 0xffffffffu : 0u;
  return u2f((f2u(a) & m) | (f2u(b) & ~m));
#endif
}

// ---- the EMA (torch.lerp with a scalar weight w = 1 - m, as torch._foreach_lerp_) ---------------------

struct LerpC {
  float w;            // fp32(1 - m), m formed in double
  float one_minus_w;  // 1 - w in fp32 (torch's other side)
  bool small;         // |w| < 1/2
};
// e + w (o - e) when |w| < 1/2, else o - (1 - w)(o - e): ATen's vec::fmadd / vec::fnmadd, one rounding.
SSL_FAST_HD float lerp(float e, float o, const LerpC& c) {
  const float d = op_sub(o, e);
  return op_fma(sel(c.small, c.w, -c.one_minus_w), d, sel(c.small, e, o));
}

// ---- SGD (torch.optim.SGD, foreach) -------------------------------------------------------------------

struct SgdC {
  float wd;        // alpha of grads + wd * params
  float mom_mul;   // buf.mul_(momentum)
  float damp;      // alpha 1 - dampening of buf + (1 - d) g
  float mom_alpha; // alpha of g + momentum * buf (nesterov)
  float neg_lr;    // alpha -lr of params + (-lr) g
  bool has_wd, has_mom, nesterov;
};
// One element: p, g, b (momentum buffer) as fp32 values of T; returns the new p, updates b.
template <typename R>
SSL_FAST_HD float sgd_elem(float p, float g, float& b, bool fresh, const SgdC& c, R r) {
  g = sel(c.has_wd, r(op_fma(p, c.wd, g)), g);
  b = sel(fresh, g, r(op_fma(g, c.damp, r(op_mul(b, c.mom_mul)))));
  g = sel(c.has_mom, sel(c.nesterov, r(op_fma(b, c.mom_alpha, g)), b), g);
  return r(op_fma(g, c.neg_lr, p));
}

// ---- LARS (ssl_fast.train.optim.LARS, foreach) -------------------------------------------------------

struct LarsC {
  float wd;       // alpha of grads + wd * params
  float mom_mul;  // buf.mul_(momentum)
  float neg_lr;   // alpha -lr
  bool has_wd, adapt;
};
template <typename R>
SSL_FAST_HD float lars_grad(float p, float g, const LarsC& c, R r) {  // g + wd p (the gradient the norm sees)
  return sel(c.has_wd, r(op_fma(p, c.wd, g)), g);
}
template <typename R>
SSL_FAST_HD float lars_elem(float p, float g, float& b, float trust, const LarsC& c, R r) {
  g = lars_grad(p, g, c, r);
  g = sel(c.adapt, r(op_mul(g, trust)), g);
  b = r(op_add(r(op_mul(b, c.mom_mul)), g));
  return r(op_fma(b, c.neg_lr, p));
}

// ---- AdamW (torch.optim.AdamW, foreach) --------------------------------------------------------------

struct AdamC {
  float decay;         // params.mul_(1 - lr * wd)
  float w1;            // exp_avg.lerp_(g, 1 - beta1)
  float one_minus_w1;  // 1 - w1 in fp32
  float b2;            // exp_avg_sq.mul_(beta2)
  float c2;            // addcmul_ value 1 - beta2
  float eps;
  bool has_wd, w1_small;
};
// The decoupled weight decay of p (it does not enter the moments).
template <typename R>
SSL_FAST_HD float adam_decay(float p, const AdamC& c, R r) {
  return sel(c.has_wd, r(op_mul(p, c.decay)), p);
}
// The new moments m and v; the caller takes sqrt(v) rounded to T (see adam_finish).
template <typename R>
SSL_FAST_HD void adam_moments(float g, float& m, float& v, const AdamC& c, R r) {
  const float d = op_sub(g, m);
  m = r(op_fma(sel(c.w1_small, c.w1, -c.one_minus_w1), d, sel(c.w1_small, m, g)));
  v = r(op_mul(v, c.b2));
  v = r(op_fma(op_mul(c.c2, g), g, v));
}
// Second half, from s = sqrt(v) rounded to T: ((s / bc2_sqrt) + eps), then p + (step_size * m) / denom.
template <typename R>
SSL_FAST_HD float adam_finish(float p, float m, float s, float step_size, float bc2_sqrt, const AdamC& c, R r) {
  const float den = r(op_add(r(op_div(s, bc2_sqrt)), c.eps));
  return r(op_add(p, op_div(op_mul(step_size, m), den)));
}

#ifndef __CUDACC_RTC__
// ---- host side: argument checks and work lists ------------------------------------------------------

enum class Kind { kSgd, kAdamW, kLars };

// One parameter's tensors, all walked as flat arrays in one element order (the parameter's if it is flat,
// else a contiguous copy's). Undefined tensors are absent (no state / no EMA partner).
struct Item {
  at::Tensor p, g, s1, s2, e;
  int64_t index;  // position in the caller's lists (per-tensor scalars)
};

struct Group {
  at::ScalarType pdt;
  at::ScalarType edt;  // Undefined: these parameters have no EMA partner
  std::vector<Item> items;
};

struct WorkLists {
  std::vector<Group> groups;
  std::vector<std::pair<at::Tensor, at::Tensor>> backs;  // (caller's tensor, work copy) to copy back
  void copy_back() const {
    for (const auto& b : backs) b.first.copy_(b.second);
  }
};

// `t` walkable in `ref`'s element order: itself when the layouts agree, else a copy in ref's layout (written
// back afterwards when `writable`).
inline at::Tensor fit_layout(const at::Tensor& t, const at::Tensor& ref, bool writable, WorkLists& w) {
  if ((t.is_contiguous() && ref.is_contiguous()) || (t.strides() == ref.strides() && ema::is_flat(t))) return t;
  at::Tensor c = at::empty_strided(ref.sizes(), ref.strides(), t.options());
  c.copy_(t);
  if (writable) w.backs.emplace_back(t, c);
  return c;
}

inline const char* state_name(Kind k, int which) {
  if (k == Kind::kAdamW) return which == 1 ? "exp_avgs" : "exp_avg_sqs";
  return "momentum_buffers";
}

// Checks every list (nothing is written when one fails), then builds the groups:
// (param dtype, ema dtype or Undefined) -> items. s1 / s2 may be empty lists (no state of that kind).
inline WorkLists make_work(Kind kind, at::TensorList params, at::TensorList grads, at::TensorList s1,
                           at::TensorList s2, at::TensorList ema, bool allow_bf16_ema) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n, "grads must have one tensor per parameter: got ", grads.size(),
                    " grads for ", n, " params");
  TORCH_CHECK_VALUE(s1.empty() || s1.size() == n, state_name(kind, 1), " must be empty or have one tensor per "
                    "parameter: got ", s1.size(), " for ", n, " params");
  TORCH_CHECK_VALUE(s2.empty() || s2.size() == n, state_name(kind, 2), " must be empty or have one tensor per "
                    "parameter: got ", s2.size(), " for ", n, " params");
  TORCH_CHECK_VALUE(ema.size() <= n, "ema must pair with the first params: got ", ema.size(), " ema tensors for ",
                    n, " params");
  const at::Device dev = n ? params[0].device() : at::Device(at::kCPU);
  auto same = [&](const at::Tensor& t, const char* name, size_t i, const at::Tensor& p, bool dtype_too) {
    TORCH_CHECK_VALUE(t.defined(), name, "[", i, "] is an undefined tensor");
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, name, "[", i, "] must be a dense (strided) tensor, got ",
                      t.layout(), " (sparse gradients are not supported)");
    TORCH_CHECK_VALUE(t.sizes() == p.sizes(), name, "[", i, "] must have the shape of params[", i, "], got ",
                      t.sizes(), " and ", p.sizes());
    TORCH_CHECK_VALUE(t.device() == dev, name, "[", i, "] is on ", t.device(), " but params[0] is on ", dev,
                      " (one device per call)");
    if (dtype_too)
      TORCH_CHECK_TYPE(t.scalar_type() == p.scalar_type(), name, "[", i, "] must have the dtype of params[", i,
                       "] (", p.scalar_type(), "), got ", t.scalar_type());
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.defined(), "params[", i, "] is an undefined tensor");
    TORCH_CHECK_TYPE(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16, "params[", i,
                     "] must be float32 or bfloat16 for this kernel, got ", p.scalar_type());
    TORCH_CHECK_VALUE(p.layout() == at::kStrided, "params[", i, "] must be a dense (strided) tensor");
    TORCH_CHECK_VALUE(p.device() == dev, "params[", i, "] is on ", p.device(), " but params[0] is on ", dev,
                      " (one device per call)");
    same(grads[i], "grads", i, p, true);
    if (!s1.empty()) same(s1[i], state_name(kind, 1), i, p, true);
    if (!s2.empty()) same(s2[i], state_name(kind, 2), i, p, true);
    if (i < ema.size()) {
      same(ema[i], "ema", i, p, false);
      const auto et = ema[i].scalar_type();
      TORCH_CHECK_TYPE(et == at::kFloat || (allow_bf16_ema && et == p.scalar_type()), "ema[", i,
                       "] must be float32 or the dtype of params[", i, "] (", p.scalar_type(), "), got ", et);
    }
  }
  WorkLists w;
  std::vector<std::pair<std::pair<int, int>, size_t>> index;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    Item it;
    it.index = static_cast<int64_t>(i);
    if (ema::is_flat(p)) {
      it.p = p;
    } else {
      it.p = p.contiguous();
      w.backs.emplace_back(p, it.p);
    }
    it.g = fit_layout(grads[i], it.p, false, w);
    if (!s1.empty()) it.s1 = fit_layout(s1[i], it.p, true, w);
    if (!s2.empty()) it.s2 = fit_layout(s2[i], it.p, true, w);
    if (i < ema.size()) it.e = fit_layout(ema[i], it.p, true, w);
    const auto key = std::make_pair(static_cast<int>(p.scalar_type()),
                                    it.e.defined() ? static_cast<int>(it.e.scalar_type()) : -1);
    size_t gi = w.groups.size();
    for (const auto& kv : index)
      if (kv.first == key) gi = kv.second;
    if (gi == w.groups.size()) {
      index.emplace_back(key, gi);
      w.groups.push_back(Group{p.scalar_type(), it.e.defined() ? it.e.scalar_type() : at::ScalarType::Undefined, {}});
    }
    w.groups[gi].items.push_back(std::move(it));
  }
  return w;
}

// The EMA weight from the float momentum or the optional 0-dim tensor (read on the host by the CPU kernel).
inline LerpC lerp_consts(double m) {
  LerpC c;
  c.w = static_cast<float>(1.0 - m);
  c.one_minus_w = 1.0f - c.w;
  c.small = std::fabs(c.w) < 0.5f;
  return c;
}

inline void check_momentum(double m, const char* name) {
  TORCH_CHECK_VALUE(m >= 0.0 && m <= 1.0, name, " must be in [0, 1], got ", m);
}

// Scalars: fp32 (ATen's opmath type) for every parameter dtype, as torch's fused=True kernels take them.
// (torch's foreach bf16 path rounds an add's alpha and an in-place mul_'s scalar to bf16 too: lr 0.03 acts
// as 0.030029296875 there; the bf16 math here does not emulate that.)
inline float alpha_of(double x, at::ScalarType) { return static_cast<float>(x); }

inline SgdC sgd_consts(at::ScalarType pdt, double lr, double momentum, double dampening, double wd, bool nesterov) {
  SgdC c;
  c.wd = alpha_of(wd, pdt);
  c.mom_mul = alpha_of(momentum, pdt);
  c.damp = alpha_of(1.0 - dampening, pdt);
  c.mom_alpha = alpha_of(momentum, pdt);
  c.neg_lr = alpha_of(-lr, pdt);
  c.has_wd = wd != 0.0;
  c.has_mom = momentum != 0.0;
  c.nesterov = nesterov;
  return c;
}

inline LarsC lars_consts(at::ScalarType pdt, double lr, double momentum, double wd, bool adapt) {
  LarsC c;
  c.wd = alpha_of(wd, pdt);
  c.mom_mul = alpha_of(momentum, pdt);
  c.neg_lr = alpha_of(-lr, pdt);
  c.has_wd = wd != 0.0;
  c.adapt = adapt;
  return c;
}

inline AdamC adam_consts(at::ScalarType pdt, double lr, double beta1, double beta2, double eps, double wd) {
  AdamC c;
  c.decay = alpha_of(1.0 - lr * wd, pdt);
  c.w1 = static_cast<float>(1.0 - beta1);
  c.one_minus_w1 = 1.0f - c.w1;
  c.w1_small = std::fabs(c.w1) < 0.5f;
  c.b2 = alpha_of(beta2, pdt);
  c.c2 = static_cast<float>(1.0 - beta2);
  c.eps = static_cast<float>(eps);
  c.has_wd = wd != 0.0;
  return c;
}

// Per-tensor AdamW scalars, as torch.optim's foreach path forms them in Python (doubles, C pow):
// step_size = -(lr / (1 - beta1^t)), bc2_sqrt = (1 - beta2^t)^0.5.
inline void adam_step_scalars(double lr, double beta1, double beta2, double step, float& step_size, float& bc2_sqrt) {
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  step_size = static_cast<float>((lr / bc1) * -1.0);
  bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));
}

// LARS trust ratio from the two norms, as ssl_fast.train.optim.LARS computes it with tensors of the
// parameters' dtype: where(||w|| > 0 and ||g|| > 0, (eta * ||w||) / ||g||, 1), each op rounded to T.
template <typename R>
inline float lars_trust(double w_sq, double g_sq, double eta, R r) {
  const float wn = r(static_cast<float>(std::sqrt(w_sq)));
  const float gn = r(static_cast<float>(std::sqrt(g_sq)));
  if (!(wn > 0.0f && gn > 0.0f)) return 1.0f;
  return r(op_div(r(op_mul(static_cast<float>(eta), wn)), gn));
}
#endif  // __CUDACC_RTC__

}  // namespace optim_ema
}  // namespace ssl_fast

// The optimizer step fused with the EMA (teacher) update on the CPU, and the schemas of the three ops
//   ssl_fast::sgd_ema_step_, ssl_fast::adamw_ema_step_, ssl_fast::lars_ema_step_.
//
// What one call does. For one parameter group (one lr / weight decay), for every parameter p_i with gradient
// g_i and optimizer state, one optimizer step; for the first len(ema) parameters, which have a teacher
// partner e_i, the EMA e_i <- lerp(e_i, p_i_new, 1 - m) of the NEW online value, in the same pass: every
// element of p, g, the states and e is read once and written once. The unfused sequence
// (optimizer.step(), then ema_update_ / torch._foreach_lerp_) reads p twice and writes it once more.
//
// ---- Math, per element, with every rounding (fp32 parameters) -----------------------------------------
// fl(x) rounds to fp32; fma(a, b, c) = fl(a b + c) with one rounding. Scalars from Python doubles become
// fp32 (ATen's opmath type): s_f = fl(s). The sequences below are what torch.optim's foreach path (the
// default on CPU) computes, op by op; which ops torch fuses into an FMA was determined empirically (ATen's
// AVX2 / AVX512 kernels: vec::fmadd, and GCC contracts the scalar tails of the same kernels): an add with
// alpha a + alpha b is fma(b, alpha, a); addcmul a + v b c is fma(fl(v b), c, a); lerp is
// fma(w, e1 - e0, e0) (|w| < 1/2) or fma(-(1 - w), e1 - e0, e1); mul by a scalar, add of a scalar,
// division and addcdiv a + fl(fl(v b) / c) are separate roundings. Verified bitwise against torch 2.14 on
// 1, 7, 33 and 1000003 elements, fp32, AVX512 and ATEN_CPU_CAPABILITY=avx2 (tests/test_optim_ema.py runs it
// on the installed torch). ATEN_CPU_CAPABILITY=default has no FMA in torch's kernels: no bitwise parity there.
//
// SGD (lr, momentum mu, dampening d, weight decay wd, nesterov), momentum buffer b:
//   g1 = wd != 0 ? fma(p, wd_f, g) : g                  torch._foreach_add(grads, params, alpha=wd)
//   b  = first step ? g1                                buf = clone(g1)
//                   : fma(g1, fl(1 - d), fl(b mu_f))    _foreach_mul_(bufs, mu); _foreach_add_(bufs, g1, alpha=1-d)
//   g2 = nesterov ? fma(b, mu_f, g1) : b                _foreach_add_(g1, bufs, alpha=mu)
//   p  = fma(g2, fl(-lr), p)                            _foreach_add_(params, g2, alpha=-lr)
//   (mu = 0: no buffer, g2 = g1.) torch.optim.SGD(fused=True) computes the same sequence (its vector loop
//   uses vec::fmadd for every step): measured bitwise equal to foreach in its vector loop; its scalar tail
//   (the last n mod 16 elements, written buf * mu + g * (1 - d) and p -= g * lr) differs by an ulp in rare
//   elements.
// AdamW (lr, beta1, beta2, eps, wd; per tensor its step t after the increment), moments m, v:
//   p  = wd != 0 ? fl(p fl(1 - lr wd)) : p              _foreach_mul_(params, 1 - lr*wd)
//   m  = lerp(m, g, w1), w1 = fl(1 - beta1)             _foreach_lerp_(exp_avgs, grads, 1 - beta1)
//   v  = fma(fl(c2 g), g, fl(v b2_f)), c2 = fl(1-beta2) _foreach_mul_(v, beta2); _foreach_addcmul_(v, g, g, 1-beta2)
//   s  = sqrt(v)                                        _foreach_sqrt: ATen's vml::vsqrt, i.e. MKL's vmsSqrt
//                                                       (mode HA) where torch has MKL. It is NOT correctly rounded
//                                                       (on this AMD EPYC 17% of results differ from fl(sqrt)), so
//                                                       this kernel calls the same MKL function on blocks of 2048
//                                                       (ieee_sqrt=false: bitwise foreach), or takes the correctly
//                                                       rounded sqrt (ieee_sqrt=true, the Python API's default:
//                                                       fused=True's and CUDA's; faster here, since MKL's HA sqrt
//                                                       costs ~0.4 ns / element on this CPU).
//   den = fl(fl(s / fl(bc2)) + eps_f), bc2 = (1 - beta2^t)^0.5 (Python double)
//   p  = fl(p + fl(fl(ss m) / den)), ss = fl(-(lr / (1 - beta1^t)))   _foreach_addcdiv_(params, m, den, ss)
//   torch.optim.AdamW(fused=True) writes v = v b2 + c2 g g as one expression and its scalar tail in other
//   statements, but as compiled (torch 2.14, GCC) both round as above; what differs is the sqrt: fused=True
//   takes the correctly rounded one. So foreach and fused=True differ by one rounding of the sqrt (~17% of
//   the denominators on this AMD EPYC, 0.05-0.2% of the weights by 1 ulp), and this kernel with
//   ieee_sqrt=true reproduces fused=True bitwise (measured on 1, 7, 33, 8385, 1000003 elements, 5 steps).
//   Measured on ViT-B/16-like shapes (4.9M weights, 5 steps, lr 1e-3): MKL's sqrt differs from the correctly
//   rounded one in 16.5% of 1M inputs (by 1 ulp); ieee_sqrt=true vs foreach: 0.26% of the weights differ,
//   by at most 4.6e-8 of the largest weight (under an fp32 ulp of the scale; near-zero weights show large
//   ulp counts); vs fused=True: none. The MKL path costs ~2x the IEEE one on this AMD EPYC (ViT-B/16, 1
//   thread: 135 vs 63 ms under load), since vmsSqrt runs as a separate call per 8 KiB block.
// LARS (ssl_fast.train.optim.LARS: lr, momentum mu, wd, eta; `adapt` false for biases and norms):
//   g1 = wd != 0 ? fma(p, wd_f, g) : g
//   trust = ||p|| > 0 and ||g1|| > 0 ? fl(fl(eta_f ||p||) / ||g1||) : 1   (norms: see below)
//   g2 = adapt ? fl(g1 trust) : g1
//   b  = fl(fl(b mu_f) + g2)                            buffers start at zero: the first step gives b = g2
//   p  = fma(b, fl(-lr), p)
// EMA of the new p with teacher momentum m (w = fl(1 - m), 1 - m formed in double), as torch._foreach_lerp_:
//   e  = |w| < 1/2 ? fma(w, p - e, e) : fma(-fl(1 - w), p - e, p)   (e and p fp32: e fp32, p rounded to T)
//
// bf16 parameters (grads and states bf16, the EMA fp32 or bf16): torch.optim's fused=True semantics, not
// foreach's. The sequences above run in fp32 on the bf16 values widened to fp32, with fp32 scalars, and
// each stored result (p, the states) is rounded to bf16 once, to nearest even (Round<T> is the identity,
// from_f rounds; the sqrt and the LARS norms stay fp32); the EMA follows the STORED bf16 parameter (its fp32
// value; an fp32 EMA takes one rounding, as ema_update_ / _foreach_lerp_ on p.float()). torch's foreach
// path instead rounds every tensor it materializes to bf16 and some scalars too (an add's alpha and an
// in-place _foreach_mul_'s scalar: lr 0.03 acts as 0.030029296875; 1 - lr wd = 1 - 1e-5 is 1 in bf16, so
// foreach AdamW's decoupled decay does nothing to bf16 weights). One rounding per stored value is closer to
// the exact step (tests: the error against float64 torch.optim is <= 2x foreach's, and the params agree
// with torch's fused=True to one bf16 ulp in rare elements, where GCC and ATen contract a product into an
// FMA differently), and it is cheaper: the foreach emulation's four to seven roundings per element made
// the bf16 loop compute bound (SGD + EMA 0.86 ns / element with the data in L2, 1.04 from DRAM on this AMD
// EPYC at 1 thread; now 0.49 and ~0.4-0.6: the memory streams' pace).
//
// LARS norms. The trust ratio needs ||p|| and ||g1|| of every tensor before its update: a first pass over
// p and g reads them (8 B / element for fp32) and sums squares in fp64 over fixed blocks of kNormBlock
// elements per tensor (in parallel over the blocks), then adds each tensor's block sums in block order: the
// result depends on the shapes only, never on the thread count. torch._foreach_norm sums in fp32 in its own
// order, so the trust ratio may differ from the unfused LARS's in the last bits, and so the step: the one
// optimizer here without bitwise parity in fp32 (tests state the bound).
//
// ---- Bandwidth (the kernel streams memory; per element, fp32 / bf16 weights with an fp32 EMA) ---------
//   fused SGD+momentum+EMA: read p g b e, write p b e = 28 B (bf16: 18 B); torch foreach SGD + lerp with
//   weight decay: 56 B (add 12, mul_ 8, add_ 12, add_ 12, lerp 12) plus a fresh allocation of g1; fused=True
//   SGD + lerp: 32 B. AdamW+EMA: 36 B (bf16: 22 B) against foreach ~88 B, fused=True + lerp 40 B.
//   LARS+EMA: 36 B (norm pass 8 B + 28 B) against 72 B.
//
// Layout of the work: the tensors are grouped by (parameter dtype, EMA dtype or none); per group ONE
// at::parallel_for over the concatenation of its tensors (each thread walks its [begin, end) through the
// tensors it overlaps), as csrc/cpu/ema.cpp. Elementwise: the result does not depend on the thread count.
// Flat layouts (any dense stride order) are walked in storage order; a parameter with gaps goes through a
// contiguous copy, written back; a gradient / state / EMA tensor whose layout differs from its parameter's
// is copied into that layout (csrc/cpu/optim_ema.h).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ema.h"

// Every rounding above is explicit: no contraction of a * b + c into an FMA unless written as op_fma.
#pragma GCC optimize("fp-contract=off")

#include "optim_ema.h"

#include <algorithm>
#include <vector>

// MKL's vector sqrt as ATen calls it (torch's libtorch_cpu exports it when built with MKL); weak: absent
// in builds without MKL, where torch's sqrt is the correctly rounded one.
extern "C" void vmsSqrt_64(long long n, const float* a, float* r, long long mode) __attribute__((weak));

namespace ssl_fast {
namespace {

using namespace optim_ema;

constexpr int64_t kGrain = 1 << 15;      // below 32K elements a group runs on the calling thread
constexpr int64_t kSqrtBlock = 2048;     // AdamW with MKL's sqrt: elements per vmsSqrt call (8 KiB of fp32)
// Elements per optimizer-then-EMA block (see ema_block): 256 for fp32 parameters (1 KiB a stream), 1024 for bf16.
// Measured on the 2-core AMD EPYC, ViT-B/16's list, providers interleaved in rounds (the VM's memory bandwidth
// drifts by 1.5x over minutes): SGD + EMA fp32 at 1024 / 512 / 256 / 128 / 64 elements took 65.2 / 57.3 / 52.9 /
// 53.9 / 54.2 ms at 1 thread, 35.2 / 27.9 / 26.0 / 26.6 / 26.8 ms at 2 (torch fused=True + lerp 63.9-69.1 and
// 33.7-39.5 in the same runs); AdamW fp32 66.1 -> 64.3 and 53.3 -> 52.1. bf16 parameters (more arithmetic per
// byte) lose at smaller blocks: SGD 36.3 / 38.0 / 41.6 ms at 1024 / 256 / 128, 1 thread.
template <typename T>
constexpr int64_t span_of() { return sizeof(T) == 4 ? 256 : 1024; }
constexpr int64_t kNormBlock = 1 << 13;  // LARS: elements per partial sum of squares
constexpr long long kVmlHa = 0x2 | 0x140000 | 0x100;  // VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE (ATen's)

template <typename T>
inline T* ptr(const at::Tensor& t) {
  return static_cast<T*>(ema::flat_begin(t));
}

// One parallel region over the concatenation of a group's tensors: fn(item, offset, length) on spans.
template <typename Fn>
void for_spans(const Group& g, Fn fn) {
  const size_t n = g.items.size();
  std::vector<int64_t> offs(n + 1, 0);
  for (size_t i = 0; i < n; ++i) offs[i + 1] = offs[i] + g.items[i].p.numel();
  at::parallel_for(0, offs[n], kGrain, [&](int64_t begin, int64_t end) {
    size_t t = static_cast<size_t>(std::upper_bound(offs.begin(), offs.end(), begin) - offs.begin()) - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offs[t + 1]);
      fn(t, begin - offs[t], stop - begin);
      begin = stop;
      ++t;
    }
  });
}

// The EMA of a block of freshly stored parameters (still in L1): e <- lerp(e, p). Splitting the pass in
// blocks of span_of<T>() elements keeps at most 4 memory streams live per loop (the optimizer's p, g, state, then
// e with p from L1): measured on an AMD EPYC, one loop over all 7 streams ran at half the bandwidth.
template <typename T, typename E>
inline void ema_block(E* __restrict e, const T* __restrict p, int64_t n, const LerpC l) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) from_f(e[i], lerp(to_f(e[i]), to_f(p[i]), l));
}

// Two runtime bools as template arguments: f.template operator()<A, B>(). A group's flags (weight decay on,
// Nesterov, ...) become constants in its loops, so the vectorized body computes nothing it then discards
// (sel() of the math functions computes both sides; with bf16 parameters every side costs roundings).
template <typename F>
inline void with_flags(bool a, bool b, F&& f) {
  if (a) {
    if (b) f.template operator()<true, true>(); else f.template operator()<true, false>();
  } else {
    if (b) f.template operator()<false, true>(); else f.template operator()<false, false>();
  }
}

// ---- SGD --------------------------------------------------------------------------------------------

template <typename T, typename E, bool HAS_E, bool MOM, bool FRESH, bool WD, bool NEST>
void sgd_span(T* __restrict p, const T* __restrict g, T* __restrict b, E* __restrict e, int64_t n, SgdC c,
              const LerpC l) {  // constants by value: loop invariants the vectorizer can if-convert on
  const Round<T> r;
  c.has_mom = MOM;
  c.has_wd = WD;
  c.nesterov = NEST;
  constexpr int64_t kSpan = span_of<T>();
  for (int64_t s = 0; s < n; s += kSpan) {
    const int64_t len = std::min(kSpan, n - s);
    T* ps = p + s;
    const T* gs = g + s;
    T* bs = b + s;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      float bf = 0.0f;
      if constexpr (MOM && !FRESH) bf = to_f(bs[i]);
      const float pf = sgd_elem(to_f(ps[i]), to_f(gs[i]), bf, FRESH, c, r);
      if constexpr (MOM) from_f(bs[i], bf);
      from_f(ps[i], pf);
    }
    if constexpr (HAS_E) ema_block(e + s, ps, len, l);
  }
}

template <typename T, typename E, bool HAS_E>
void sgd_group(const Group& g, const SgdC& c, const LerpC& l, at::IntArrayRef fresh) {
  for_spans(g, [&](size_t t, int64_t off, int64_t len) {
    const Item& it = g.items[t];
    T* p = ptr<T>(it.p) + off;
    const T* gr = ptr<T>(it.g) + off;
    T* b = c.has_mom ? ptr<T>(it.s1) + off : nullptr;
    E* e = HAS_E ? ptr<E>(it.e) + off : nullptr;
    const bool is_fresh = c.has_mom && !fresh.empty() && fresh[it.index] != 0;
    with_flags(c.has_wd, c.nesterov, [&]<bool WD, bool NEST>() {
      if (!c.has_mom) {
        sgd_span<T, E, HAS_E, false, false, WD, false>(p, gr, b, e, len, c, l);
      } else if (is_fresh) {
        sgd_span<T, E, HAS_E, true, true, WD, NEST>(p, gr, b, e, len, c, l);
      } else {
        sgd_span<T, E, HAS_E, true, false, WD, NEST>(p, gr, b, e, len, c, l);
      }
    });
  });
}

// ---- AdamW ------------------------------------------------------------------------------------------

// AdamW over one span. With MKL's sqrt (fp32 parameters, !ieee, torch built with MKL): blocks of kSqrtBlock
// elements in two loops, the moments first (g, m, v; stored), MKL's vmsSqrt of the block of v just stored
// (L1-hot) into S, then the parameter and the EMA (p, e; m from L1): one MKL call per 8 KiB of v, one
// scratch buffer. Otherwise one loop with the correctly rounded sqrt inline (bf16 parameters take that one:
// torch's bf16 sqrt is the correctly rounded fp32 one, rounded to bf16), the EMA per span_of<T>() block after it.
template <typename T, typename E, bool HAS_E, bool WD, bool W1_SMALL>
void adam_span(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v, E* __restrict e, int64_t n,
               float step_size, float bc2_sqrt, AdamC c, const LerpC l, bool ieee) {
  const Round<T> r;
  c.has_wd = WD;
  c.w1_small = W1_SMALL;
  if constexpr (std::is_same_v<T, float>) {
    if (!ieee && vmsSqrt_64 != nullptr) {
      alignas(64) float S[kSqrtBlock];
      for (int64_t s = 0; s < n; s += kSqrtBlock) {
        const int64_t len = std::min(kSqrtBlock, n - s);
        T* ps = p + s;
        const T* gs = g + s;
        T* ms = m + s;
        T* vs = v + s;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          float mf = ms[i], vf = vs[i];
          adam_moments(gs[i], mf, vf, c, r);
          ms[i] = mf;
          vs[i] = vf;
        }
        vmsSqrt_64(len, vs, S, kVmlHa);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const float pf = adam_finish(adam_decay(ps[i], c, r), ms[i], S[i], step_size, bc2_sqrt, c, r);
          ps[i] = pf;
          if constexpr (HAS_E) from_f(e[s + i], lerp(to_f(e[s + i]), pf, l));
        }
      }
      return;
    }
  }
  constexpr int64_t kSpan = span_of<T>();
  for (int64_t s = 0; s < n; s += kSpan) {
    const int64_t len = std::min(kSpan, n - s);
    T* ps = p + s;
    const T* gs = g + s;
    T* ms = m + s;
    T* vs = v + s;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      float mf = to_f(ms[i]), vf = to_f(vs[i]);
      adam_moments(to_f(gs[i]), mf, vf, c, r);
      from_f(ms[i], mf);
      from_f(vs[i], vf);
      from_f(ps[i], adam_finish(adam_decay(to_f(ps[i]), c, r), mf, r(op_sqrt(vf)), step_size, bc2_sqrt, c, r));
    }
    if constexpr (HAS_E) ema_block(e + s, ps, len, l);
  }
}

template <typename T, typename E, bool HAS_E>
void adam_group(const Group& g, const AdamC& c, const LerpC& l, const std::vector<float>& ss,
                const std::vector<float>& bc2, bool ieee) {
  for_spans(g, [&](size_t t, int64_t off, int64_t len) {
    const Item& it = g.items[t];
    with_flags(c.has_wd, c.w1_small, [&]<bool WD, bool W1_SMALL>() {
      adam_span<T, E, HAS_E, WD, W1_SMALL>(ptr<T>(it.p) + off, ptr<T>(it.g) + off, ptr<T>(it.s1) + off,
                                           ptr<T>(it.s2) + off, HAS_E ? ptr<E>(it.e) + off : nullptr, len,
                                           ss[it.index], bc2[it.index], c, l, ieee);
    });
  });
}

// ---- LARS -------------------------------------------------------------------------------------------

template <typename T, typename E, bool HAS_E, bool WD, bool ADAPT>
void lars_span(T* __restrict p, const T* __restrict g, T* __restrict b, E* __restrict e, int64_t n, float trust,
               LarsC c, const LerpC l) {
  const Round<T> r;
  c.has_wd = WD;
  c.adapt = ADAPT;
  constexpr int64_t kSpan = span_of<T>();
  for (int64_t s = 0; s < n; s += kSpan) {
    const int64_t len = std::min(kSpan, n - s);
    T* ps = p + s;
    const T* gs = g + s;
    T* bs = b + s;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      float bf = to_f(bs[i]);
      const float pf = lars_elem(to_f(ps[i]), to_f(gs[i]), bf, trust, c, r);
      from_f(bs[i], bf);
      from_f(ps[i], pf);
    }
    if constexpr (HAS_E) ema_block(e + s, ps, len, l);
  }
}

// Per tensor of the group: the trust ratio from fp64 sums of squares over fixed blocks (thread-count free).
template <typename T>
std::vector<float> lars_trusts(const Group& g, const LarsC c, double eta) {
  const size_t n = g.items.size();
  std::vector<float> trust(n, 1.0f);
  if (!c.adapt) return trust;
  std::vector<int64_t> first(n + 1, 0);  // first block of each tensor
  for (size_t i = 0; i < n; ++i) first[i + 1] = first[i] + (g.items[i].p.numel() + kNormBlock - 1) / kNormBlock;
  const int64_t blocks = first[n];
  std::vector<double> wsq(blocks), gsq(blocks);
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / kNormBlock), [&](int64_t b0, int64_t b1) {
    const Round<T> r;
    LarsC cl = c;  // a local copy: loop invariants the vectorizer can if-convert on
    cl.has_wd = c.has_wd;
    size_t t = static_cast<size_t>(std::upper_bound(first.begin(), first.end(), b0) - first.begin()) - 1;
    for (int64_t blk = b0; blk < b1; ++blk) {
      while (first[t + 1] <= blk) ++t;
      const Item& it = g.items[t];
      const int64_t start = (blk - first[t]) * kNormBlock;
      const int64_t len = std::min(kNormBlock, it.p.numel() - start);
      const T* p = ptr<T>(it.p) + start;
      const T* gr = ptr<T>(it.g) + start;
      double sw = 0.0, sg = 0.0;
#pragma omp simd reduction(+ : sw, sg)
      for (int64_t i = 0; i < len; ++i) {
        const float pf = to_f(p[i]);
        const float gf = lars_grad(pf, to_f(gr[i]), cl, r);
        sw += static_cast<double>(pf) * pf;
        sg += static_cast<double>(gf) * gf;
      }
      wsq[blk] = sw;
      gsq[blk] = sg;
    }
  });
  const Round<T> r;
  for (size_t i = 0; i < n; ++i) {
    double sw = 0.0, sg = 0.0;
    for (int64_t blk = first[i]; blk < first[i + 1]; ++blk) {
      sw += wsq[blk];
      sg += gsq[blk];
    }
    trust[i] = lars_trust(sw, sg, eta, r);
  }
  return trust;
}

template <typename T, typename E, bool HAS_E>
void lars_group(const Group& g, const LarsC& c, const LerpC& l, double eta) {
  const std::vector<float> trust = lars_trusts<T>(g, c, eta);
  for_spans(g, [&](size_t t, int64_t off, int64_t len) {
    const Item& it = g.items[t];
    with_flags(c.has_wd, c.adapt, [&]<bool WD, bool ADAPT>() {
      lars_span<T, E, HAS_E, WD, ADAPT>(ptr<T>(it.p) + off, ptr<T>(it.g) + off, ptr<T>(it.s1) + off,
                                        HAS_E ? ptr<E>(it.e) + off : nullptr, len, trust[t], c, l);
    });
  });
}

// ---- dtype dispatch ---------------------------------------------------------------------------------

#define SSL_FAST_OPTIM_DISPATCH(GROUP, FN, ...)                                      \
  do {                                                                               \
    const Group& g_ = (GROUP);                                                       \
    if (g_.pdt == at::kFloat) {                                                      \
      if (g_.edt == at::kFloat) FN<float, float, true>(g_, __VA_ARGS__);             \
      else FN<float, float, false>(g_, __VA_ARGS__);                                 \
    } else {                                                                         \
      if (g_.edt == at::kFloat) FN<uint16_t, float, true>(g_, __VA_ARGS__);          \
      else if (g_.edt == at::kBFloat16) FN<uint16_t, uint16_t, true>(g_, __VA_ARGS__); \
      else FN<uint16_t, uint16_t, false>(g_, __VA_ARGS__);                           \
    }                                                                                \
  } while (0)

double ema_m(double momentum, const c10::optional<at::Tensor>& mt) {
  double m = momentum;
  if (mt.has_value() && mt->defined()) {
    TORCH_CHECK_VALUE(mt->numel() == 1, "ema_momentum must be a float or a 0-dim tensor, got shape ", mt->sizes());
    TORCH_CHECK_VALUE(mt->device().is_cpu(), "ema_momentum: the CPU kernel got a tensor on ", mt->device());
    m = mt->item<double>();  // a CPU scalar: no device synchronization
  }
  check_momentum(m, "ema_momentum");
  return m;
}

void check_cpu(at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK_VALUE(!params[i].defined() || params[i].device().is_cpu(), "params[", i,
                      "]: the CPU kernel got a tensor on ", params[i].device());
}

void sgd_ema_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList ema,
                      at::IntArrayRef fresh, double lr, double momentum, double dampening, double weight_decay,
                      bool nesterov, double ema_momentum, const c10::optional<at::Tensor>& ema_momentum_tensor) {
  const bool has_mom = momentum != 0.0;
  TORCH_CHECK_VALUE(!has_mom || bufs.size() == params.size(), "momentum_buffers must have one tensor per "
                    "parameter when momentum != 0: got ", bufs.size(), " for ", params.size(), " params");
  TORCH_CHECK_VALUE(fresh.empty() || fresh.size() == params.size(), "fresh must be empty or have one flag per "
                    "parameter: got ", fresh.size(), " for ", params.size(), " params");
  const double m = ema_m(ema_momentum, ema_momentum_tensor);
  check_cpu(params);
  const WorkLists w = make_work(Kind::kSgd, params, grads, has_mom ? bufs : at::TensorList(), {}, ema, true);
  const LerpC l = lerp_consts(m);
  for (const Group& g : w.groups) {
    const SgdC c = sgd_consts(g.pdt, lr, momentum, dampening, weight_decay, nesterov);
    SSL_FAST_OPTIM_DISPATCH(g, sgd_group, c, l, fresh);
  }
  w.copy_back();
}

void adamw_ema_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList ema, at::ArrayRef<double> steps, double lr,
                        double beta1, double beta2, double eps, double weight_decay, bool ieee_sqrt,
                        double ema_momentum, const c10::optional<at::Tensor>& ema_momentum_tensor) {
  TORCH_CHECK_VALUE(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(),
                    "exp_avgs and exp_avg_sqs must have one tensor per parameter: got ", exp_avgs.size(), " and ",
                    exp_avg_sqs.size(), " for ", params.size(), " params");
  TORCH_CHECK_VALUE(steps.size() == params.size(), "steps must have one value per parameter: got ", steps.size(),
                    " for ", params.size(), " params");
  const double m = ema_m(ema_momentum, ema_momentum_tensor);
  check_cpu(params);
  const WorkLists w = make_work(Kind::kAdamW, params, grads, exp_avgs, exp_avg_sqs, ema, true);
  std::vector<float> ss(params.size()), bc2(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(steps[i] >= 1.0, "steps[", i, "] must be >= 1 (the step count after this step), got ",
                      steps[i]);
    adam_step_scalars(lr, beta1, beta2, steps[i], ss[i], bc2[i]);
  }
  const LerpC l = lerp_consts(m);
  for (const Group& g : w.groups) {
    const AdamC c = adam_consts(g.pdt, lr, beta1, beta2, eps, weight_decay);
    SSL_FAST_OPTIM_DISPATCH(g, adam_group, c, l, ss, bc2, ieee_sqrt);
  }
  w.copy_back();
}

void lars_ema_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList ema,
                       double lr, double momentum, double weight_decay, double eta, bool adapt, double ema_momentum,
                       const c10::optional<at::Tensor>& ema_momentum_tensor) {
  TORCH_CHECK_VALUE(bufs.size() == params.size(), "momentum_buffers must have one tensor per parameter: got ",
                    bufs.size(), " for ", params.size(), " params");
  const double m = ema_m(ema_momentum, ema_momentum_tensor);
  check_cpu(params);
  const WorkLists w = make_work(Kind::kLars, params, grads, bufs, {}, ema, true);
  const LerpC l = lerp_consts(m);
  for (const Group& g : w.groups) {
    const LarsC c = lars_consts(g.pdt, lr, momentum, weight_decay, adapt);
    SSL_FAST_OPTIM_DISPATCH(g, lars_group, c, l, eta);
  }
  w.copy_back();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssl_fast, m) {
  m.def("sgd_ema_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] ema, "
        "int[] fresh, float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
        "float ema_momentum, Tensor? ema_momentum_tensor) -> ()");
  m.def("adamw_ema_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] ema, float[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "bool ieee_sqrt, float ema_momentum, Tensor? ema_momentum_tensor) -> ()");
  m.def("lars_ema_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] ema, "
        "float lr, float momentum, float weight_decay, float eta, bool adapt, float ema_momentum, "
        "Tensor? ema_momentum_tensor) -> ()");
}

TORCH_LIBRARY_IMPL(ssl_fast, CPU, m) {
  m.impl("sgd_ema_step_", &sgd_ema_step_cpu);
  m.impl("adamw_ema_step_", &adamw_ema_step_cpu);
  m.impl("lars_ema_step_", &lars_ema_step_cpu);
}

}  // namespace ssl_fast

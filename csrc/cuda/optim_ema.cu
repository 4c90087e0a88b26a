// The optimizer step fused with the EMA teacher update on CUDA: the CUDA kernels of ssl_fast::sgd_ema_step_,
// ssl_fast::adamw_ema_step_ and ssl_fast::lars_ema_step_ (schemas and the CPU kernel in
// csrc/cpu/optim_ema.cpp, where the math is derived; the per-element functions, checks and layouts are
// shared through csrc/cpu/optim_ema.h).
//
// Math: the same sequence of fp32 operations as on the CPU, written with the _rn intrinsics (exact under
// --use_fast_math, never contracted): fma where torch fuses, separate roundings elsewhere, a rounding to
// bf16 after each step for bf16 parameters, then the lerp of the teacher. The sqrt of AdamW's second moment
// is the correctly rounded __fsqrt_rn (torch's CUDA kernels and fused=True take it too; `ieee_sqrt` does
// not change anything here).
//
// Bandwidth bound (bytes per element: see the CPU file; fp32 SGD + EMA 28 B, AdamW + EMA 36 B). Multi-tensor
// apply as csrc/cuda/ema.cu: each tensor is cut into chunks of kChunk elements, one __grid_constant__ table
// of pointers, sizes, chunk prefixes and per-tensor scalars (SGD: first-step flag; AdamW: step size and
// bias correction; LARS: nothing, the trust ratios are in device memory) per launch of up to kMaxTensors
// tensors; blocks walk the chunks grid-stride and find their tensor by binary search. Inside a chunk each
// thread takes kUnroll coalesced elements per iteration, all loads issued before any math.
// LARS: kernel 1 writes per-chunk fp64 partial sums of squares of p and g + wd p (a fixed-order block
// reduction); kernel 2 (one thread per tensor) adds its chunks' partials in chunk order and writes the trust
// ratio; kernel 3 is the update. Deterministic: no atomics.

#include "../cpu/optim_ema.h"
#include "device.cuh"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace ssl_fast {
namespace {

using namespace optim_ema;

constexpr int kMaxTensors = 320;  // tensors per launch (kernel parameter space)
constexpr int kChunk = 16384;     // elements per chunk
constexpr int kThreads = 512;
constexpr int kUnroll = 4;
constexpr int kBlocksPerSm = 4;

struct Table {
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  void* s1[kMaxTensors];
  void* s2[kMaxTensors];
  void* e[kMaxTensors];
  int64_t numel[kMaxTensors];
  float sc0[kMaxTensors];
  float sc1[kMaxTensors];
  int32_t chunk_start[kMaxTensors + 1];
  const float* trust;     // LARS: trust ratio per tensor of this launch (device), else nullptr
  const float* m_ptr;     // 0-dim fp32 EMA momentum on the device, or nullptr: use the LerpC below
  LerpC lerp;
  int32_t n;
};
static_assert(sizeof(Table) <= 32764, "Table exceeds the 32764-byte kernel parameter limit");

__device__ __forceinline__ int find_tensor(const Table& tab, int c) {
  int lo = 0, hi = tab.n - 1;  // the last t with chunk_start[t] <= c
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tab.chunk_start[mid] <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ LerpC device_lerp(const Table& tab) {
  if (tab.m_ptr == nullptr) return tab.lerp;
  LerpC l;
  l.w = __fsub_rn(1.0f, *tab.m_ptr);
  l.one_minus_w = __fsub_rn(1.0f, l.w);
  l.small = fabsf(l.w) < 0.5f;
  return l;
}

template <int KIND, typename T, typename E, bool HAS_E, typename C>
__global__ void __launch_bounds__(kThreads) step_kernel(const __grid_constant__ Table tab, const C c) {
  const Round<T> r;
  const LerpC l = device_lerp(tab);
  const int total = tab.chunk_start[tab.n];
  for (int ch = blockIdx.x; ch < total; ch += gridDim.x) {
    const int t = find_tensor(tab, ch);
    const int64_t start = static_cast<int64_t>(ch - tab.chunk_start[t]) * kChunk;
    const int64_t len = min(static_cast<int64_t>(kChunk), tab.numel[t] - start);
    T* p = static_cast<T*>(tab.p[t]) + start;
    const T* g = static_cast<const T*>(tab.g[t]) + start;
    T* s1 = tab.s1[t] ? static_cast<T*>(tab.s1[t]) + start : nullptr;
    T* s2 = tab.s2[t] ? static_cast<T*>(tab.s2[t]) + start : nullptr;
    E* e = HAS_E ? static_cast<E*>(tab.e[t]) + start : nullptr;
    const float sc0 = tab.sc0[t], sc1 = tab.sc1[t];
    const float trust = (KIND == 2 && tab.trust != nullptr) ? tab.trust[t] : 1.0f;
    for (int64_t base = threadIdx.x; base < len; base += kThreads * kUnroll) {
      float pv[kUnroll], gv[kUnroll], av[kUnroll], bv[kUnroll], ev[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        if (i < len) {
          pv[u] = to_f(p[i]);
          gv[u] = to_f(g[i]);
          av[u] = s1 ? to_f(s1[i]) : 0.0f;
          bv[u] = s2 ? to_f(s2[i]) : 0.0f;
          if constexpr (HAS_E) ev[u] = to_f(e[i]);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        if (i >= len) continue;
        float pn;
        if constexpr (KIND == 0) {  // SGD: sc0 != 0 marks a fresh momentum buffer
          pn = sgd_elem(pv[u], gv[u], av[u], sc0 != 0.0f, c, r);
          if (c.has_mom) from_f(s1[i], av[u]);
        } else if constexpr (KIND == 1) {  // AdamW: sc0 = step size, sc1 = bias correction sqrt
          adam_moments(gv[u], av[u], bv[u], c, r);
          from_f(s1[i], av[u]);
          from_f(s2[i], bv[u]);
          pn = adam_finish(adam_decay(pv[u], c, r), av[u], r(op_sqrt(bv[u])), sc0, sc1, c, r);
        } else {  // LARS
          pn = lars_elem(pv[u], gv[u], av[u], trust, c, r);
          from_f(s1[i], av[u]);
        }
        from_f(p[i], pn);
        if constexpr (HAS_E) from_f(e[i], lerp(ev[u], stored<T>(pn), l));  // the stored weight
      }
    }
  }
}

// LARS kernel 1: chunk ch's sums of squares of p and of g + wd p -> part[2 ch], part[2 ch + 1].
template <typename T>
__global__ void __launch_bounds__(kThreads) sumsq_kernel(const __grid_constant__ Table tab, const LarsC c,
                                                         double* part) {
  const Round<T> r;
  __shared__ double sw[kThreads], sg[kThreads];
  const int total = tab.chunk_start[tab.n];
  for (int ch = blockIdx.x; ch < total; ch += gridDim.x) {
    const int t = find_tensor(tab, ch);
    const int64_t start = static_cast<int64_t>(ch - tab.chunk_start[t]) * kChunk;
    const int64_t len = min(static_cast<int64_t>(kChunk), tab.numel[t] - start);
    const T* p = static_cast<const T*>(tab.p[t]) + start;
    const T* g = static_cast<const T*>(tab.g[t]) + start;
    double aw = 0.0, ag = 0.0;
    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      const float pf = to_f(p[i]);
      const float gf = lars_grad(pf, to_f(g[i]), c, r);
      aw += static_cast<double>(pf) * pf;
      ag += static_cast<double>(gf) * gf;
    }
    sw[threadIdx.x] = aw;
    sg[threadIdx.x] = ag;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {  // fixed-order tree reduction
      if (threadIdx.x < s) {
        sw[threadIdx.x] += sw[threadIdx.x + s];
        sg[threadIdx.x] += sg[threadIdx.x + s];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      part[2 * ch] = sw[0];
      part[2 * ch + 1] = sg[0];
    }
    __syncthreads();
  }
}

// LARS kernel 2: tensor t's trust ratio from its chunks' partials, in chunk order.
template <typename T>
__global__ void trust_kernel(const __grid_constant__ Table tab, const double* part, float eta, float* trust) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= tab.n) return;
  double w = 0.0, g = 0.0;
  for (int ch = tab.chunk_start[t]; ch < tab.chunk_start[t + 1]; ++ch) {
    w += part[2 * ch];
    g += part[2 * ch + 1];
  }
  const Round<T> r;
  const float wn = r(__double2float_rn(sqrt(w)));
  const float gn = r(__double2float_rn(sqrt(g)));
  trust[t] = (wn > 0.0f && gn > 0.0f) ? r(op_div(r(op_mul(eta, wn)), gn)) : 1.0f;
}

// One launch per kMaxTensors tensors of a group. `scal(index)` gives the per-tensor (sc0, sc1).
template <int KIND, typename T, typename E, bool HAS_E, typename C, typename Scal>
void launch(const Group& grp, const C& c, const LerpC& l, const c10::optional<at::Tensor>& mt, Scal scal,
            double eta = 0.0) {
  const int device = grp.items.front().p.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int sms = sm_count(device);
  at::Tensor m32;
  if (mt.has_value() && mt->defined()) m32 = mt->reshape({}).to(at::kFloat);  // never a host sync
  const size_t count = grp.items.size();
  for (size_t first = 0; first < count; first += kMaxTensors) {
    Table tab;
    tab.n = static_cast<int32_t>(std::min(count - first, static_cast<size_t>(kMaxTensors)));
    tab.m_ptr = m32.defined() ? m32.data_ptr<float>() : nullptr;
    tab.lerp = l;
    tab.trust = nullptr;
    int64_t chunks = 0;
    for (int t = 0; t < tab.n; ++t) {
      const Item& it = grp.items[first + t];
      tab.p[t] = ema::flat_begin(it.p);
      tab.g[t] = ema::flat_begin(it.g);
      tab.s1[t] = it.s1.defined() ? ema::flat_begin(it.s1) : nullptr;
      tab.s2[t] = it.s2.defined() ? ema::flat_begin(it.s2) : nullptr;
      tab.e[t] = it.e.defined() ? ema::flat_begin(it.e) : nullptr;
      tab.numel[t] = it.p.numel();
      const auto s = scal(it.index);
      tab.sc0[t] = s.first;
      tab.sc1[t] = s.second;
      tab.chunk_start[t] = static_cast<int32_t>(chunks);
      chunks += (tab.numel[t] + kChunk - 1) / kChunk;
    }
    TORCH_CHECK(chunks < (int64_t{1} << 31), "optim_ema: too many elements in one launch");
    tab.chunk_start[tab.n] = static_cast<int32_t>(chunks);
    const int grid = static_cast<int>(std::min<int64_t>(chunks, static_cast<int64_t>(sms) * kBlocksPerSm));
    at::Tensor trust;
    if constexpr (KIND == 2) {
      if (c.adapt) {
        const auto opts = grp.items.front().p.options();
        at::Tensor part = at::empty({2 * chunks}, opts.dtype(at::kDouble));
        trust = at::empty({tab.n}, opts.dtype(at::kFloat));
        sumsq_kernel<T><<<grid, kThreads, 0, stream>>>(tab, c, part.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        trust_kernel<T><<<(tab.n + 127) / 128, 128, 0, stream>>>(tab, part.data_ptr<double>(),
                                                                  static_cast<float>(eta), trust.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        tab.trust = trust.data_ptr<float>();
      }
    }
    step_kernel<KIND, T, E, HAS_E, C><<<grid, kThreads, 0, stream>>>(tab, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

#define SSL_FAST_OPTIM_CUDA_DISPATCH(GROUP, KIND, ...)                                          \
  do {                                                                                          \
    const Group& g_ = (GROUP);                                                                  \
    if (g_.pdt == at::kFloat) {                                                                 \
      if (g_.edt == at::kFloat) launch<KIND, float, float, true>(g_, __VA_ARGS__);              \
      else launch<KIND, float, float, false>(g_, __VA_ARGS__);                                  \
    } else {                                                                                    \
      if (g_.edt == at::kFloat) launch<KIND, uint16_t, float, true>(g_, __VA_ARGS__);           \
      else if (g_.edt == at::kBFloat16) launch<KIND, uint16_t, uint16_t, true>(g_, __VA_ARGS__); \
      else launch<KIND, uint16_t, uint16_t, false>(g_, __VA_ARGS__);                            \
    }                                                                                           \
  } while (0)

double host_momentum(double m, const c10::optional<at::Tensor>& mt) {
  if (mt.has_value() && mt->defined()) {
    TORCH_CHECK_VALUE(mt->numel() == 1, "ema_momentum must be a float or a 0-dim tensor, got shape ", mt->sizes());
    return 0.0;  // read on the device (no host sync); the float is unused
  }
  check_momentum(m, "ema_momentum");
  return m;
}

void check_cuda(at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK_VALUE(!params[i].defined() || params[i].is_cuda(), "params[", i, "]: the CUDA kernel got a tensor on ",
                      params[i].device());
}

void sgd_ema_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList ema,
                       at::IntArrayRef fresh, double lr, double momentum, double dampening, double weight_decay,
                       bool nesterov, double ema_momentum, const c10::optional<at::Tensor>& mt) {
  const bool has_mom = momentum != 0.0;
  TORCH_CHECK_VALUE(!has_mom || bufs.size() == params.size(), "momentum_buffers must have one tensor per "
                    "parameter when momentum != 0: got ", bufs.size(), " for ", params.size(), " params");
  TORCH_CHECK_VALUE(fresh.empty() || fresh.size() == params.size(), "fresh must be empty or have one flag per "
                    "parameter");
  const double m = host_momentum(ema_momentum, mt);
  check_cuda(params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const WorkLists w = make_work(Kind::kSgd, params, grads, has_mom ? bufs : at::TensorList(), {}, ema, true);
  const LerpC l = lerp_consts(m);
  auto scal = [&](int64_t i) { return std::make_pair(!fresh.empty() && fresh[i] ? 1.0f : 0.0f, 0.0f); };
  for (const Group& g : w.groups) {
    const SgdC c = sgd_consts(g.pdt, lr, momentum, dampening, weight_decay, nesterov);
    SSL_FAST_OPTIM_CUDA_DISPATCH(g, 0, c, l, mt, scal);
  }
  w.copy_back();
}

void adamw_ema_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList ema, at::ArrayRef<double> steps, double lr,
                         double beta1, double beta2, double eps, double weight_decay, bool /*ieee_sqrt*/,
                         double ema_momentum, const c10::optional<at::Tensor>& mt) {
  TORCH_CHECK_VALUE(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(),
                    "exp_avgs and exp_avg_sqs must have one tensor per parameter");
  TORCH_CHECK_VALUE(steps.size() == params.size(), "steps must have one value per parameter");
  const double m = host_momentum(ema_momentum, mt);
  check_cuda(params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const WorkLists w = make_work(Kind::kAdamW, params, grads, exp_avgs, exp_avg_sqs, ema, true);
  std::vector<float> ss(params.size()), bc2(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(steps[i] >= 1.0, "steps[", i, "] must be >= 1, got ", steps[i]);
    adam_step_scalars(lr, beta1, beta2, steps[i], ss[i], bc2[i]);
  }
  const LerpC l = lerp_consts(m);
  auto scal = [&](int64_t i) { return std::make_pair(ss[i], bc2[i]); };
  for (const Group& g : w.groups) {
    const AdamC c = adam_consts(g.pdt, lr, beta1, beta2, eps, weight_decay);
    SSL_FAST_OPTIM_CUDA_DISPATCH(g, 1, c, l, mt, scal);
  }
  w.copy_back();
}

void lars_ema_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList ema,
                        double lr, double momentum, double weight_decay, double eta, bool adapt, double ema_momentum,
                        const c10::optional<at::Tensor>& mt) {
  TORCH_CHECK_VALUE(bufs.size() == params.size(), "momentum_buffers must have one tensor per parameter");
  const double m = host_momentum(ema_momentum, mt);
  check_cuda(params);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const WorkLists w = make_work(Kind::kLars, params, grads, bufs, {}, ema, true);
  const LerpC l = lerp_consts(m);
  auto scal = [](int64_t) { return std::make_pair(0.0f, 0.0f); };
  for (const Group& g : w.groups) {
    const LarsC c = lars_consts(g.pdt, lr, momentum, weight_decay, adapt);
    SSL_FAST_OPTIM_CUDA_DISPATCH(g, 2, c, l, mt, scal, eta);
  }
  w.copy_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(ssl_fast, CUDA, m) {
  m.impl("sgd_ema_step_", &sgd_ema_step_cuda);
  m.impl("adamw_ema_step_", &adamw_ema_step_cuda);
  m.impl("lars_ema_step_", &lars_ema_step_cuda);
}

}  // namespace ssl_fast

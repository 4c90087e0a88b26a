// The memory ceiling of a fused multi-tensor step, measured: ssl_fast::stream_probe_ moves exactly the bytes of
// one fused pass (every written stream read once and written once, every read-only stream read once) with
// almost no arithmetic, in the optimizer + EMA kernels' layout (one parallel region over the concatenated
// tensors, blocks of `span` elements, at most 4 streams live per loop). Its time is about what a kernel that
// must move those bytes needs on this machine (a measurement, not a proof: the AdamW kernel, same bytes, came
// 4% under it once at 1 thread on the AMD EPYC). bench/ uses it as the `stream_ceiling` provider of the
// optimizer + EMA rows, so "x % of the ceiling" and "about y x faster than torch at most" are measured.
//
// Contract of ssl_fast::stream_probe_(Tensor(a!)[] written, Tensor[] read, int n, int span) -> ()
//   written: W * n tensors (0 <= W <= 4), stream-major (written[j * n + t] is stream j of item t); read: R * n,
//   R = 1 when W >= 1, R <= 2 when W = 0. Every tensor of item t has the numel of read[t]; each is contiguous,
//   fp32 or bf16; the read streams and the written streams 0 .. W-2 share one dtype (the parameters'), the
//   last written stream may have another (the EMA's). Per block of `span` elements, as the optimizer + EMA
//   kernels (csrc/cpu/optim_ema.cpp) walk it, in fp32 with r = r_0[i]:
//     loop 1: w_j[i] <- 0.5 * w_j[i] + r            for j = 0 .. max(W-2, 0)  (p, g and the states)
//     loop 2: w_{W-1}[i] <- 0.5 * w_{W-1}[i] + w_0[i]  when W >= 2, w_0 as just stored  (the EMA, p from L1)
//   W = 0: the R streams are read and summed (LARS's norm pass), nothing is written. The compiler may
//   contract a product and a sum into one FMA (values to fp32 rounding, not bitwise). A bf16 stream is
//   widened exactly and stored truncated (its low 16 bits dropped: no rounding work; a bandwidth probe, not
//   math anyone should use).
#include "optim_ema.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace ssl_fast {
namespace {

constexpr int64_t kGrain = 1 << 15;  // as the optimizer + EMA kernels

inline float wide(float x) { return x; }
inline float wide(uint16_t b) { return optim_ema::u2f(static_cast<uint32_t>(b) << 16); }
inline void put(float& d, float v) { d = v; }
inline void put(uint16_t& d, float v) { d = static_cast<uint16_t>(optim_ema::f2u(v) >> 16); }

// Loop 1 over a block: K written streams of type M (K = 1..3) and the read stream of type M.
template <typename M, int K>
inline void main_block(M* const* __restrict w, const M* __restrict r, int64_t n) {
  M* __restrict w0 = w[0];
  M* __restrict w1 = K > 1 ? w[1] : nullptr;
  M* __restrict w2 = K > 2 ? w[2] : nullptr;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = wide(r[i]);
    put(w0[i], 0.5f * wide(w0[i]) + x);
    if constexpr (K > 1) put(w1[i], 0.5f * wide(w1[i]) + x);
    if constexpr (K > 2) put(w2[i], 0.5f * wide(w2[i]) + x);
  }
}

// Loop 2: the last stream (type E) toward w_0 (type M), which loop 1 just stored (in L1).
template <typename M, typename E>
inline void tail_block(E* __restrict e, const M* __restrict w0, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) put(e[i], 0.5f * wide(e[i]) + wide(w0[i]));
}

// W = 0: the sum of R <= 2 read streams into acc (observed by the caller: the reads stay).
template <typename M>
inline void read_block(float* __restrict acc, const M* __restrict r0, const M* __restrict r1, int64_t n) {
  if (r1 == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] = wide(r0[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] = wide(r0[i]) + wide(r1[i]);
  }
}

// One parallel region over the concatenated items (as the optimizer + EMA kernels' for_spans).
template <typename Fn>
void for_blocks(const std::vector<int64_t>& offs, int64_t span, Fn fn) {
  const int64_t n = static_cast<int64_t>(offs.size()) - 1;
  at::parallel_for(0, offs[n], kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(span));
    int64_t t = std::upper_bound(offs.begin(), offs.end(), begin) - offs.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offs[t + 1]);
      for (int64_t s = begin - offs[t]; s < stop - offs[t]; s += span)
        fn(t, s, std::min(span, stop - offs[t] - s), acc.data());
      begin = stop;
      ++t;
    }
  });
}

template <typename M, typename E, int K>
void run_probe(at::TensorList written, at::TensorList read, int64_t n, int64_t W, int64_t R, int64_t span,
               const std::vector<int64_t>& offs) {
  // data pointers read once, before the parallel region (data_ptr() per block costs ~10% of a 256-element one)
  auto ptrs = [](at::TensorList ts) {
    std::vector<void*> out;
    for (const at::Tensor& t : ts) out.push_back(t.data_ptr());
    return out;
  };
  const std::vector<void*> wp = ptrs(written), rp = ptrs(read);
  if (W == 0) {
    for_blocks(offs, span, [&](int64_t t, int64_t s, int64_t len, float* acc) {
      const M* r1 = R > 1 ? static_cast<const M*>(rp[n + t]) + s : nullptr;
      read_block(acc, static_cast<const M*>(rp[t]) + s, r1, len);
      asm volatile("" : : "r"(acc) : "memory");  // the sums are observed: the reads stay
    });
    return;
  }
  for_blocks(offs, span, [&](int64_t t, int64_t s, int64_t len, float*) {
    M* w[3] = {nullptr, nullptr, nullptr};
    for (int k = 0; k < K; ++k) w[k] = static_cast<M*>(wp[k * n + t]) + s;
    main_block<M, K>(w, static_cast<const M*>(rp[t]) + s, len);
    if (W >= 2) tail_block<M, E>(static_cast<E*>(wp[(W - 1) * n + t]) + s, w[0], len);
  });
}

template <typename M, typename E>
void run_k(at::TensorList written, at::TensorList read, int64_t n, int64_t W, int64_t R, int64_t span,
           const std::vector<int64_t>& offs) {
  const int64_t k = std::max<int64_t>(W - 1, 1);  // streams in loop 1
  if (k == 1) run_probe<M, E, 1>(written, read, n, W, R, span, offs);
  else if (k == 2) run_probe<M, E, 2>(written, read, n, W, R, span, offs);
  else run_probe<M, E, 3>(written, read, n, W, R, span, offs);
}

void stream_probe_cpu(at::TensorList written, at::TensorList read, int64_t n, int64_t span) {
  TORCH_CHECK_VALUE(n >= 1, "n must be >= 1, got ", n);
  TORCH_CHECK_VALUE(span >= 16 && span <= 8192, "span must be in [16, 8192], got ", span);
  const int64_t nw = static_cast<int64_t>(written.size()), nr = static_cast<int64_t>(read.size());
  TORCH_CHECK_VALUE(nw % n == 0 && nw / n <= 4, "written must hold W * n tensors, 0 <= W <= 4, got ", nw,
                    " for n = ", n);
  const int64_t W = nw / n, R = nr / n;
  TORCH_CHECK_VALUE(nr % n == 0 && (W >= 1 ? R == 1 : (R == 1 || R == 2)), "read must hold R * n tensors (R = 1 "
                    "when written is not empty, 1 or 2 when it is), got ", nr, " for n = ", n, " and W = ", W);
  auto check = [&](const at::Tensor& t, const char* name, int64_t k, int64_t numel, at::ScalarType want) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, "[", k, "]: the CPU kernel got a tensor on ", t.device());
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, "[", k,
                     "] must be float32 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK_TYPE(want == at::ScalarType::Undefined || t.scalar_type() == want, name, "[", k, "] is ",
                     t.scalar_type(), ", the read streams are ", want, " (all streams but the last written "
                     "one share their dtype)");
    TORCH_CHECK_VALUE(t.is_contiguous(), name, "[", k, "] must be contiguous");
    TORCH_CHECK_VALUE(t.numel() == numel, name, "[", k, "] has ", t.numel(), " elements, item ", k % n,
                      " has ", numel);
  };
  const at::ScalarType mdt = read[0].scalar_type();
  for (int64_t k = 0; k < nr; ++k) check(read[k], "read", k, read[k % n].numel(), mdt);
  for (int64_t k = 0; k < nw; ++k)
    check(written[k], "written", k, read[k % n].numel(),
          (W >= 2 && k >= (W - 1) * n) ? at::ScalarType::Undefined : mdt);
  const at::ScalarType edt = W >= 2 ? written[(W - 1) * n].scalar_type() : mdt;
  for (int64_t k = (W - 1) * n; W >= 2 && k < nw; ++k)
    TORCH_CHECK_TYPE(written[k].scalar_type() == edt, "written[", k, "] is ", written[k].scalar_type(),
                     ", the last written stream is ", edt, " (one dtype per stream)");
  std::vector<int64_t> offs(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) offs[t + 1] = offs[t] + read[t].numel();

  const bool mf = mdt == at::kFloat, ef = edt == at::kFloat;
  if (mf && ef) run_k<float, float>(written, read, n, W, R, span, offs);
  else if (mf) run_k<float, uint16_t>(written, read, n, W, R, span, offs);
  else if (ef) run_k<uint16_t, float>(written, read, n, W, R, span, offs);
  else run_k<uint16_t, uint16_t>(written, read, n, W, R, span, offs);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssl_fast, m) {
  m.def("stream_probe_(Tensor(a!)[] written, Tensor[] read, int n, int span) -> ()");
}

TORCH_LIBRARY_IMPL(ssl_fast, CPU, m) { m.impl("stream_probe_", &stream_probe_cpu); }

}  // namespace ssl_fast

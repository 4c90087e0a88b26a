// ssl_fast._C: the compiled extension. The fused kernels are dispatcher ops (torch.ops.ssl_fast.*), registered
// with TORCH_LIBRARY_FRAGMENT in their own sources when this module loads; pybind holds only helpers.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <string>
#include <vector>

namespace ssl_fast {
std::string set_cpu_gemm(const std::string& which);
std::string cpu_gemm();
}  // namespace ssl_fast

namespace {
// How many threads one at::parallel_for of this extension runs on: the threads that took a chunk of `chunks`
// single-item chunks. 1 with more than one intra-op thread means the extension was built without OpenMP
// (at::parallel_for is an inline `#pragma omp parallel`: without -fopenmp it runs on the calling thread).
int64_t parallel_for_threads(int64_t chunks) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, chunks, 1, [&](int64_t, int64_t) { seen |= uint64_t(1) << (at::get_thread_num() & 63); });
  return __builtin_popcountll(seen.load());
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ssl_fast fused CPU kernels";
  m.def("cpu_gemm", &ssl_fast::cpu_gemm, "tile GEMM of the CPU kernels: 'blas' (torch's sgemm_) or 'aten'");
  m.def("set_cpu_gemm", &ssl_fast::set_cpu_gemm, "force 'blas' or 'aten' tile GEMMs; returns the previous");
  m.def("parallel_for_threads", &parallel_for_threads,
        "threads that ran a chunk of one at::parallel_for over `chunks` chunks (checks the OpenMP build)");
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
#ifdef SSL_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}

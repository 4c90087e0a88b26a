// ssl_fast._C: the compiled extension. The fused kernels are dispatcher ops (torch.ops.ssl_fast.*), registered
// with TORCH_LIBRARY_FRAGMENT in their own sources when this module loads; pybind holds only helpers.
#include <torch/extension.h>

#include <string>
#include <vector>

namespace ssl_fast {
std::string set_cpu_gemm(const std::string& which);
std::string cpu_gemm();
}  // namespace ssl_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ssl_fast fused CPU kernels";
  m.def("cpu_gemm", &ssl_fast::cpu_gemm, "tile GEMM of the CPU kernels: 'blas' (torch's sgemm_) or 'aten'");
  m.def("set_cpu_gemm", &ssl_fast::set_cpu_gemm, "force 'blas' or 'aten' tile GEMMs; returns the previous");
#ifdef SSL_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}

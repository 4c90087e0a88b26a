"""Builds ssl_fast._C (C++ CPU kernels, always; CUDA sources when a CUDA toolchain and CUDA torch exist).

Environment:
  SSL_FAST_SKIP_CUDA_BUILD=1   never build CUDA sources
  SSL_FAST_FORCE_CUDA=1        build CUDA sources even when torch sees no GPU (needs nvcc + CUDA_HOME)
  SSL_FAST_CUDA_ARCHS="8.0;9.0" TORCH_CUDA_ARCH_LIST for the CUDA build
  SSL_FAST_NATIVE=0            build portable CPU code (no -march=native)
  SSL_FAST_NO_EXT=1            pure-Python package, no ssl_fast._C (ops fall back to torch with a warning)
  MAX_JOBS                     parallel compile jobs (default: from cores and free memory)
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # an isolated build has no torch
    raise SystemExit(
        "ssl_fast builds against the installed torch: install torch first, then "
        "`pip install --no-build-isolation .`"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def _max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        by_mem = max(1, avail_kb // (3 * 1024 * 1024))  # ~3 GiB per compile job with torch headers
    except (OSError, StopIteration):
        by_mem = cores
    return str(max(1, min(cores, by_mem)))


os.environ.setdefault("MAX_JOBS", _max_jobs())


def _want_cuda(cuda_sources) -> bool:
    if not cuda_sources or os.environ.get("SSL_FAST_SKIP_CUDA_BUILD") == "1":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return os.environ.get("SSL_FAST_FORCE_CUDA") == "1" or torch.cuda.is_available()


def extensions():
    if os.environ.get("SSL_FAST_NO_EXT") == "1":
        return []
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    # -fopenmp: at::parallel_for is an inline template over `#pragma omp parallel` (torch's OpenMP backend);
    # compiled without it, every parallel_for of the extension runs on the calling thread alone.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    link = ["-fopenmp"]
    if os.environ.get("SSL_FAST_NATIVE", "1") != "0":
        cxx.append("-march=native")
    if _want_cuda(cuda_sources):
        if os.environ.get("SSL_FAST_CUDA_ARCHS"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["SSL_FAST_CUDA_ARCHS"]
        return [CUDAExtension("ssl_fast._C", cpp_sources + cuda_sources,
                              define_macros=[("SSL_FAST_WITH_CUDA", None)],
                              extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
                              extra_link_args=link)]
    return [CppExtension("ssl_fast._C", cpp_sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)]


setup(
    packages=find_packages(include=["ssl_fast", "ssl_fast.*"]) + ["ssl_fast.kernels"],
    package_dir={"ssl_fast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

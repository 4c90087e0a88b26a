"""Compile check of the CUDA multi-tensor EMA kernel (csrc/cuda/ema.cu) for sm_80 and sm_90, without a GPU.

CI has no GPU, so the CUDA kernel never runs there; this proves it still compiles for both architectures
with the flags torch's extension build uses (one nvcc call, ~40 s of CPU on 2 cores), that every dtype
variant (4 ema x 4 online dtypes) is emitted without register spills, and that the main loop uses 16-byte
vector loads and stores (read from the PTX that nvcc keeps). Skipped when nvcc is not found (``CUDA_HOME``
or ``PATH``).
"""

import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "csrc", "cuda", "ema.cu")
ARCHS = ("80", "90")
N_KERNELS = 16  # ema dtype x online dtype in {fp32, fp64, bf16, fp16}
# 16-byte vector accesses: 4 x 32-bit (fp32, or packed 16-bit pairs) or 2 x 64-bit (fp64)
VEC16_LOAD = re.compile(r"ld\.global(\.nc)?\.v4\.(f32|u32|b32)|ld\.global(\.nc)?\.v2\.(f64|u64|b64)")
VEC16_STORE = re.compile(r"st\.global\.v4\.(f32|u32|b32)|st\.global\.v2\.(f64|u64|b64)")


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _store_bytes(name):
    """Bytes per vector store of ema_multi_tensor_kernel<E, O, A, V> from its mangled name: V * sizeof(E)
    (V = 16 / max(sizeof(E), sizeof(O)) is the template's last argument, ``Li<V>E``)."""
    rest = name.split("ema_multi_tensor_kernelI", 1)[1]
    e_size = 4 if rest.startswith("f") else 8 if rest.startswith("d") else 2  # else c10::BFloat16 / c10::Half
    return int(re.search(r"Li(\d+)E", rest).group(1)) * e_size


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    from torch.utils import cpp_extension

    out = tmp_path_factory.mktemp("ema_cu")
    torch_inc = cpp_extension.include_paths()  # torch's headers; nvcc adds its own CUDA include dir
    cmd = [nvcc, "-c", SRC, "-o", str(out / "ema.o"), "-std=c++20", "-O3", "-Xcompiler", "-fPIC",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-DSSL_FAST_WITH_CUDA",
           "-Xptxas", "-v", "--keep", "--keep-dir", str(out)]
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS)
    cmd += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd += [f"-I{p}" for p in torch_inc]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr, out


def test_compiles(build):
    rc, log, _ = build
    assert rc == 0, log[-6000:]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_without_spills(build, arch):
    rc, log, _ = build
    assert rc == 0, log[-3000:]
    entries = re.findall(rf"Compiling entry function '(\w+)' for 'sm_{arch}'", log)
    assert len(set(entries)) == N_KERNELS, log[-3000:]
    # ptxas -v: "N bytes stack frame, S bytes spill stores, L bytes spill loads" once per entry and arch
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills and all(s == "0" and ld == "0" for s, ld in spills), log[-3000:]


@pytest.mark.parametrize("arch", ARCHS)
def test_vectorized_loads_and_stores(build, arch):
    rc, log, out = build
    assert rc == 0, log[-3000:]
    ptx_files = [f for f in os.listdir(out) if f.endswith(f"compute_{arch}.ptx")]
    assert ptx_files, os.listdir(out)
    with open(os.path.join(out, ptx_files[0])) as f:
        ptx = f.read()
    bodies = re.split(r"\.visible \.entry |\.entry ", ptx)[1:]
    assert len(bodies) == N_KERNELS
    for body in bodies:
        name = body.split("(", 1)[0]
        assert VEC16_LOAD.search(body), f"no 16-byte vector load in {name}"
        if _store_bytes(name) == 16:
            assert VEC16_STORE.search(body), f"no 16-byte vector store in {name}"
        else:  # a 16-bit ema with fp32 / fp64 online weights, or fp32 ema with fp64 online: 4 / 8-byte
            assert re.search(r"st\.global\.v(2|4)\.", body), f"no vector store in {name}"

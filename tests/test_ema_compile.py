"""Compile checks of the EMA GPU kernels for sm_80 and sm_90, without a GPU.

CI has no GPU, so neither GPU kernel runs there (the Triton kernel's math runs in the interpreter, in
tests/test_ema.py). This proves:

* CUDA (csrc/cuda/ema.cu): it compiles for both architectures with the flags torch's extension build uses
  (one nvcc call, ~40 s of CPU on 2 cores), every dtype variant (4 ema x 4 online dtypes) is emitted without
  register spills, and the main loop uses 16-byte vector loads and stores (read from the PTX that nvcc
  keeps). Skipped when nvcc is not found (``CUDA_HOME`` or ``PATH``).
* Triton (kernels/ema.py): every launch variant compiles ahead of time (triton.compile for
  GPUTarget("cuda", arch, 32), through scripts/check_triton_compile.py's helpers, in a subprocess without
  TRITON_INTERPRET) and the 16-byte-aligned variants use 16-byte vector loads / stores. Skipped when
  triton is missing or its ahead-of-time API is not the one the helpers speak.
"""

import json
import os
import re
import shutil
import subprocess
import sys

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


# ----------------------------------------------------------------------------------------------------
# Triton

TRITON_AOT = r"""
import importlib.util, json, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
root = sys.argv[1]
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
chk = load("_chk", os.path.join(root, "scripts", "check_triton_compile.py"))
try:
    api = chk._triton_api()
except chk.Unsupported as exc:
    print("UNSUPPORTED", exc)
    sys.exit(0)
K = load("_ema_kernels", os.path.join(root, "kernels", "ema.py"))
import torch, triton.language as tl
pairs = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
         (torch.float64, torch.float64), (torch.float32, torch.bfloat16), (torch.float32, torch.float16)]
for arch in (80, 90):
    for ed, od in pairs:
        acc = torch.float64 if torch.float64 in (ed, od) else torch.float32
        for aligned in (True, False):
            for from_ptr in ((True,) if acc == torch.float64 else (False, True)):
                meta = dict(device="meta")
                args = (torch.empty(8, 3, dtype=torch.int64, **meta), torch.empty(64, dtype=ed, **meta),
                        torch.empty(64, dtype=od, **meta), torch.empty((), dtype=acc, **meta), 0.996, 0.004)
                e_size, o_size = args[1].element_size(), args[2].element_size()
                kw = dict(CHUNK=K.CHUNK, BLOCK=K.BLOCK, ACC=K._TL_DTYPES[acc], M_FROM_PTR=from_ptr,
                          E_VEC=16 // e_size if aligned else 1, O_VEC=16 // o_size if aligned else 1,
                          RNE_BF16=False, num_warps=K.NUM_WARPS)
                sig = chk._specialize(api, K._ema_kernel, arch, args, kw)
                ptx = chk._compile(api, K._ema_kernel, arch, *sig).asm["ptx"]
                print(json.dumps(dict(arch=arch, e=str(ed), o=str(od), aligned=aligned, from_ptr=from_ptr,
                                      ops=sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx))))))
"""


@pytest.fixture(scope="module")
def triton_aot():
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", TRITON_AOT, ROOT], capture_output=True, text=True, env=env,
                          timeout=600)
    out = proc.stdout + proc.stderr
    if "UNSUPPORTED" in proc.stdout:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, out[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_triton_every_variant_compiles(triton_aot):
    # 5 fp32-accumulating dtype pairs x aligned / not x momentum as argument / from memory, plus fp64 (memory
    # only: a float argument is fp32), on 2 archs
    assert len(triton_aot) == 2 * (5 * 2 * 2 + 1 * 2 * 1), triton_aot


def test_triton_aligned_variants_vectorize(triton_aot):
    for rec in triton_aot:
        ops = rec["ops"]
        vec_ld = [op for op in ops if re.match(r"ld\.global.*\.v(2|4)\.b(32|64)", op)]
        vec_st = [op for op in ops if re.match(r"st\.global.*\.v(2|4)\.b(32|64)", op)]
        if rec["aligned"]:
            assert vec_ld and vec_st, rec

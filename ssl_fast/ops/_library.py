"""The ``ssl_fast`` operator namespace (``torch.ops.ssl_fast.*``): how every op registers its fused backends.

Each fused backend call is one dispatcher op with a fake (meta) implementation, so ``torch.compile``
traces through it without a graph break and ``torch.library.opcheck`` can test it. Two kinds:

* :func:`cpp_op`: ops defined in C++ (``TORCH_LIBRARY_FRAGMENT(ssl_fast, m)`` with a ``CPU`` impl, in
  ``csrc/cpu/<op>.cpp``); they exist once ``ssl_fast._C`` is loaded, and this adds their fake implementation.
* :func:`triton_op`: ops defined here in Python around a Triton launcher of ``kernels/<op>.py``, which is
  imported on the op's first call (importing triton costs ~0.5 s; ``import ssl_fast`` does not pay it).

Why not ``torch.library.custom_op``: its first call imports sympy and torch._dynamo (measured: ~1 s and
155 MiB of resident memory in a fresh process, then ~0.09 ms per call); a plain ``Library`` definition
with ``register_fake`` costs neither (~1 ms first call, ~0.01 ms per call). ``tests/test_first_call.py``
checks a fresh process.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Optional

import torch

from .. import _ext

NAMESPACE = "ssl_fast"
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")

#: Rows per tile of the C++ InfoNCE kernels (the ops' trailing ``block`` argument); 0: the kernel picks by shape.
CPU_BLOCK = int(os.environ.get("SSL_FAST_CPU_BLOCK", "0"))


def define(schema: str, fake: Callable, *, cpu: Optional[Callable] = None, cuda: Optional[Callable] = None):
    """Define ``ssl_fast::<name>`` from ``schema`` with CPU / CUDA impls and a fake impl; returns the overload
    (``torch.ops.ssl_fast.<name>.default``, cached by the caller: attribute lookups cost per call)."""
    name = schema.split("(", 1)[0].strip()
    LIB.define(schema)
    if cpu is not None:
        LIB.impl(name, cpu, "CPU")
    if cuda is not None:
        LIB.impl(name, cuda, "CUDA")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)
    return getattr(torch.ops.ssl_fast, name).default


def cpp_op(name: str, fake: Callable, *, block: bool = False):
    """The C++ op ``ssl_fast::<name>`` with ``fake`` registered as its fake impl; None when ``ssl_fast._C`` is not
    loaded or predates the op (the op's :class:`~ssl_fast.ops._backend.BackendTable` then falls back to torch).

    ``block=True``: the op takes the tile size last; the returned callable appends :data:`CPU_BLOCK` (read at
    call time) and takes the other arguments. Otherwise the overload itself is returned.
    """
    if not _ext.HAS_EXT or not hasattr(torch.ops.ssl_fast, name):
        return None
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)
    op = getattr(torch.ops.ssl_fast, name).default
    if not block:
        return op

    def with_block(*args):
        return op(*args, CPU_BLOCK)

    return with_block


def triton_op(schema: str, fake: Callable, launcher: str):
    """Define ``ssl_fast::<name>`` from ``schema``, implemented on CUDA (and on CPU, the Triton interpreter) by
    ``launcher`` = ``"<module>.<function>"`` of ``ssl_fast.kernels``, imported on the first call; returns the
    overload."""
    module, fn = launcher.rsplit(".", 1)
    qualified = f"ssl_fast.kernels.{module}"

    def impl(*args):
        module_ = sys.modules.get(qualified) or importlib.import_module(qualified)
        return getattr(module_, fn)(*args)

    return define(schema, fake, cpu=impl, cuda=impl)

"""The ``ssl_fast`` operator namespace (``torch.ops.ssl_fast.*``), shared by every op module.

Each fused backend call is one dispatcher op with a fake (meta) implementation, so ``torch.compile``
traces through it without a graph break and ``torch.library.opcheck`` can test it. Two kinds:

* ops defined in C++ (``TORCH_LIBRARY_FRAGMENT(ssl_fast, m)`` with a ``CPU`` impl, in ``csrc/cpu/<op>.cpp``):
  they exist once ``ssl_fast._C`` is loaded; :func:`fake_for` adds their fake implementation.
* ops defined here in Python (the Triton launchers): :func:`define` gives schema, impls and fake.

Why not ``torch.library.custom_op``: its first call imports sympy and torch._dynamo (measured: ~1 s and
155 MiB of resident memory in a fresh process, then ~0.09 ms per call); a plain ``Library`` definition
with ``register_fake`` costs neither (~1 ms first call, ~0.01 ms per call). ``tests/test_first_call.py``
checks a fresh process.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _ext

NAMESPACE = "ssl_fast"
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


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


def fake_for(name: str, fake: Callable):
    """Register the fake impl of the C++ op ``ssl_fast::<name>``; returns its overload, or None when the
    extension is not loaded (the op does not exist then)."""
    if not _ext.HAS_EXT:
        return None
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)
    return getattr(torch.ops.ssl_fast, name).default

"""Triton kernels of ssl_fast, installed as ``ssl_fast.kernels``.

Modules here hold ``@triton.jit`` kernels and their launch heuristics only; argument checks, dispatch
and autograd live in ``ssl_fast.ops``. Importing a module here imports triton.
"""

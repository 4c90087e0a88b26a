"""Ops: argument checks, backend dispatch and autograd for every fused kernel."""

from ._backend import BACKENDS, get_backend, set_backend
from .infonce import info_nce, ntxent

__all__ = ["BACKENDS", "get_backend", "set_backend", "info_nce", "ntxent"]

"""Backend selection shared by every op: ``triton`` | ``cpp`` | ``torch`` | ``auto``.

The choice comes from ``ssl_fast.set_backend(name)`` (also a context manager) or, when never set, from
the environment variable ``SSL_FAST_BACKEND`` (default ``auto``). ``auto`` picks ``triton`` for CUDA
tensors (falling back to ``torch`` with one warning when Triton is missing) and ``cpp`` for CPU
tensors (falling back to ``torch`` with one warning when the C++ extension is missing). An explicit
backend that cannot serve the inputs raises ``RuntimeError``; it never switches silently.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")
ENV_VAR = "SSL_FAST_BACKEND"

_state = threading.local()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The backend in force: the innermost ``set_backend``, else ``$SSL_FAST_BACKEND``, else ``auto``."""
    chosen = getattr(_state, "name", None)
    if chosen is not None:
        return chosen
    env = os.environ.get(ENV_VAR, "auto")
    try:
        return _check_name(env)
    except ValueError:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {env!r}") from None


class set_backend:
    """Select the backend for all ops; works as a plain call or as a context manager.

    Example:
        >>> ssl_fast.set_backend("cpp")          # from now on in this thread
        >>> with ssl_fast.set_backend("torch"):  # only inside the block
        ...     loss = ssl_fast.ntxent(z1, z2)
    """

    def __init__(self, name: str):
        name = _check_name(name)
        # A plain call replaces the setting; the context manager restores the previous one on exit.
        self._prev = getattr(_state, "name", None)
        _state.name = name
        self.name = name

    def __enter__(self) -> "set_backend":
        return self

    def __exit__(self, *exc) -> None:
        _state.name = self._prev


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Triton is importable and can run here (a CUDA device, or the CPU interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - broken install
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def resolve(device: torch.device, *, has_triton_impl: bool = True, requested: Optional[str] = None,
            dtype: Optional[torch.dtype] = None) -> str:
    """Map the requested backend to the one that runs for tensors on ``device`` (of ``dtype``).

    The Triton kernels take fp32 / bf16 / fp16; ``auto`` sends float64 CUDA tensors to the torch backend.
    """
    from .. import _ext

    name = requested or get_backend()
    if name == "auto":
        if device.type == "cuda":
            if dtype == torch.float64:
                return "torch"
            if has_triton_impl and triton_available():
                return "triton"
            _warn_once("auto-cuda", "ssl_fast: Triton is not available; CUDA tensors use the torch backend.")
            return "torch"
        if device.type == "cpu":
            if _ext.HAS_EXT:
                return "cpp"
            _warn_once("auto-cpu", "ssl_fast: the C++ extension ssl_fast._C is not built; CPU tensors use the "
                                   f"torch backend ({_ext.IMPORT_ERROR}).")
            return "torch"
        return "torch"
    if name == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpp' serves CPU tensors only, got tensors on {device}")
        if not _ext.HAS_EXT:
            raise RuntimeError(f"backend 'cpp' needs the C++ extension ssl_fast._C, which failed to load: "
                               f"{_ext.IMPORT_ERROR}")
        return "cpp"
    if name == "triton":
        if not has_triton_impl:
            raise RuntimeError("backend 'triton' has no kernel for this op")
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package, which is not importable")
        if device.type == "cpu" and not interpreter_enabled():
            raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton "
                               "is imported")
        if device.type not in ("cuda", "cpu"):
            raise RuntimeError(f"backend 'triton' does not serve tensors on {device}")
        return "triton"
    return "torch"

"""Backend selection shared by every op: ``triton`` | ``cpp`` | ``torch`` | ``auto``.

The choice comes from ``ssl_fast.set_backend(name)`` (also a context manager) or, when never set, from
the environment variable ``SSL_FAST_BACKEND`` (default ``auto``). ``auto`` picks ``triton`` for CUDA
tensors (falling back to ``torch`` with one warning when Triton is missing) and ``cpp`` for CPU
tensors (falling back to ``torch`` with one warning when the C++ extension is missing). An explicit
backend that cannot serve the inputs raises ``RuntimeError``; it never switches silently.

Every op declares its fused backends once, as a :class:`BackendTable` (``ssl_fast/ops/<op>.py``), and asks
it which backend runs (:meth:`BackendTable.resolve`): the one path for resolution, fallback and the one-time
warning. The table's entries obey one contract per op, so the op's autograd code does not depend on the
backend.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings
from typing import Callable, Dict, Mapping, Optional

import torch

from .. import _ext

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


class BackendTable:
    """The fused backends of one op: for ``cpp`` and ``triton``, a mapping of step name -> callable (the
    op's dispatcher ops, :func:`ssl_fast.ops._library.cpp_op` / :func:`~ssl_fast.ops._library.triton_op`), and
    optionally the same steps in plain ``torch``. Every backend's steps obey the op's one contract.

    Args:
        name: the op (for messages).
        cpp: the C++ steps; a None entry (``ssl_fast._C`` missing, or built before the op existed) makes the
            cpp backend unavailable: ``auto`` then falls back to torch with one warning, ``"cpp"`` raises.
        triton: the Triton steps (their kernels are imported on first use).
        torch: the steps in plain torch, or None when the op's torch path is the reference's autograd (the
            entry point calls it itself).
        cpp_on_cuda: the C++ op also has a CUDA kernel (``csrc/cuda``): True when built (``auto`` and ``"cpp"``
            then send CUDA tensors to it), False when the op has CUDA sources that were not built (``"cpp"`` on
            CUDA tensors says so), None when the op has none.
        triton_fp64: the Triton kernels take float64 (otherwise ``auto`` sends float64 CUDA tensors to torch).

    Example (an op's declaration, see ``ssl_fast/ops/infonce.py``)::

        TABLE = BackendTable("ntxent",
                             cpp=dict(fwd=cpp_op("ntxent_fwd_cpp", fake_fwd, block=True), ...),
                             triton=dict(fwd=triton_op("ntxent_fwd_triton(...) -> Tensor[]", fake_fwd,
                                                       "infonce.ntxent_forward"), ...))
        backend = TABLE.resolve(z1.device, backend, z1.dtype)     # "cpp" | "triton" | "torch"
        loss, *saved = TABLE[backend]["fwd"](z1, z2, inv_temp, normalize, d)
    """

    def __init__(self, name: str, *, cpp: Optional[Mapping[str, Optional[Callable]]] = None,
                 triton: Optional[Mapping[str, Callable]] = None, torch: Optional[Mapping[str, Callable]] = None,
                 cpp_on_cuda: Optional[bool] = None, triton_fp64: bool = False):
        self.name = name
        self.steps: Dict[str, Mapping[str, Callable]] = {}
        self.cpp_ok = bool(cpp) and all(fn is not None for fn in cpp.values())
        if self.cpp_ok:
            self.steps["cpp"] = dict(cpp)
        if triton:
            self.steps["triton"] = dict(triton)
        if torch:
            self.steps["torch"] = dict(torch)
        self.cpp_on_cuda = cpp_on_cuda if self.cpp_ok else (None if cpp_on_cuda is None else False)
        self.triton_fp64 = triton_fp64

    def __getitem__(self, backend: str) -> Mapping[str, Callable]:
        return self.steps[backend]

    def resolve(self, device: torch.device, requested: Optional[str] = None,
                dtype: Optional[torch.dtype] = None) -> str:
        """The backend that runs this op for tensors on ``device`` of ``dtype``: ``requested`` (a call's
        ``backend=``) or the one in force (:func:`get_backend`), resolved as the module docstring says."""
        name = _check_name(requested) if requested else get_backend()
        if name in ("auto", "cpp") and self.cpp_ok and _ext.HAS_EXT:  # the common case first
            if device.type == "cpu" or (device.type == "cuda" and self.cpp_on_cuda):
                return "cpp"
        if name == "cpp" and device.type == "cuda" and self.cpp_on_cuda is False:
            raise RuntimeError("backend 'cpp' on CUDA tensors needs ssl_fast._C built with its CUDA sources "
                               "(a GPU at build time, or SSL_FAST_FORCE_CUDA=1)")
        chosen = resolve(device, has_triton_impl="triton" in self.steps, requested=name,
                         dtype=None if self.triton_fp64 else dtype)
        if chosen == "cpp" and not self.cpp_ok:  # the extension is loaded but predates this op
            if name == "cpp":
                raise RuntimeError(f"backend 'cpp': ssl_fast._C has no {self.name} op (rebuild the extension)")
            _warn_once(f"auto-cpu-{self.name}", f"ssl_fast: ssl_fast._C has no {self.name} op (built before it "
                                                f"existed: rebuild the extension); CPU tensors use the torch backend.")
            return "torch"
        return chosen

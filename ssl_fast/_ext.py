"""Loads the compiled extension ``ssl_fast._C``; ``HAS_EXT`` is False when it is missing (pure-Python install).

Nothing here raises: a missing or broken extension is reported once, by the dispatcher, when an op
falls back to the torch backend.
"""

from __future__ import annotations

try:
    from . import _C  # noqa: F401

    HAS_EXT = True
    IMPORT_ERROR = None
except Exception as exc:  # ImportError, or an undefined symbol against another torch build
    _C = None
    HAS_EXT = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

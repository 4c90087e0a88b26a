"""Checkpoints: atomic writes, integrity check, and newest-good-checkpoint lookup.

A checkpoint ``ckpt_<step>.pt`` is written to a temporary file in the same folder, flushed and fsync'ed,
then renamed over the final name (``os.replace``: atomic on POSIX), so a crash mid-write never leaves a
partial file under a checkpoint name. Its SHA-256 goes to ``ckpt_<step>.pt.sha256`` (written the same way,
after the checkpoint). Loading verifies the digest when the sidecar exists, then ``torch.load(...,
weights_only=True)``: a truncated or corrupted file raises ``CheckpointError`` naming the file, and older
checkpoints are left untouched (only the oldest beyond ``keep`` are deleted, after a new one is complete).

Everything saved is tensors, numbers, strings, lists, tuples and dicts, so ``weights_only=True`` loads it.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
import warnings
from typing import Any, Dict, List, Optional

import torch

_NAME = re.compile(r"ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (truncated, corrupted, wrong format)."""


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename durable
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass


def save_checkpoint(state: Dict[str, Any], path: str) -> str:
    """Write ``state`` to ``path`` atomically, with its SHA-256 sidecar. Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    _atomic_write(path, data)
    _atomic_write(path + ".sha256", hashlib.sha256(data).hexdigest().encode())
    return path


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load and verify a checkpoint.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: digest mismatch, truncated or unreadable file (the message names the file).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    side = path + ".sha256"
    if os.path.isfile(side):
        with open(side, "rb") as f:
            want = f.read().decode(errors="replace").strip()
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise CheckpointError(f"checkpoint {path!r} is corrupted or truncated ({len(data)} bytes; SHA-256 "
                                  f"{got[:12]}... does not match the recorded {want[:12]}...)")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({len(data)} bytes): "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path!r} is not an ssl-fast training checkpoint")
    return state


def list_checkpoints(run_dir: str) -> List[str]:
    """Checkpoints in ``run_dir``, newest (highest step) first."""
    found = []
    for p in glob.glob(os.path.join(run_dir, "ckpt_*.pt")):
        m = _NAME.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def latest_good_checkpoint(run_dir: str, map_location="cpu") -> Optional[Dict[str, Any]]:
    """The newest checkpoint of ``run_dir`` that loads; corrupt ones are skipped with a warning. None if none."""
    for p in list_checkpoints(run_dir):
        try:
            state = load_checkpoint(p, map_location)
            state["_path"] = p
            return state
        except CheckpointError as exc:
            warnings.warn(f"skipping {exc}", stacklevel=2)
    return None


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (and their sidecars)."""
    for p in list_checkpoints(run_dir)[max(1, keep):]:
        for q in (p, p + ".sha256"):
            try:
                os.remove(q)
            except FileNotFoundError:
                pass


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt_{step:08d}.pt")

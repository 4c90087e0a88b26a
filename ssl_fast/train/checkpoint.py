"""Checkpoints: atomic writes, integrity check, compatibility check, and newest-good-checkpoint lookup.

A checkpoint ``ckpt_<step>.pt`` and its SHA-256 sidecar ``ckpt_<step>.pt.sha256`` are first written in full
to temporary files in the same folder (flushed and fsync'ed), then renamed over the final names
(``os.replace``: atomic on POSIX), checkpoint first. A crash or a full disk mid-write therefore never leaves a
partial file under a checkpoint name: a failed write removes its temporary files and raises
``CheckpointWriteError``, whose message says why (e.g. no space left: bytes needed and free) and that the
previous checkpoint is intact. Loading verifies the digest when the sidecar exists, then ``torch.load(...,
weights_only=True)``: a truncated or corrupted file raises ``CheckpointError`` naming the file, and older
checkpoints are left untouched (only the oldest beyond ``keep`` are deleted, after a new one is complete).

Compatibility. A training checkpoint records its format (``FORMAT``), the ssl_fast version that wrote it and
the run's configuration. ``check_compatible`` refuses, with a message that names what differs, a checkpoint
of another format, method, backbone or optimizer; ``load_model_state`` loads a state_dict and, when it does
not fit, names the missing / unexpected / differently shaped entries, the configuration values that differ
and the two ssl_fast versions.

Everything saved is tensors, numbers, strings, lists, tuples and dicts, so ``weights_only=True`` loads it.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import os
import re
import shutil
import warnings
from typing import Any, Dict, Iterable, List, Optional

import torch

_NAME = re.compile(r"ckpt_(\d+)\.pt$")
FORMAT = "ssl_fast.train/1"  # the layout of a training checkpoint this version reads and writes
# configuration values a training checkpoint must share with the run that resumes it (checked before loading)
MUST_MATCH = ("method", "backbone", "optimizer")
# values that shape the model: named when a state_dict does not fit
SHAPE_FIELDS = ("method", "backbone", "width", "small_stem", "data", "dataset", "proj_hidden_dim", "proj_dim",
                "pred_hidden_dim", "n_prototypes", "d0", "directclr_variant", "moco_version", "queue_size",
                "n_local_crops")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (truncated, corrupted, wrong format, another model)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (e.g. a full disk); nothing under a checkpoint name was changed.

    Attributes: ``path`` (the checkpoint that was not written), ``previous`` (the newest intact checkpoint
    of the folder, or None).
    """

    def __init__(self, message: str, path: str, previous: Optional[str]):
        super().__init__(message)
        self.path, self.previous = path, previous


def _version() -> str:
    from .. import __version__

    return __version__


def _fsync_dir(d: str) -> None:
    try:  # make the renames durable
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass


def _write_all(files: Dict[str, bytes]) -> None:
    """Write every ``{path: bytes}`` to a temporary file, fsync, then rename them all into place (in order).

    Nothing is renamed until every temporary file is complete, so a failure (ENOSPC, EIO ...) leaves every
    existing file as it was; the temporary files are removed on any failure.
    """
    tmps = {}
    try:
        for path, data in files.items():
            d = os.path.dirname(os.path.abspath(path))
            tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
            tmps[path] = tmp
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    for d in {os.path.dirname(os.path.abspath(p)) for p in files}:
        _fsync_dir(d)


def save_checkpoint(state: Dict[str, Any], path: str) -> str:
    """Write ``state`` to ``path`` atomically, with its SHA-256 sidecar. Returns ``path``.

    Raises:
        CheckpointWriteError: the file could not be written (full disk, quota, I/O error, read-only folder);
            the message names the cause and the previous checkpoint, which is left intact.
    """
    d = os.path.dirname(os.path.abspath(path))
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    try:
        os.makedirs(d, exist_ok=True)
        _write_all({path: data, path + ".sha256": hashlib.sha256(data).hexdigest().encode()})
    except OSError as exc:
        prev = next((p for p in list_checkpoints(d) if os.path.abspath(p) != os.path.abspath(path)), None)
        kept = (f"the previous checkpoint {os.path.basename(prev)} is intact" if prev else
                f"there is no earlier checkpoint in {d}")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = f"{shutil.disk_usage(d).free:,} bytes free"
            except OSError:  # pragma: no cover
                free = "free space unknown"
            why = f"no space left on the device of {d} (needs {len(data) + 64:,} bytes, {free})"
            fix = "free space (or point --run-dir to a larger disk) and continue with --resume auto"
        else:
            why = f"{exc.strerror or exc} ({type(exc).__name__}, errno {exc.errno})"
            fix = "fix the folder and continue with --resume auto"
        raise CheckpointWriteError(f"cannot write checkpoint {path!r}: {why}; nothing was replaced: {kept}. "
                                   f"{fix[0].upper()}{fix[1:]}", path, prev) from exc
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


def _written_by(state: Dict[str, Any]) -> str:
    v = state.get("ssl_fast_version")
    return f"ssl_fast {v}" if v else "an ssl_fast older than 0.1.0 (no version recorded)"


def _differences(saved: Dict[str, Any], current: Dict[str, Any], fields: Iterable[str]) -> List[str]:
    return [f"--{k.replace('_', '-')} {saved[k]} (checkpoint) vs {current[k]} (this run)" for k in fields
            if k in saved and k in current and saved[k] != current[k]]


def check_compatible(state: Dict[str, Any], config: Dict[str, Any], path: str) -> None:
    """Refuse a training checkpoint that this run cannot continue, naming what differs.

    Checked before anything is loaded: the checkpoint's format (``FORMAT``; another ssl_fast version may write
    another layout) and the configuration values of ``MUST_MATCH`` (method, backbone, optimizer). A checkpoint
    of another ssl_fast version with the same format is accepted with a warning; if its tensors do not fit,
    ``load_model_state`` says so.

    Args:
        state: a loaded checkpoint (``load_checkpoint``).
        config: this run's configuration (``TrainConfig.to_dict()``).
        path: the checkpoint's file name, for the messages.

    Raises:
        CheckpointError: another format, method, backbone or optimizer.
    """
    fmt = state.get("format")
    if fmt != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} has format {fmt!r}, written by {_written_by(state)}; this is "
                              f"ssl_fast {_version()}, which reads {FORMAT!r}: resume it with the version that "
                              f"wrote it, or start a new run directory")
    saved = state.get("config", {})
    diff = _differences(saved, config, MUST_MATCH)
    if diff:
        raise CheckpointError(f"checkpoint {path!r} belongs to another run: {'; '.join(diff)}. Resume with the "
                              f"checkpoint's values or start a new run directory")
    if state.get("ssl_fast_version") != _version():
        warnings.warn(f"checkpoint {path!r} was written by {_written_by(state)}; this is ssl_fast {_version()}",
                      stacklevel=2)


def load_model_state(module: torch.nn.Module, model_state: Dict[str, Any], path: str,
                     state: Optional[Dict[str, Any]] = None, config: Optional[Dict[str, Any]] = None) -> None:
    """``module.load_state_dict(model_state)`` (strict), with a ``CheckpointError`` that says what differs.

    The message lists up to 5 missing, unexpected and differently shaped entries, the shape-determining
    configuration values (``SHAPE_FIELDS``) that differ between the checkpoint's ``state["config"]`` and
    ``config``, and the ssl_fast versions when they differ.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in model_state]
    unexpected = [k for k in model_state if k not in own]
    shapes = [f"{k} {tuple(model_state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in model_state and torch.is_tensor(model_state[k]) and model_state[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        try:
            module.load_state_dict(model_state)
            return
        except RuntimeError as exc:  # pragma: no cover - a failure the comparison above does not see
            shapes = [str(exc).splitlines()[0][:200]]
    state = state or {}
    parts = []
    for name, items in (("missing in the checkpoint", missing), ("not in this model", unexpected),
                        ("shape (checkpoint vs this model)", shapes)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            parts.append(f"{name}: {', '.join(items[:5])}{more}")
    diff = _differences(state.get("config", {}), config or {}, SHAPE_FIELDS)
    if diff:
        parts.append("configuration: " + "; ".join(diff))
    if state.get("ssl_fast_version") != _version():
        parts.append(f"written by {_written_by(state)}, this is ssl_fast {_version()}")
    raise CheckpointError(f"checkpoint {path!r} does not fit this model: " + " | ".join(parts))


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

"""Checkpoint files that cannot be used, and a checkpoint folder on a full disk.

- Resuming from a checkpoint of another method, backbone, optimizer or model size, or one written by another
  ssl_fast version with another format or other tensors, raises ``CheckpointError`` whose message names what
  differs (the CLI prints it on one line and exits 1).
- A checkpoint folder on a full file system (a tiny tmpfs; needs root, skipped with the reason otherwise):
  the failed write raises ``CheckpointWriteError`` saying that no space is left and that the previous
  checkpoint is intact; the previous checkpoint still loads (its SHA-256 verified) and no temporary file is
  left behind.
"""

import os
import shutil
import subprocess
import tempfile

import pytest
import torch

import ssl_fast
from ssl_fast.train import CheckpointError, Trainer, latest_good_checkpoint, load_checkpoint, make_config
from ssl_fast.train.checkpoint import FORMAT, CheckpointWriteError, save_checkpoint
from test_train import _cli, tiny


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
    """A 2-step SimCLR run (small CNN, width 4, AdamW) with its checkpoint at step 2."""
    run = tmp_path_factory.mktemp("simclr_run")
    Trainer(make_config(tiny("simclr", run, max_steps=2))).fit()
    return run, run / "ckpt_00000002.pt"


def _resume(run, method="simclr", **kw):
    return Trainer(make_config(tiny(method, run, max_steps=4, resume="auto", **kw))).fit()


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_records_format_and_version(simclr_run):
    state = load_checkpoint(str(simclr_run[1]))
    assert state["format"] == FORMAT and state["ssl_fast_version"] == ssl_fast.__version__


@pytest.mark.parametrize("change, expected", [
    (dict(method="byol"), "--method simclr (checkpoint) vs byol (this run)"),
    (dict(backbone="resnet18"), "--backbone small_cnn (checkpoint) vs resnet18 (this run)"),
    (dict(optimizer="sgd"), "--optimizer adamw (checkpoint) vs sgd (this run)"),
])
def test_other_method_backbone_optimizer_named(simclr_run, tmp_path, change, expected):
    run = _copy_run(simclr_run[0], tmp_path / "run")
    method = change.pop("method", "simclr")
    with pytest.raises(CheckpointError, match="belongs to another run") as e:
        _resume(run, method, **change)
    assert expected in str(e.value) and "ckpt_00000002.pt" in str(e.value)


def test_other_model_size_names_tensors_and_flag(simclr_run, tmp_path):
    run = _copy_run(simclr_run[0], tmp_path / "run")
    with pytest.raises(CheckpointError, match="does not fit this model") as e:
        _resume(run, width=8)
    msg = str(e.value)
    assert "backbone.stem.0.weight (4, 1, 3, 3) vs (8, 1, 3, 3)" in msg
    assert "--width 4 (checkpoint) vs 8 (this run)" in msg
    assert "written by" not in msg  # same version: not mentioned


def _rewrite(path, edit):
    state = load_checkpoint(str(path))
    state.pop("_path", None)
    edit(state)
    save_checkpoint(state, str(path))  # a valid file (new digest): only the content differs


def test_other_version_other_format(simclr_run, tmp_path):
    run = _copy_run(simclr_run[0], tmp_path / "run")
    _rewrite(run / "ckpt_00000002.pt", lambda s: s.update(format="ssl_fast.train/0", ssl_fast_version="0.0.9"))
    with pytest.raises(CheckpointError) as e:
        _resume(run)
    msg = str(e.value)
    assert "format 'ssl_fast.train/0', written by ssl_fast 0.0.9" in msg
    assert f"this is ssl_fast {ssl_fast.__version__}, which reads '{FORMAT}'" in msg


def test_other_version_renamed_tensors(simclr_run, tmp_path):
    # a later version that renamed a module: same format, other keys
    run = _copy_run(simclr_run[0], tmp_path / "run")

    def rename(s):
        s["ssl_fast_version"] = "9.0.0"
        s["model"] = {k.replace("projector.", "head."): v for k, v in s["model"].items()}

    _rewrite(run / "ckpt_00000002.pt", rename)
    with pytest.raises(CheckpointError, match="does not fit this model") as e, pytest.warns(UserWarning, match="9.0.0"):
        _resume(run)
    msg = str(e.value)
    assert "missing in the checkpoint: projector." in msg and "not in this model: head." in msg
    assert f"written by ssl_fast 9.0.0, this is ssl_fast {ssl_fast.__version__}" in msg


def test_other_version_same_layout_resumes_with_a_warning(simclr_run, tmp_path):
    run = _copy_run(simclr_run[0], tmp_path / "run")
    _rewrite(run / "ckpt_00000002.pt", lambda s: s.update(ssl_fast_version="0.0.9"))
    with pytest.warns(UserWarning, match="written by ssl_fast 0.0.9; this is ssl_fast"):
        out = _resume(run)
    assert out["resumed"] and out["steps"] == 4


def test_cli_prints_one_line_and_exits_1(simclr_run, tmp_path, capsys):
    run = _copy_run(simclr_run[0], tmp_path / "run")
    code, _, err = _cli(capsys, "train", *_flags(tiny("byol", run, max_steps=4, resume="auto")))
    assert code == 1, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("ssl-fast train: error:")]
    assert len(lines) == 1 and "--method simclr (checkpoint) vs byol (this run)" in lines[0], err[-2000:]


def _flags(overrides):
    out = []
    for k, v in overrides.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else ["--no-" + k.replace("_", "-")] if v is False else [flag, str(v)]
    return out


# ---------------------------------------------------------------------------------------------- full disk
def _tmpfs_unavailable():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    d = tempfile.mkdtemp(prefix="sslf_tmpfs_probe")
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True, text=True)
        if r.returncode != 0:
            return f"cannot mount a tmpfs: {r.stderr.strip()}"
        subprocess.run(["umount", d], check=True)
    finally:
        os.rmdir(d)
    return None


TMPFS_WHY = _tmpfs_unavailable()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at tmp_path/disk, unmounted afterwards even when the test fails."""
    if TMPFS_WHY:
        pytest.skip(f"full-disk test needs a tmpfs: {TMPFS_WHY}")
    d = tmp_path / "disk"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _fill(disk, leave):
    """Fill ``disk`` with a filler file until about ``leave`` bytes are free."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_save_on_a_full_disk_keeps_previous_checkpoint(small_disk):
    run = small_disk / "run"
    small = {"step": 2, "w": torch.ones(1000)}
    first = save_checkpoint(small, str(run / "ckpt_00000002.pt"))
    before = open(first, "rb").read()
    _fill(small_disk, 64 * 1024)
    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint({"step": 4, "w": torch.ones(100_000)}, str(run / "ckpt_00000004.pt"))  # 400 kB
    msg = str(e.value)
    assert "no space left" in msg and "the previous checkpoint ckpt_00000002.pt is intact" in msg, msg
    assert e.value.previous == first and isinstance(e.value.__cause__, OSError)
    assert sorted(os.listdir(run)) == ["ckpt_00000002.pt", "ckpt_00000002.pt.sha256"]  # no partial / temp files
    assert open(first, "rb").read() == before and torch.equal(load_checkpoint(first)["w"], small["w"])


def test_training_on_a_full_disk_stops_with_a_clear_error(small_disk, capsys):
    # step 2 written; the disk then fills up; the step-4 checkpoint does not fit: the CLI says so and exits 1,
    # the step-2 checkpoint still loads, and the run continues from it once there is room
    run = small_disk / "run"
    over = tiny("simclr", run, max_steps=6, ckpt_every=2, keep_checkpoints=1, resume="auto")
    Trainer(make_config(dict(over, stop_at_step=2))).fit()
    size = os.path.getsize(run / "ckpt_00000002.pt")
    _fill(small_disk, size // 2)
    code, _, err = _cli(capsys, "train", *_flags(over))
    assert code == 1, err[-3000:]
    assert "no space left" in err and "the previous checkpoint ckpt_00000002.pt is intact" in err, err[-3000:]
    assert not [p for p in os.listdir(run) if ".tmp" in p]
    assert latest_good_checkpoint(str(run))["step"] == 2
    os.remove(small_disk / "filler")
    code, _, err = _cli(capsys, "train", *_flags(over))
    assert code == 0, err[-3000:]
    assert latest_good_checkpoint(str(run))["step"] == 6

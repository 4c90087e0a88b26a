"""Trainers: methods' wiring, the loop, exact resume, checkpoints, DDP (gloo), faults under torchrun, Ctrl-C, CLI.

All on CPU with tiny settings (16 px digits, a width-4 small CNN, a few steps). Every method runs: an op or
module missing from the build is a failure, not a skip.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ssl_fast.data import Pipeline, ViewSpec, digits_view, load_digits
from ssl_fast.methods import METHODS, build_backbone, build_method
from ssl_fast.train import (CheckpointError, LARS, Trainer, WarmupCosine, latest_good_checkpoint, load_checkpoint,
                            make_config, param_groups)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def tiny(method, run_dir, **kw):
    """Overrides for a few-second run: 16 px digits, width-4 CNN, batch 32."""
    base = dict(method=method, data="digits", image_size=16, width=4, batch_size=32, proj_hidden_dim=32,
                proj_dim=16, pred_hidden_dim=16, d0=8, n_prototypes=10, queue_size=64 if method == "moco" else 0,
                local_size=8,
                n_local_crops=2, max_steps=6, warmup_epochs=0, knn=False, progress=False, run_dir=str(run_dir),
                ckpt_every=100, log_every=1, threads=1)
    base.update(kw)
    return base


# ------------------------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("method", METHODS)
def test_method_step_on_tiny_inputs(method):
    cfg = make_config(tiny(method, "unused"))
    backbone, dim = build_backbone("small_cnn", 1, width=4)
    m = build_method(cfg, backbone, dim, steps_per_epoch=2)
    views = [torch.randn(6, 1, 16, 16) for _ in range(2 + getattr(m, "n_local_views", 0))]
    views[2:] = [torch.randn(6, 1, 8, 8) for _ in views[2:]]
    loss, logs = m(views, 0, 10)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", METHODS)
def test_loss_decreases_on_digits(method, tmp_path):
    tr = Trainer(make_config(tiny(method, tmp_path, max_steps=16, lr=3e-3, lr_scaling="none", batch_size=64,
                                    width=8)))
    out = tr.fit()
    losses = tr.losses()
    assert len(losses) == 16 and all(map(lambda v: v == v and abs(v) < 1e6, losses))
    first = 1 if method == "moco" else 0  # MoCo v2: step 0 contrasts against the random initial queue
    assert sum(losses[-4:]) / 4 < sum(losses[first:first + 4]) / 4, losses
    assert out["done"] and os.path.isfile(os.path.join(tmp_path, "backbone.pt"))


def test_directclr_d0_larger_than_representation_is_rejected():
    backbone, dim = build_backbone("small_cnn", 1, width=4)
    with pytest.raises(ValueError, match="d0=33 .* representation dimension 32"):
        build_method(make_config(tiny("directclr", "x", d0=33)), backbone, dim)


def test_directclr_loss_sees_only_the_subvector():
    cfg = make_config(tiny("directclr", "x", d0=8))
    backbone, dim = build_backbone("small_cnn", 1, width=4)
    m = build_method(cfg, backbone, dim)
    r = torch.randn(6, dim, requires_grad=True)
    m.criterion(r[:3], r[3:]).backward()
    assert r.grad[:, 8:].abs().max() == 0 and r.grad[:, :8].abs().max() > 0


def test_simsiam_target_gets_no_gradient():
    cfg = make_config(tiny("simsiam", "x"))
    backbone, dim = build_backbone("small_cnn", 1, width=4)
    m = build_method(cfg, backbone, dim)
    seen = []
    crit = m.criterion

    class Record(torch.nn.Module):
        def forward(self, p, z):
            seen.append((p.requires_grad, z.requires_grad))
            return crit(p, z)

    m.criterion = Record()
    m([torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)])
    assert seen == [(True, False), (True, False)]


def test_byol_target_changes_only_by_ema():
    cfg = make_config(tiny("byol", "x", ema_momentum=0.9, ema_final_momentum=1.0))
    backbone, dim = build_backbone("small_cnn", 1, width=4)
    m = build_method(cfg, backbone, dim)
    teacher = m.teacher.teacher
    t_params = list(teacher.parameters())
    assert all(not p.requires_grad for p in t_params)
    opt_ids = {id(p) for g in param_groups(m, 0.0) for p in g["params"]}
    assert not opt_ids & {id(p) for p in t_params}
    before = [p.detach().clone() for p in t_params]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    loss, _ = m([torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)], 0, 10)
    loss.backward()
    assert all(p.grad is None for p in t_params)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))  # the optimizer did not move it
    online = [p.detach().clone() for p in m.online.parameters()]
    mom = m.teacher.momentum_at(1, 10)
    m.on_step_end(1, 10)
    for b, o, a in zip(before, online, teacher.parameters()):
        torch.testing.assert_close(a, mom * b + (1 - mom) * o, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ data and optimizer
def test_augment_per_sample_and_deterministic():
    x = load_digits(16).train_x[:8]
    pipe = Pipeline([digits_view(16), ViewSpec(size=12, hflip=1.0, blur=1.0, solarize=1.0, jitter=1.0)])
    a = pipe(x, torch.Generator().manual_seed(3))
    b = pipe(x, torch.Generator().manual_seed(3))
    c = pipe(x, torch.Generator().manual_seed(4))
    assert [v.shape for v in a] == [(8, 1, 16, 16), (8, 1, 12, 12)]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and not torch.equal(a[0], c[0])
    same = Pipeline([ViewSpec(size=16, jitter=0, blur=0, grayscale=0, hflip=0)])(x[:1].repeat(4, 1, 1, 1),
                                                                                 torch.Generator().manual_seed(0))[0]
    assert not torch.equal(same[0], same[1])  # per-sample crops
    rgb = torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8)
    out = Pipeline([ViewSpec(size=16, grayscale=1.0)], mean=(0.5,), std=(0.5,))(rgb, torch.Generator())[0]
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.isfinite(out).all()


def test_lars_excludes_bias_and_norm_and_schedule():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    groups = param_groups(model, 1e-4)
    assert [len(g["params"]) for g in groups] == [2, 4]
    assert groups[1]["weight_decay"] == 0 and groups[1]["lars"] is False
    opt = LARS(groups, lr=0.1, momentum=0.0, eta=0.001)
    w = model[0].weight.detach().clone()
    b = model[0].bias.detach().clone()
    model(torch.randn(16, 4)).pow(2).sum().backward()
    g_w, g_b = model[0].weight.grad.clone(), model[0].bias.grad.clone()
    opt.step()
    g = g_w + 1e-4 * w
    trust = 0.001 * w.norm() / g.norm()
    torch.testing.assert_close(model[0].weight.detach(), w - 0.1 * trust * g)
    torch.testing.assert_close(model[0].bias.detach(), b - 0.1 * g_b)  # plain SGD, no decay
    sched = WarmupCosine(total=10, warmup=2, floor=0.1)
    assert [round(sched(s), 4) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.1]


def test_config_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("method: simclr\nbatch-size: 64\ntemperature: 0.3\n")
    from ssl_fast._train_cli import _load_yaml

    cfg = make_config({"temperature": 0.7}, _load_yaml(str(y)))
    assert (cfg.batch_size, cfg.temperature, cfg.backbone) == (64, 0.7, "small_cnn")  # recipe < yaml < flags
    with pytest.raises(ValueError, match="unknown config key 'bogus'"):
        make_config({"bogus": 1})
    with pytest.raises(ValueError, match="multiple of --accum-steps"):
        make_config({"batch_size": 10, "accum_steps": 3})


# --------------------------------------------------------------------------------------- checkpoints
def _weights(tr):
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in tr.method.state_dict().items()}


def _equal(a, b):
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_resume_matches_uninterrupted(method, tmp_path):
    full = Trainer(make_config(tiny(method, tmp_path / "full", accum_steps=2)))
    full.fit()
    first = Trainer(make_config(tiny(method, tmp_path / "part", accum_steps=2, stop_at_step=3)))
    out = first.fit()
    assert out["steps"] == 3 and not out["done"]
    second = Trainer(make_config(tiny(method, tmp_path / "part", accum_steps=2, resume="auto")))
    out = second.fit()
    assert out["resumed"] and out["done"]
    assert first.losses() + second.losses() == full.losses()
    a, b = _weights(full), _weights(second)
    assert a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)


def test_corrupt_checkpoint_rejected_previous_kept(tmp_path):
    Trainer(make_config(tiny("simclr", tmp_path, ckpt_every=2, keep_checkpoints=3))).fit()
    names = sorted(p for p in os.listdir(tmp_path) if p.endswith(".pt") and p.startswith("ckpt_"))
    assert names == ["ckpt_00000002.pt", "ckpt_00000004.pt", "ckpt_00000006.pt"]
    newest, prev = tmp_path / names[-1], tmp_path / names[-2]
    prev_bytes = prev.read_bytes()
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(str(newest))
    with pytest.warns(UserWarning, match="skipping"):
        state = latest_good_checkpoint(str(tmp_path))
    assert state["step"] == 4 and prev.read_bytes() == prev_bytes
    os.remove(str(newest) + ".sha256")  # no digest: the unpickler itself must refuse the file
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(str(newest))
    # resuming from the run directory continues from the intact step-4 checkpoint
    with pytest.warns(UserWarning, match="skipping"):
        out = Trainer(make_config(tiny("simclr", tmp_path, resume="auto", max_steps=6))).fit()
    assert out["resumed"] and out["steps"] == 6


# ------------------------------------------------------------------------------------ DDP and faults
def _torchrun(out_dir, overrides, nproc=2, max_restarts=0, env=None, timeout=240):
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", os.path.join(HERE, "_train_worker.py"), str(out_dir),
           json.dumps(overrides)]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    e.pop("SSL_FAST_FAULT_STEP", None) if not env or "SSL_FAST_FAULT_STEP" not in env else None
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [torch.load(os.path.join(out_dir, f"rank{i}.pt"), weights_only=True) for i in range(nproc)], r


def _assert_same(a, b):
    keys = [k for k in a if "running" not in k and "num_batches" not in k]  # BN buffers are per rank
    assert all(_equal(a[k], b[k]) for k in keys), [k for k in keys if not _equal(a[k], b[k])][:5]


@pytest.fixture(scope="module")
def ddp_simclr(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp_simclr")
    over = tiny("simclr", d / "run", max_steps=5, ckpt_every=2, gather_distributed=True)
    return over, _torchrun(d / "out", over)[0]


def test_ddp_simclr_ranks_stay_in_sync(ddp_simclr):
    _, (r0, r1) = ddp_simclr
    _assert_same(r0["state"], r1["state"])
    # with gather_distributed every rank's loss is the loss of the global batch: the same value on both ranks
    assert r0["losses"] == pytest.approx(r1["losses"], rel=1e-5) and len(r0["losses"]) == 5
    assert r0["summary"]["world_size"] == 2 and r0["summary"]["steps"] == 5


def test_ddp_byol_ranks_stay_in_sync(tmp_path):
    (r0, r1), _ = _torchrun(tmp_path / "out", tiny("byol", tmp_path / "run", max_steps=4))
    _assert_same(r0["state"], r1["state"])
    assert any(k.startswith("teacher.") for k in r0["state"])


def test_killed_worker_restarts_and_resumes(ddp_simclr, tmp_path):
    # rank 1 dies (exit 13) right after step 3; torchrun restarts both workers, which resume from the step-2
    # checkpoint. The restarted workers must not read the dead attempt's keys in torchrun's shared store
    # (ssl_fast.train.trainer.init_process_group prefixes each attempt): no retry, any failure fails.
    over, (ref0, _) = ddp_simclr
    (f0, f1), r = _torchrun(tmp_path / "out", dict(over, run_dir=str(tmp_path / "run"), resume="auto"),
                            max_restarts=1, env={"SSL_FAST_FAULT_STEP": "3", "SSL_FAST_FAULT_RANK": "1"})
    log = r.stdout + r.stderr
    assert "exitcode: 13" in log, log[-2000:]  # the fault hook fired and the agent restarted the workers
    assert f0["summary"]["resumed"] == 1 and f0["summary"]["steps"] == 5
    _assert_same(ref0["state"], f0["state"])
    _assert_same(f0["state"], f1["state"])


def test_ctrl_c_writes_checkpoint_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssl_fast.cli", "train", "--method", "simclr", "--image-size", "16", "--width", "4",
           "--batch-size", "32", "--max-steps", "100000", "--no-knn", "--no-progress", "--log-every", "1",
           "--threads", "1", "--run-dir", str(run)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.csv").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted at step" in err and "--resume auto" in err
    state = latest_good_checkpoint(str(run))
    assert state is not None and state["step"] >= 1


# ------------------------------------------------------------------------------------------------- CLI
def _cli(capsys, *args):
    """Run ``ssl-fast ARGS`` in-process: (exit code, stdout, stderr)."""
    from ssl_fast.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse: --help, bad flags
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_help_bad_flag_missing_data_unknown_method_bad_config(capsys):
    code, out, _ = _cli(capsys, "train", "--help")
    assert code == 0
    for opt in ("--method", "--data", "--config", "--resume", "--precision", "--sync-bn", "--d0", "--accum-steps"):
        assert opt in out
    code, _, err = _cli(capsys, "train", "--no-such-flag")
    assert code == 2 and "unrecognized arguments: --no-such-flag" in err
    code, _, err = _cli(capsys, "train", "--data", "/no/such/folder")
    assert code == 2 and "data path '/no/such/folder' does not exist" in err
    code, _, err = _cli(capsys, "train", "--method", "dino")
    assert code == 2 and "invalid choice: 'dino'" in err
    code, _, err = _cli(capsys, "train", "--method", "directclr", "--d0", "4096", "--width", "4", "--no-knn")
    assert code == 2 and "d0=4096" in err
    code, _, err = _cli(capsys, "train", "--config", "/no/such.yaml")
    assert code == 2 and "config file '/no/such.yaml' does not exist" in err
    code, _, err = _cli(capsys, "eval", "--checkpoint", "/no/such.pt")
    assert code == 2 and "does not exist" in err


def test_cli_as_a_program_bad_flag_exit_code():
    r = subprocess.run([sys.executable, "-m", "ssl_fast.cli", "train", "--bogus"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr


def test_cli_train_eval_linear_probe_export(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = _cli(capsys, "train", "--method", "simclr", "--image-size", "16", "--width", "4", "--batch-size",
                          "64", "--max-steps", "3", "--no-progress", "--threads", "1", "--run-dir", str(run))
    assert code == 0, err
    assert "at initialization ->" in out and "% trained" in out
    assert (run / "metrics.csv").read_text().startswith("step,epoch,loss,lr,images_per_s,memory_mb")
    ckpt = str(run / "ckpt_00000003.pt")
    code, out, err = _cli(capsys, "eval", "--checkpoint", ckpt, "--export", str(tmp_path / "bb.pt"))
    assert code == 0 and "kNN accuracy" in out, err
    sd = torch.load(tmp_path / "bb.pt", weights_only=True)
    net, _ = build_backbone("small_cnn", 1, width=4)
    net.load_state_dict(sd)
    code, out, err = _cli(capsys, "linear-probe", "--checkpoint", ckpt, "--epochs", "5")
    assert code == 0 and "held-out" in out, err
    (run / "ckpt_00000003.pt").write_bytes(b"garbage")
    code, _, err = _cli(capsys, "eval", "--checkpoint", ckpt)
    assert code == 1 and "corrupted or truncated" in err


def test_resnet_backbone_exports_torchvision_keys():
    import torchvision

    net, dim = build_backbone("resnet18", 3)
    assert dim == 512
    res = torchvision.models.resnet18().load_state_dict(net.state_dict(), strict=False)
    assert res.missing_keys == ["fc.weight", "fc.bias"] and not res.unexpected_keys
    small, _ = build_backbone("resnet18", 3, small_stem=True)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_bf16_autocast_channels_last_steps(tmp_path):
    tr = Trainer(make_config(tiny("simclr", tmp_path, precision="bf16", channels_last=True, max_steps=1,
                                            batch_size=8)))
    tr.fit()
    assert all(v == v for v in tr.losses())


def test_tensorboard_logs_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    Trainer(make_config(tiny("directclr", tmp_path, max_steps=2))).fit()
    assert any(f.startswith("events.") for f in os.listdir(tmp_path / "tensorboard"))


def test_imagefolder_and_cifar_from_disk(tmp_path):
    import numpy as np
    from PIL import Image

    from ssl_fast.data import build_source

    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / "img" / split / c)
            for i in range(4):
                pixels = np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "img" / split / c / f"{i}.png")
    src = build_source(str(tmp_path / "img"), load_size=20, workers=0)
    assert (len(src), src.num_classes, src.channels) == (8, 2, 3)
    assert next(src.train_batches(4, 0, 0)).shape == (4, 3, 20, 20)
    out = Trainer(make_config(tiny("simclr", tmp_path / "run", data=str(tmp_path / "img"), batch_size=4, load_size=20,
                                   workers=0, max_steps=2, knn=True))).fit()
    assert out["done"] and 0 <= out["knn_final"] <= 1
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        build_source(str(tmp_path), dataset="cifar10")

"""Trainer options beyond the basics: gradient caching, MoCo v2 shuffle-BN, SimSiam's fixed predictor lr,
GPU JPEG decoding of ImageFolder data, --compile, --precision bf16 / fp16 and --sync-bn.

CPU, tiny settings (``tiny`` of test_train.py); the CUDA decode test runs only where a GPU is present.
"""

import os

import pytest
import torch

from ssl_fast.train import Trainer, make_config

from test_train import _assert_same, _cli, _torchrun, tiny


def _bn_eval(module):
    """BatchNorm layers in eval mode (running statistics, per-sample): makes the encoder batch-independent."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _one_step(over, bn_eval=True, buffers=False):
    tr = Trainer(make_config(over))
    tr._setup()
    if bn_eval:
        _bn_eval(tr.method)
    x = next(tr.source.train_batches(tr.local_batch, tr.cfg.seed, 0))
    state = tr.method.state_dict if buffers else lambda: dict(tr.method.named_parameters())
    before = {k: p.detach().clone() for k, p in state().items()}
    loss = tr._train_step(x)
    after = {k: p.detach().clone() for k, p in state().items()}
    return float(loss), before, after


# ------------------------------------------------------------------------------------- gradient caching
@pytest.mark.parametrize("method,chunk", [("simclr", 6), ("simclr", 16), ("directclr", 7)])
def test_grad_cache_step_equals_full_batch_step(method, chunk, tmp_path):
    # BatchNorm in eval mode: the encoder is then per-sample and chunking cannot change the embeddings, so
    # the cached step must equal the full-batch step (loss and SGD-updated weights) up to fp32 rounding.
    over = tiny(method, tmp_path, batch_size=16, optimizer="sgd", lr=0.5, lr_scaling="none", momentum=0.0,
                weight_decay=0.0)
    loss_ref, init, ref = _one_step(over)
    loss_gc, init_gc, got = _one_step(dict(over, grad_cache_chunk=chunk))
    assert all(torch.equal(init[k], init_gc[k]) for k in init)  # same start
    assert loss_gc == pytest.approx(loss_ref, rel=1e-6, abs=1e-6)
    moved = [k for k in ref if not torch.equal(ref[k], init[k])]
    assert len(moved) > len(ref) // 2  # the step changed the weights: the comparison below means something
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_grad_cache_differs_from_per_chunk_losses(tmp_path):
    # the cached step is NOT gradient accumulation: the loss of chunks with only their own negatives differs
    over = tiny("simclr", tmp_path, batch_size=16, optimizer="sgd", lr=0.5, lr_scaling="none")
    loss_gc, _, _ = _one_step(dict(over, grad_cache_chunk=4))
    loss_acc, _, _ = _one_step(dict(over, accum_steps=4))
    assert abs(loss_gc - loss_acc) > 1e-3


@pytest.mark.parametrize("method", ["simclr", "directclr"])
def test_grad_cache_one_chunk_equals_plain_step_with_train_mode_bn(method, tmp_path):
    # a chunk of >= 2B images holds both views: BatchNorm (train mode) sees the plain step's batch
    over = tiny(method, tmp_path, batch_size=16, optimizer="sgd", lr=0.5, lr_scaling="none", momentum=0.0,
                weight_decay=0.0)
    loss_ref, _, ref = _one_step(over, bn_eval=False, buffers=True)
    loss_gc, _, got = _one_step(dict(over, grad_cache_chunk=32), bn_eval=False, buffers=True)
    assert any("running_mean" in k for k in ref)  # BN statistics compared too: updated once, not per replay
    assert loss_gc == pytest.approx(loss_ref, rel=1e-6, abs=1e-6)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    loss_small, _, _ = _one_step(dict(over, grad_cache_chunk=8), bn_eval=False)
    assert abs(loss_small - loss_ref) > 1e-4  # smaller chunks: per-chunk BN statistics (documented)


def test_grad_cache_trains_with_batchnorm_in_train_mode(tmp_path):
    # the documented behaviour with train-mode BN: per-chunk statistics; the run trains and the loss is finite
    tr = Trainer(make_config(tiny("simclr", tmp_path, batch_size=16, grad_cache_chunk=4, max_steps=3)))
    out = tr.fit()
    assert out["done"] and len(tr.losses()) == 3 and all(v == v for v in tr.losses())


@pytest.mark.slow  # three 2-process torchrun jobs (~15 s each on 2 cores)
def test_ddp_grad_cache_gathered_negatives(tmp_path):
    # DDP + gathered negatives: the cached step's single loss call does the gather once; a one-chunk cached
    # step equals the plain DDP step, and with 4 chunks per rank (no_sync on all but the last replay) the
    # gradients are still all-reduced: both ranks end with the same weights
    base = tiny("simclr", tmp_path / "run", max_steps=3, batch_size=32, gather_distributed=True)
    (p0, p1), _ = _torchrun(tmp_path / "plain", dict(base, run_dir=str(tmp_path / "r0")))
    (g0, g1), _ = _torchrun(tmp_path / "gc32", dict(base, run_dir=str(tmp_path / "r1"), grad_cache_chunk=32))
    (c0, c1), _ = _torchrun(tmp_path / "gc8", dict(base, run_dir=str(tmp_path / "r2"), grad_cache_chunk=8))
    assert g0["losses"] == pytest.approx(p0["losses"], rel=1e-5) and g1["losses"] == pytest.approx(p1["losses"],
                                                                                                     rel=1e-5)
    for k, v in p0["state"].items():  # weights and BN statistics
        if torch.is_tensor(v):
            torch.testing.assert_close(g0["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    _assert_same(c0["state"], c1["state"])
    assert c0["losses"] == pytest.approx(c1["losses"], rel=1e-5)  # the loss of the global batch on both ranks
    assert all(v == v for v in c0["losses"])


@pytest.mark.parametrize("method", ["moco", "byol", "simsiam", "swav"])
def test_grad_cache_rejected_where_unsupported(method):
    with pytest.raises(ValueError, match=f"--grad-cache-chunk is not supported by --method {method}"):
        make_config(tiny(method, "x", grad_cache_chunk=4))


def test_grad_cache_bad_values():
    with pytest.raises(ValueError, match="--grad-cache-chunk must be a positive int"):
        make_config(tiny("simclr", "x", grad_cache_chunk=0))
    with pytest.raises(ValueError, match="--grad-cache-chunk replaces --accum-steps"):
        make_config(tiny("simclr", "x", grad_cache_chunk=4, accum_steps=2))
    with pytest.raises(ValueError, match="--grad-cache-chunk 31 splits .* last one holds 1 image"):
        Trainer(make_config(tiny("simclr", "x", batch_size=16, grad_cache_chunk=31)))._setup()


# ------------------------------------------------------------------------------------- MoCo shuffle-BN
def _moco(**kw):
    from ssl_fast.methods import build_backbone, build_method

    cfg = make_config(tiny("moco", "x", **kw))
    backbone, dim = build_backbone("small_cnn", 1, width=4)
    return build_method(cfg, backbone, dim)


def test_batch_unshuffle_inverts_batch_shuffle_single_process():
    from ssl_fast.methods.moco import batch_shuffle, batch_unshuffle

    x = torch.randn(16, 3, 2, 2)
    xs, idx = batch_shuffle(x)
    assert not torch.equal(xs, x) and torch.equal(xs.sort(0).values, x.sort(0).values)  # a real permutation
    assert torch.equal(batch_unshuffle(xs, idx), x)
    assert torch.equal(batch_unshuffle(xs * 2 + 1, idx), x * 2 + 1)  # per-sample f commutes


def test_moco_shuffle_bn_groups_single_process():
    m = _moco(shuffle_bn=True, shuffle_bn_groups=4)
    teacher = m.teacher.module if hasattr(m.teacher, "module") else m.teacher.teacher
    x = torch.randn(16, 1, 16, 16)
    # BN in train mode: 4 groups of 4 permuted samples normalize differently from one batch of 16
    assert not torch.allclose(m.keys(x), teacher(x), atol=1e-4)
    _bn_eval(teacher)  # per-sample key encoder: the shuffle must be invisible in the keys
    torch.testing.assert_close(m.keys(x), teacher(x), rtol=1e-5, atol=1e-6)
    one = _moco(shuffle_bn=True)  # one process, one group: exactly the plain key encoder (no permutation)
    t1 = one.teacher.module if hasattr(one.teacher, "module") else one.teacher.teacher
    assert torch.equal(one.keys(x), t1(x))
    from ssl_fast.methods import recipe

    assert recipe("moco", "imagenet")["shuffle_bn"] is True and "shuffle_bn" not in recipe("moco", "imagenet_v3")
    with pytest.raises(ValueError, match="--shuffle-bn / --shuffle-bn-groups apply to --method moco only"):
        make_config(tiny("simclr", "x", shuffle_bn=True))
    with pytest.raises(ValueError, match="--shuffle-bn-groups 3 must divide"):
        Trainer(make_config(tiny("moco", "x", batch_size=16, shuffle_bn=True, shuffle_bn_groups=3)))._setup()


def _shuffle_worker(rank, world):
    from ssl_fast.methods.moco import batch_shuffle, batch_unshuffle
    import torch.distributed as dist

    b = 8
    x = torch.randn(b, 5, generator=torch.Generator().manual_seed(100 + rank))  # different on every rank
    torch.manual_seed(rank)  # different RNG streams: the permutation must still be the one of rank 0
    xs, idx = batch_shuffle(x)
    everyone = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(everyone, idx)
    assert all(torch.equal(e, everyone[0]) for e in everyone), "permutation not broadcast from rank 0"
    x_all = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(x_all, x)
    x_all = torch.cat(x_all)
    src = torch.argsort(idx).view(world, b)[rank]  # rows of the global batch this rank encodes
    assert torch.equal(xs, x_all[src])
    assert (src // b != rank).any(), "no sample crossed ranks"
    torch.manual_seed(0)  # the same encoder weights on every rank (as DDP keeps them)
    enc = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))  # BN-free
    torch.testing.assert_close(batch_unshuffle(enc(xs), idx), enc(x), rtol=0, atol=1e-6)
    # the MoCo key path: with a per-sample (eval-mode BN) key encoder the shuffled keys equal the plain ones
    m = _moco(shuffle_bn=True)
    teacher = m.teacher.module if hasattr(m.teacher, "module") else m.teacher.teacher
    _bn_eval(teacher)
    img = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(7 + rank))
    torch.testing.assert_close(m.keys(img), teacher(img), rtol=1e-5, atol=1e-6)


def test_batch_shuffle_under_two_gloo_processes():
    from test_distributed import spawn

    spawn(_shuffle_worker, 2)


def test_ddp_moco_v2_shuffle_bn_ranks_stay_in_sync(tmp_path):
    over = tiny("moco", tmp_path / "run", max_steps=3, shuffle_bn=True, gather_distributed=True)
    (r0, r1), _ = _torchrun(tmp_path / "out", over)
    _assert_same(r0["state"], r1["state"])  # weights, EMA teacher and the (gathered) queue
    assert any(k.startswith("queue.") for k in r0["state"])
    assert len(r0["losses"]) == 3 and all(v == v for v in r0["losses"] + r1["losses"])


# ---------------------------------------------------------------------------- SimSiam's fixed predictor lr
@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_simsiam_fix_pred_lr_keeps_predictor_at_initial_lr(optimizer, tmp_path):
    from ssl_fast.methods import recipe

    assert recipe("simsiam", "imagenet")["fix_pred_lr"] is True
    tr = Trainer(make_config(tiny("simsiam", tmp_path, optimizer=optimizer, lr=0.05, lr_scaling="none",
                                  warmup_epochs=0, max_steps=5, fix_pred_lr=True)))
    out = tr.fit()
    assert out["done"]
    pred = {id(p) for p in tr.method.predictor.parameters()}
    fixed = [g for g in tr.optimizer.param_groups if g.get("fix_lr")]
    assert {id(p) for g in fixed for p in g["params"]} == pred  # exactly the predictor's parameters
    others = [g for g in tr.optimizer.param_groups if not g.get("fix_lr")]
    assert not pred & {id(p) for g in others for p in g["params"]}
    assert all(g["lr"] == pytest.approx(0.05) for g in fixed)
    # the cosine schedule after 5 of 5 steps: the others decayed to (almost) 0
    assert all(g["lr"] < 0.05 * 0.1 for g in others), [g["lr"] for g in others]
    # without the flag every group decays
    tr2 = Trainer(make_config(tiny("simsiam", tmp_path / "b", optimizer=optimizer, lr=0.05, lr_scaling="none",
                                   warmup_epochs=0, max_steps=5)))
    tr2.fit()
    assert all(g["lr"] < 0.05 * 0.1 and not g.get("fix_lr") for g in tr2.optimizer.param_groups)


def test_fix_pred_lr_resume_keeps_groups(tmp_path):
    over = tiny("simsiam", tmp_path, lr=0.05, lr_scaling="none", max_steps=4, fix_pred_lr=True)
    Trainer(make_config(dict(over, stop_at_step=2))).fit()
    tr = Trainer(make_config(dict(over, resume="auto")))
    tr.fit()
    assert [g["lr"] for g in tr.optimizer.param_groups if g.get("fix_lr")] == pytest.approx([0.05, 0.05])


def test_fix_pred_lr_rejected_without_predictor():
    for over in (dict(method="simclr"), dict(method="moco", moco_version="v2")):
        with pytest.raises(ValueError, match="--fix-pred-lr needs a method with a predictor"):
            make_config(tiny(over["method"], "x", fix_pred_lr=True, **{k: v for k, v in over.items() if k != "method"}))


# ------------------------------------------------------------------------------------ GPU JPEG decoding
def _image_folder(root, n=3):
    """root/{train,val}/{a,b}/ with JPEGs (RGB, quality 75 / 95, grayscale) and PNGs (RGB, RGBA) of odd sizes."""
    import numpy as np
    from PIL import Image

    files = []
    for split in ("train", "val"):
        for ci, c in enumerate(("a", "b")):
            os.makedirs(root / split / c)
            for i in range(n):
                rng = np.random.default_rng(100 * ci + i)
                h, w = 29 + 3 * i, 41 - 2 * i
                yy, xx = np.mgrid[0:h, 0:w]
                base = np.stack([(xx * 5 + 20 * i) % 256, (yy * 7) % 256, ((xx + yy) * 3) % 256], -1)
                pix = np.clip(base + rng.integers(-25, 25, base.shape), 0, 255).astype(np.uint8)
                kind = (i + ci) % 4
                p = root / split / c / f"{i}.{'jpg' if kind < 2 else 'png'}"
                if kind == 0:
                    Image.fromarray(pix).save(p, quality=75)
                elif kind == 1:
                    Image.fromarray(pix[..., 0]).save(p, quality=95)  # grayscale JPEG
                elif kind == 2:
                    Image.fromarray(pix).save(p)
                else:
                    Image.fromarray(np.dstack([pix, pix[..., :1]])).save(p)  # RGBA PNG
                files.append(p)
    return files


def _pil_rgb(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def test_decode_images_cpu_matches_pil(tmp_path):
    import torchvision

    from ssl_fast.data import decode_images
    from ssl_fast.data.datasets import is_jpeg

    files = _image_folder(tmp_path)
    datas = [torchvision.io.read_file(str(p)) for p in files]
    assert [is_jpeg(d) for d in datas] == [p.suffix == ".jpg" for p in files]
    for p, img in zip(files, decode_images(datas, "cpu")):
        ref = _pil_rgb(p)
        assert img.dtype == torch.uint8 and img.shape == ref.shape, p
        err = (img.int() - ref.int()).abs().max().item()
        if p.suffix == ".png":
            assert err == 0, p
        else:  # libjpeg-turbo in both: identical in the tested build; allow IDCT rounding of other builds
            assert err <= 2, (p, err)


@pytest.mark.parametrize("workers", [0, 2])
def test_imagefolder_gpu_decode_path_on_cpu(tmp_path, workers):
    from ssl_fast.data import build_source, resize_center_crop
    from ssl_fast.data.datasets import epoch_order

    _image_folder(tmp_path)
    raw = build_source(str(tmp_path), load_size=20, workers=workers, decode="gpu", device="cpu")
    pil = build_source(str(tmp_path), load_size=20, workers=0)
    assert raw.decode == "gpu" and pil.decode == "pil"
    assert build_source(str(tmp_path), load_size=20, workers=0, decode="auto", device="cpu").decode == "pil"
    got = torch.cat(list(raw.train_batches(2, seed=3, epoch=1)))
    ref_pil = torch.cat(list(pil.train_batches(2, seed=3, epoch=1)))
    assert got.shape == ref_pil.shape == (6, 3, 20, 20) and got.dtype == torch.uint8
    order = epoch_order(len(raw), 3, 1).tolist()
    samples = raw.train.samples
    ref = torch.stack([resize_center_crop(_pil_rgb(samples[i][0]), 20) for i in order[:6]])
    assert torch.equal(got, ref)  # decode_image == PIL's pixels, then the same resize + crop
    diff = (got.int() - ref_pil.int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.05  # torch's antialiased bicubic vs PIL's bicubic
    (x, y), = list(raw.eval_batches("test", batch_size=6))
    assert x.shape == (6, 3, 20, 20) and y.tolist() == [s[1] for s in [raw.test.samples[i] for i in
            torch.randperm(6, generator=torch.Generator().manual_seed(1)).tolist()]]


def test_trainer_with_gpu_decode_option_on_cpu(tmp_path):
    _image_folder(tmp_path / "img")
    with pytest.raises(ValueError, match="--decode must be one of"):
        make_config(tiny("simclr", tmp_path / "run", data=str(tmp_path / "img"), decode="nvjpeg"))
    out = Trainer(make_config(tiny("simclr", tmp_path / "run", data=str(tmp_path / "img"), batch_size=4,
                                   load_size=20, workers=0, max_steps=2, decode="gpu", knn=True))).fit()
    assert out["done"] and 0 <= out["knn_final"] <= 1


@pytest.mark.requires_cuda
def test_gpu_jpeg_decode_on_cuda_matches_cpu(tmp_path):
    import torchvision

    from ssl_fast.data import build_source, decode_images

    files = _image_folder(tmp_path)
    datas = [torchvision.io.read_file(str(p)) for p in files]
    gpu = decode_images(datas, "cuda")
    cpu = decode_images(datas, "cpu")
    for p, g, c in zip(files, gpu, cpu):
        assert g.is_cuda and g.shape == c.shape, p
        err = (g.cpu().int() - c.int()).abs()
        if p.suffix == ".png":
            assert err.max() == 0, p  # PNGs are decoded on the CPU in both paths
        else:  # nvJPEG vs libjpeg-turbo: IDCT / upsampling rounding
            assert err.float().mean() < 2 and err.max() <= 16, (p, err.max())
    src = build_source(str(tmp_path), load_size=20, workers=0, decode="auto", device="cuda")
    assert src.decode == "gpu"
    x = next(src.train_batches(4, 0, 0))
    assert x.is_cuda and x.shape == (4, 3, 20, 20) and x.dtype == torch.uint8


# ------------------------------------------------------------------- --compile, --precision, --sync-bn
@pytest.mark.slow  # inductor's first compile: ~40 s on 2 cores
def test_compile_two_steps_finite(tmp_path):
    tr = Trainer(make_config(tiny("simclr", tmp_path, compile=True, max_steps=2, batch_size=8)))
    out = tr.fit()
    assert out["done"] and len(tr.losses()) == 2 and all(torch.isfinite(torch.tensor(tr.losses())))
    assert hasattr(tr.method.backbone, "_compiled_call_impl") and tr.method.backbone._compiled_call_impl is not None


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_steps_on_cpu(precision, dtype, tmp_path):
    # fp16: GradScaler starts at 2**16 and skips the first steps whose scaled gradients overflow (3 on this
    # model: scale 65536 -> 8192), so 6 steps make sure some are taken
    tr = Trainer(make_config(tiny("simclr", tmp_path, precision=precision, max_steps=6, batch_size=16)))
    seen = []
    tr._setup_orig = tr._setup

    def setup():
        tr._setup_orig()
        tr.method.projector.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    tr._setup = setup
    out = tr.fit()
    losses = tr.losses()
    assert out["done"] and len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))), losses
    assert seen and all(d == dtype for d in seen)  # autocast really ran in the low precision
    assert tr.amp_dtype == dtype
    # fp16: the gradient scaler is on (CPU too) and the weights stay fp32; bf16 needs none
    assert tr.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        assert tr.scaler.get_scale() > 0 and tr.scaler.state_dict()["_growth_tracker"] >= 0
    assert all(p.dtype == torch.float32 for p in tr.method.parameters())
    fresh = Trainer(make_config(tiny("simclr", tmp_path / "init", precision=precision, batch_size=16)))
    fresh._setup()  # the same seed: the initial weights of the run
    init = dict(fresh.method.named_parameters())
    moved = [k for k, p in tr.method.named_parameters() if not torch.equal(p, init[k])]
    assert len(moved) > len(init) // 2  # optimizer steps were taken (not all skipped by the scaler)


def _sync_bn_worker(rank, world, run_dir):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))  # as torchrun sets them
    cfg = make_config(tiny("simclr", f"{run_dir}", sync_bn=True, max_steps=1, batch_size=8))
    with pytest.raises(ValueError, match="--sync-bn needs CUDA devices"):
        Trainer(cfg).fit()


def test_sync_bn_on_cpu_ddp_raises_clear_error(tmp_path):
    # torch's SyncBatchNorm has no CPU kernel ("expected input tensor to be on GPU or XPU or privateuseone"):
    # under DDP on CPU the trainer refuses --sync-bn with a ValueError naming it, before any step
    import torch.distributed as dist

    from test_distributed import spawn

    x = torch.nn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="GPU"):  # the torch behaviour the trainer's check stands for
        _init_single_gloo(tmp_path)
        try:
            x(torch.randn(4, 3))
        finally:
            dist.destroy_process_group()
    spawn(_sync_bn_worker, 2, str(tmp_path / "run"))


def _init_single_gloo(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)


def test_sync_bn_single_process_is_a_no_op(tmp_path):
    tr = Trainer(make_config(tiny("simclr", tmp_path, sync_bn=True, max_steps=1, batch_size=8)))
    tr.fit()
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in tr.method.modules())



def test_cli_help_documents_new_options(capsys):
    code, out, _ = _cli(capsys, "train", "--help")
    assert code == 0
    for opt in ("--grad-cache-chunk", "--shuffle-bn", "--no-shuffle-bn", "--shuffle-bn-groups", "--fix-pred-lr",
                "--no-fix-pred-lr", "--decode", "--compile", "--precision", "--sync-bn"):
        assert opt in out, opt
    code, _, err = _cli(capsys, "train", "--method", "moco", "--grad-cache-chunk", "8", "--no-knn")
    assert code == 2 and "--grad-cache-chunk is not supported by --method moco" in err
    code, _, err = _cli(capsys, "train", "--decode", "nvjpeg")
    assert code == 2 and "invalid choice: 'nvjpeg'" in err

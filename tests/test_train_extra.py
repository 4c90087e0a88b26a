"""Trainer options beyond the basics: gradient caching, MoCo v2 shuffle-BN, SimSiam's fixed predictor lr,
GPU JPEG decoding of ImageFolder data, --compile, --precision bf16 / fp16 and --sync-bn.

CPU, tiny settings (``tiny`` of test_train.py); the CUDA decode test runs only where a GPU is present.
"""

import pytest
import torch

from ssl_fast.train import Trainer, make_config

from test_train import _assert_same, _cli, _torchrun, skip_if_missing, tiny


def _bn_eval(module):
    """BatchNorm layers in eval mode (running statistics, per-sample): makes the encoder batch-independent."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _one_step(over, bn_eval=True):
    tr = Trainer(make_config(over))
    tr._setup()
    if bn_eval:
        _bn_eval(tr.method)
    x = next(tr.source.train_batches(tr.local_batch, tr.cfg.seed, 0))
    before = {k: p.detach().clone() for k, p in tr.method.named_parameters()}
    loss = tr._train_step(x)
    after = {k: p.detach().clone() for k, p in tr.method.named_parameters()}
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


def test_grad_cache_trains_with_batchnorm_in_train_mode(tmp_path):
    # the documented behaviour with train-mode BN: per-chunk statistics; the run trains and the loss is finite
    tr = Trainer(make_config(tiny("simclr", tmp_path, batch_size=16, grad_cache_chunk=4, max_steps=3)))
    out = tr.fit()
    assert out["done"] and len(tr.losses()) == 3 and all(v == v for v in tr.losses())


@pytest.mark.parametrize("method", ["moco", "byol", "simsiam", "swav"])
def test_grad_cache_rejected_where_unsupported(method):
    with pytest.raises(ValueError, match=f"--grad-cache-chunk is not supported by --method {method}"):
        make_config(tiny(method, "x", grad_cache_chunk=4))


def test_grad_cache_bad_values():
    with pytest.raises(ValueError, match="--grad-cache-chunk must be a positive int"):
        make_config(tiny("simclr", "x", grad_cache_chunk=0))
    with pytest.raises(ValueError, match="--grad-cache-chunk replaces --accum-steps"):
        make_config(tiny("simclr", "x", grad_cache_chunk=4, accum_steps=2))
    with pytest.raises(ValueError, match="--grad-cache-chunk 5 splits .* last one holds 1 image"):
        Trainer(make_config(tiny("simclr", "x", batch_size=16, grad_cache_chunk=5)))._setup()

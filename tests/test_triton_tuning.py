"""kernels/tuning.py: the tile sweep's per-launch overrides (bench/tune.py) reach every launcher's table, and
an unset variable leaves the tables as written."""

import json

import pytest
import torch

pytest.importorskip("triton")

from ssl_fast.kernels import ema, infonce, infonce_rect, sinkhorn, tuning  # noqa: E402


def test_unset_leaves_the_tables(monkeypatch):
    monkeypatch.delenv(tuning.ENV, raising=False)
    assert infonce._fwd_config(8192, 128, torch.bfloat16)["BLOCK"] == 128
    assert infonce._bwd_config(128, torch.bfloat16)["SINGLE"] is True
    assert sinkhorn._config(3000)["BLOCK_K"] == 4096
    assert ema._launch_config()["CHUNK"] == ema.CHUNK


def test_override_replaces_only_the_named_keys(monkeypatch):
    table = {"infonce_fwd": {"BLOCK": 64, "num_stages": 4}, "infonce_bwd": {"BLOCK_N": 32},
             "infonce_rect": {"BLOCK_M": 16}, "sinkhorn": {"num_warps": 16}, "ema": {"CHUNK": 4096}}
    monkeypatch.setenv(tuning.ENV, json.dumps(table))
    fwd = infonce._fwd_config(8192, 128, torch.bfloat16)
    assert (fwd["BLOCK"], fwd["num_stages"], fwd["BLOCK_K"], fwd["num_warps"]) == (64, 4, 64, 8)
    assert infonce._bwd_config(128, torch.bfloat16)["BLOCK_N"] == 32
    assert infonce_rect._rect_config(128, torch.bfloat16)["BLOCK_M"] == 16
    assert sinkhorn._config(3000)["num_warps"] == 16
    assert ema._launch_config()["CHUNK"] == 4096


def test_ema_chunk_override_keeps_the_answer(monkeypatch):
    """The chunk table is cached per chunk size: another CHUNK never reuses a stale table."""
    if not (torch.cuda.is_available() or ema._INTERPRET):
        pytest.skip("triton needs CUDA or the interpreter")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(3000, generator=g), torch.randn(7, 5, generator=g)]
    online = [torch.randn(3000, generator=g).to(dev), torch.randn(7, 5, generator=g).to(dev)]
    outs = []
    for chunk in (None, 512):
        if chunk:
            monkeypatch.setenv(tuning.ENV, json.dumps({"ema": {"CHUNK": chunk, "BLOCK": 256}}))
        e = [t.to(dev, copy=True) for t in start]
        ema.ema_update_(e, online, 0.9, None)
        outs.append(e)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_json_names_the_variable(monkeypatch):
    monkeypatch.setenv(tuning.ENV, "[1, 2]")
    tuning._parse.cache_clear()
    with pytest.raises(ValueError, match=tuning.ENV):
        infonce._fwd_config(8192, 128, torch.bfloat16)

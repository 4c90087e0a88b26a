"""Gradient caching (GradCache, Gao et al. 2021): a contrastive step on a batch larger than memory.

A contrastive loss couples every pair of the batch, so the batch cannot simply be split into micro-batches
whose gradients add up. GradCache splits it anyway, in three passes:

1. embed every chunk of ``chunk_size`` inputs without an autograd graph (activation memory of one chunk);
2. compute the loss on all embeddings and its gradient w.r.t. every embedding (the fused op: the B x B
   logits are never stored either), and back-propagate it into the loss's own parameters (a temperature);
3. re-run every chunk WITH a graph and back-propagate its slice of the cached embedding gradient.

The parameters' gradients equal those of the full-batch step (up to float rounding), because the loss's
gradient w.r.t. the embeddings is exact and the encoder is re-run on the same inputs with the same random
state: the CPU and CUDA RNG states are recorded before each chunk in pass 1 and restored for its replay, so
dropout / random augmentation inside the model draw the same numbers (pass 1's draws are the step's).
Layers whose output depends on the other rows of the batch (BatchNorm in training mode) see chunks, not
the batch: the result then equals a full-batch step whose BatchNorm uses per-chunk statistics (as with
gradient accumulation); use a GroupNorm / LayerNorm encoder or SyncBN-free heads for exactness. Running
statistics are updated twice per chunk (pass 1 and the replay).

With DDP, pass a DDP-wrapped model: the replays of all but the last chunk run under ``model.no_sync()``
so its gradient all_reduce runs once. A distributed loss (``process_group=``) is called once per step in
pass 2, so its one all_gather / reduce-scatter happen once per step, not per chunk.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Sequence, Union

import torch

Model = Callable[..., torch.Tensor]


class _RngState:
    """CPU + CUDA generator states, captured now and restorable in a fork (the global stream continues)."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None

    @contextlib.contextmanager
    def replay(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def _chunks(x, chunk_size: int):
    if isinstance(x, torch.Tensor):
        return list(torch.split(x, chunk_size))
    parts = [torch.split(t, chunk_size) for t in x]  # a tuple of tensors fed together
    return [tuple(p[i] for p in parts) for i in range(len(parts[0]))]


def _forward(model, chunk):
    return model(*chunk) if isinstance(chunk, tuple) else model(chunk)


def cached_step(
    model: Union[Model, Sequence[Model]],
    inputs: Sequence[Union[torch.Tensor, Sequence[torch.Tensor]]],
    loss_fn: Callable[..., torch.Tensor],
    chunk_size: int,
) -> torch.Tensor:
    """One gradient-cached step: accumulates into ``.grad`` what ``loss_fn(*[model(x) for x in inputs])
    .backward()`` would, holding the activations of only ``chunk_size`` inputs at a time.

    Args:
        model: the encoder applied to every input, or one encoder per input (e.g. CLIP's two towers).
        inputs: the batches, one per view / tower (e.g. ``[x0, x1]``); each a tensor (B, ...) or a tuple of
            tensors split together along dim 0.
        loss_fn: maps the embeddings (one (B, D) tensor per input) to a scalar loss, e.g.
            ``lambda z0, z1: ssl_fast.ntxent(z0, z1, 0.5)``; its own parameters get their gradients too.
        chunk_size: inputs per forward/backward of the encoder; need not divide B.

    Returns:
        The loss (detached).

    Example:
        >>> loss = ssl_fast.gradcache.cached_step(model, [x0, x1], lambda a, b: ssl_fast.ntxent(a, b), 256)
        >>> optimizer.step(); optimizer.zero_grad()
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one batch")
    models = list(model) if isinstance(model, (list, tuple)) else [model] * len(inputs)
    if len(models) != len(inputs):
        raise ValueError(f"model: got {len(models)} encoders for {len(inputs)} inputs")

    # pass 1: embeddings without graph, RNG state recorded per chunk
    chunked: List[list] = [_chunks(x, chunk_size) for x in inputs]
    states: List[List[_RngState]] = []
    embs = []
    with torch.no_grad():
        for m, chunks in zip(models, chunked):
            st, outs = [], []
            for c in chunks:
                st.append(_RngState())
                outs.append(_forward(m, c))
            states.append(st)
            embs.append(torch.cat(outs).detach().requires_grad_())

    # pass 2: the loss and its gradient w.r.t. every embedding (and the loss's own parameters)
    loss = loss_fn(*embs)
    loss.backward()
    grads = [e.grad for e in embs]

    # pass 3: replay each chunk with graph, back-propagate its slice of the cached gradient
    total = sum(len(c) for c in chunked)
    done = 0
    for m, chunks, st, g in zip(models, chunked, states, grads):
        start = 0
        for c, s in zip(chunks, st):
            done += 1
            sync = contextlib.nullcontext() if done == total or not hasattr(m, "no_sync") else m.no_sync()
            with sync, s.replay():
                out = _forward(m, c)
                n = out.shape[0]
                out.backward(g[start:start + n])
            start += n
    return loss.detach()


class GradCache:
    """``cached_step`` as an object holding the model, loss and chunk size.

    Args:
        model: encoder or one encoder per input; loss_fn, chunk_size: as :func:`cached_step`.

    Example:
        >>> gc = ssl_fast.GradCache(model, lambda a, b: ssl_fast.ntxent(a, b, 0.1), chunk_size=128)
        >>> loss = gc.step(x0, x1)   # batch 4096 at the memory of 128
    """

    def __init__(self, model, loss_fn, chunk_size: int):
        self.model, self.loss_fn, self.chunk_size = model, loss_fn, chunk_size

    def step(self, *inputs) -> torch.Tensor:
        return cached_step(self.model, inputs, self.loss_fn, self.chunk_size)

    __call__ = step


__all__ = ["GradCache", "cached_step"]

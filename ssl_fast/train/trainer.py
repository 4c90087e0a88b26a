"""The training loop shared by every method.

One ``Trainer(cfg).fit()`` call: distributed set-up (torchrun env -> NCCL on GPUs, gloo on CPU), seeding,
data, backbone + method, optimizer + warmup/cosine schedule, autocast (bf16 / fp16 with a scaler),
channels_last, optional ``torch.compile`` of the backbone, gradient accumulation or gradient caching
(``--grad-cache-chunk``), DDP (optional SyncBN), kNN monitor, checkpoints (atomic; exact resume) and logs (tqdm, CSV, TensorBoard).

Exact resume. Data order is a function of (seed, epoch) and the augmentation generator is re-seeded from
(seed, step, rank) before each step, so a resumed run draws the same batches and views as an uninterrupted
one; the checkpoint also holds model (incl. EMA teacher and queues, which are module state), optimizer,
scheduler, gradient scaler, step, and every rank's torch / CUDA / numpy / Python RNG states. Bit for bit
with 1 or 2 processes; with 3+, the first step after a (re)start differs in float rounding: DDP re-buckets the
gradients after the first step of every process (without find_unused_parameters), and an all-reduce over 3+
ranks sums each element in an order that depends on the bucket layout (4 ranks, 6 steps: 6e-8).

Signals and faults. SIGINT / SIGTERM finish the current step, write a checkpoint and raise
``TrainingInterrupted`` (the CLI exits with 130 and prints how to resume). Test hook: with
``SSL_FAST_FAULT_STEP=k`` the process of rank ``SSL_FAST_FAULT_RANK`` (default 0) exits abruptly (exit code
13, no clean-up) right after step k, on the first attempt of a torchrun job only
(``TORCHELASTIC_RESTART_COUNT`` 0 or unset).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..data import Pipeline, build_source, byol_views, digits_view, multicrop, simclr_views
from ..methods import build_backbone, build_method
from .checkpoint import (FORMAT, CheckpointError, check_compatible, checkpoint_path, latest_good_checkpoint,
                         load_checkpoint, load_model_state, prune_checkpoints, save_checkpoint)
from .config import TrainConfig
from .evaluate import knn_eval
from .log import RunLogger, peak_memory_mb
from .optim import WarmupCosine, build_optimizer, lr_lambdas, scaled_lr


class TrainingInterrupted(Exception):
    """Raised after a signal stopped training; ``.checkpoint`` is the checkpoint written on the way out."""

    def __init__(self, checkpoint: Optional[str], step: int):
        super().__init__(f"training interrupted at step {step}; checkpoint {checkpoint}")
        self.checkpoint, self.step = checkpoint, step


# ----------------------------------------------------------------------------------------------- helpers
class _Embedder:
    """``model(x, embed=True)`` (through DDP's forward when wrapped) with DDP's ``no_sync`` for gradient caching.

    BatchNorm running statistics are updated in the first pass only (once per chunk): during the replay with
    graph (grad enabled) every BatchNorm's momentum is 0 and its ``num_batches_tracked`` is put back.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        if hasattr(model, "no_sync"):
            self.no_sync = model.no_sync
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and m.training and m.track_running_stats]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not self.bns:  # pass 1 (no graph): the statistics update here
            return self.model(x, embed=True)
        saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0
        try:
            return self.model(x, embed=True)
        finally:
            for m, (mom, n) in zip(self.bns, saved):
                m.momentum = mom
                m.num_batches_tracked.copy_(n)


def _rng_state(device: torch.device) -> Dict[str, Any]:
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                    "cached": float(cached)}}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def init_process_group(backend: str) -> None:
    """``dist.init_process_group(backend)`` from torchrun's environment, isolated per elastic attempt.

    torchrun's agent shares its rendezvous TCPStore with the workers and keeps the same server across
    restarts, and ``env://`` adds no per-attempt prefix (torch 2.11-2.15). The keys the failed attempt's
    workers wrote (gloo's listening addresses, NCCL's unique id) are still there when the restarted workers
    look them up: a worker that reads its peer's key before the peer rewrites it connects to a dead port
    ("connectFullMesh ... Connection refused") or waits on a stale barrier count. Every attempt therefore
    gets its own key space, ``PrefixStore("ssl_fast/attempt_<TORCHELASTIC_RESTART_COUNT>")``.

    Only where the store is shared (``TORCHELASTIC_USE_AGENT_STORE=True``, torchrun's default): with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` rank 0 hosts a new store for every attempt, and the restart
    counts of the nodes' agents may differ (a replaced node's agent counts from 0 again), so a prefix made
    from them would split the job.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return
    store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group(backend, store=dist.PrefixStore(f"ssl_fast/attempt_{attempt}", store), rank=rank,
                            world_size=world)


def build_pipeline(cfg: TrainConfig, source, n_local: int) -> Pipeline:
    """The views of ``cfg.method`` for ``source`` (digits: grayscale-friendly; otherwise the paper's)."""
    size = cfg.image_size
    if source.name == "digits":
        g = digits_view(size)
        glob, loc = [g, g], []
        if n_local:
            glob, loc = multicrop(g, n_local, cfg.local_size, global_scale=(0.4, 1.0), local_scale=(0.15, 0.4))
    elif cfg.method == "swav":
        glob, loc = multicrop(simclr_views(size), n_local, cfg.local_size)
    elif cfg.method == "byol" or (cfg.method == "moco" and cfg.moco_version == "v3"):
        glob, loc = byol_views(size), []
    elif cfg.method == "moco":
        v = simclr_views(size, strength=0.5, scale=(0.2, 1.0))
        glob, loc = [v, v], []
    else:
        glob, loc = [simclr_views(size)] * 2, []
    if source.size < 64 and source.name != "digits":  # CIFAR: no blur (SimCLR's CIFAR setting)
        from dataclasses import replace

        glob = [replace(v, blur=0.0) for v in glob]
        loc = [replace(v, blur=0.0) for v in loc]
    return Pipeline(glob, loc, mean=source.mean, std=source.std)


class Trainer:
    """Trains ``cfg.method`` as configured; ``fit()`` returns a summary dict.

    Args:
        cfg: a resolved ``TrainConfig`` (``ssl_fast.train.make_config``).

    Example:
        >>> from ssl_fast.train import Trainer, make_config
        >>> out = Trainer(make_config({"method": "simclr", "data": "digits", "epochs": 5})).fit()
        >>> out["knn_init"], out["knn_final"]
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._interrupt = False
        self.loss_history: List[torch.Tensor] = []

    # ------------------------------------------------------------------------------------------- set-up
    def _setup_distributed(self) -> None:
        cfg = self.cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device} requested but CUDA is not available")
        if want_cuda:
            idx = self.local_rank if (self.world > 1 or cfg.device in ("auto", "cuda")) else int(cfg.device.split(":")[1])
            self.device = torch.device("cuda", idx)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.owns_pg = False
        if self.world > 1 and not dist.is_initialized():
            init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_pg = True

    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._setup_distributed()
        if cfg.batch_size % (self.world * cfg.accum_steps):
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by world size x accum steps "
                             f"({self.world} x {cfg.accum_steps})")
        self.local_batch = cfg.batch_size // self.world
        if cfg.method == "moco" and cfg.shuffle_bn and (2 * self.local_batch) % cfg.shuffle_bn_groups:
            raise ValueError(f"--shuffle-bn-groups {cfg.shuffle_bn_groups} must divide the per-rank key batch "
                             f"(2 views x {self.local_batch} images)")
        if cfg.grad_cache_chunk and (2 * self.local_batch) % cfg.grad_cache_chunk == 1:
            raise ValueError(f"--grad-cache-chunk {cfg.grad_cache_chunk} splits the per-rank batch of 2 views x "
                             f"{self.local_batch} images into chunks whose last one holds 1 image (BatchNorm "
                             f"cannot normalize it): pick a chunk size that divides {2 * self.local_batch}")
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        load_size = cfg.load_size or max(cfg.image_size, round(cfg.image_size * 256 / 224))
        self.source = build_source(cfg.data, cfg.dataset, load_size=load_size, workers=cfg.workers,
                                   image_size=cfg.image_size, decode=cfg.decode, device=self.device)
        self.steps_per_epoch = self.source.steps_per_epoch(self.local_batch, self.world)
        if self.steps_per_epoch < 1:
            raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training set "
                             f"({len(self.source)} images)")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

        backbone, dim = build_backbone(cfg.backbone, self.source.channels, cfg.small_stem, cfg.width)
        self.method = build_method(cfg, backbone, dim, self.steps_per_epoch, self.world)
        n_local = getattr(self.method, "n_local_views", 0)
        self.pipeline = build_pipeline(cfg, self.source, n_local)
        if cfg.sync_bn and self.world > 1:
            if self.device.type != "cuda":
                raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel)")
            self.method = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
        self.method.to(self.device)
        if cfg.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if cfg.compile:
            self.method.backbone.compile()
        self.model = self.method
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=self.method.needs_unused_parameters)
        self.peak_lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
        fixed = ()
        if cfg.fix_pred_lr:
            pred = getattr(self.method, "predictor", None)
            if not isinstance(pred, nn.Module):
                raise ValueError(f"--fix-pred-lr needs a method with a predictor (simsiam, byol, moco v3); "
                                 f"--method {cfg.method} has none")
            fixed = list(pred.parameters())
        # BYOL / MoCo: the teacher's EMA inside the optimizer's pass (the method then leaves it out of on_step_end)
        teacher = getattr(self.method, "teacher", None) if hasattr(self.method, "ema_in_optimizer") else None
        self.fused_ema = bool(cfg.fused_ema_step) and teacher is not None
        if hasattr(self.method, "ema_in_optimizer"):
            self.method.ema_in_optimizer = self.fused_ema
        self.optimizer = build_optimizer(cfg.optimizer, self.method, self.peak_lr, cfg.weight_decay, cfg.momentum,
                                         cfg.lars_eta, fixed_lr=fixed, ema=teacher if self.fused_ema else None)
        warm = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        schedule = WarmupCosine(self.total_steps, min(warm, self.total_steps - 1), cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambdas(self.optimizer, schedule))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.step = 0
        self.metrics: Dict[str, float] = {}
        self.logger = RunLogger(cfg.run_dir, enabled=self.rank == 0)
        self.diagnostics, self._diag_views = None, None
        if cfg.diagnostics_every and self.rank == 0:
            from ..diagnostics import DiagnosticsCallback

            self.diagnostics = DiagnosticsCallback(every=cfg.diagnostics_every, out_dir=cfg.run_dir)

    # -------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        rng = _rng_state(self.device)
        if self.world > 1:
            all_rng: List[Any] = [None] * self.world
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        from .. import __version__

        return {"format": FORMAT, "ssl_fast_version": __version__, "step": self.step,
                "epoch": self.step // self.steps_per_epoch, "model": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": all_rng, "world_size": self.world,
                "config": self.cfg.to_dict(), "metrics": dict(self.metrics)}

    def save(self) -> Optional[str]:
        state = self.state_dict()  # collective: every rank takes part
        path = None
        if self.rank == 0:
            path = save_checkpoint(state, checkpoint_path(self.cfg.run_dir, self.step))
            prune_checkpoints(self.cfg.run_dir, self.cfg.keep_checkpoints)
        if self.world > 1:
            dist.barrier()
        return path

    def load(self, state: Dict[str, Any], path: str = "checkpoint") -> None:
        config = self.cfg.to_dict()
        check_compatible(state, config, path)
        load_model_state(self.method, state["model"], path, state, config)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:  # parameter groups of another layout (e.g. --fix-pred-lr)
            raise CheckpointError(f"checkpoint {path!r}: its optimizer state does not fit this run's optimizer "
                                  f"({exc}); was it written with other --fix-pred-lr / --optimizer values?") from exc
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.metrics = dict(state.get("metrics", {}))
        rng = state.get("rng", [])
        if len(rng) == self.world:
            _set_rng_state(rng[self.rank], self.device)
        else:
            warnings.warn(f"checkpoint has RNG states of {len(rng)} ranks, this run has {self.world}: global RNG "
                          f"states not restored (data order and views still match)", stacklevel=2)

    def _maybe_resume(self) -> bool:
        r = self.cfg.resume
        if not r:
            return False
        if r == "auto":
            state = latest_good_checkpoint(self.cfg.run_dir)
            if state is None:
                return False
        else:
            state = load_checkpoint(r)
        self.load(state, state.get("_path", r))
        self.resumed_from = state.get("_path", r)
        return True

    # ----------------------------------------------------------------------------------------- the loop
    def _signal(self, signum, frame):
        if self._interrupt:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self._interrupt = True

    def _views(self, x: torch.Tensor) -> List[torch.Tensor]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_000_007 + self.step * 1009 + self.rank)
        views = self.pipeline(x.to(self.device, non_blocking=True), g)
        if self.cfg.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    def _grad_cache_step(self, views: List[torch.Tensor]) -> torch.Tensor:
        """Forward + backward of the two global views by gradient caching (``ssl_fast.gradcache``): the views
        concatenated as in the plain step (2B images: view 0, then view 1) are embedded in chunks of
        ``--grad-cache-chunk`` images, the loss runs once on the whole batch (one collective with DDP
        gathering). A chunk of >= 2B images is the plain step, BatchNorm statistics included."""
        from ..gradcache import cached_step

        out: Dict[str, torch.Tensor] = {}

        def loss_fn(z):
            loss = self.method.loss_from_embeddings(*z.chunk(2)).float()
            out["loss"] = loss.detach()
            return self.scaler.scale(loss)

        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            cached_step(_Embedder(self.model), [torch.cat(views[:2])], loss_fn, self.cfg.grad_cache_chunk)
        return out["loss"]

    def _train_step(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        views = self._views(x)
        due = self.diagnostics is not None and self.diagnostics.due(self.step + 1)
        self._diag_views = views if due else None
        if cfg.grad_cache_chunk:
            return self._optimizer_step(self._grad_cache_step(views))
        n = cfg.accum_steps
        mb = views[0].shape[0] // n
        total = torch.zeros((), device=self.device)
        for i in range(n):
            chunk = [v[i * mb:(i + 1) * mb] for v in views]
            sync = contextlib.nullcontext() if (i == n - 1 or self.world == 1) else self.model.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    loss, _ = self.model(chunk, self.step, self.total_steps)
                loss = loss.float() / n
                self.scaler.scale(loss).backward()
            total += loss.detach()
        return self._optimizer_step(total)

    def _optimizer_step(self, total: torch.Tensor) -> torch.Tensor:
        if self.fused_ema:  # the teacher's schedule at the step count after this step, as on_step_end's
            self.scaler.step(self.optimizer, ema_step=self.step + 1, ema_total_steps=self.total_steps)
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.method.on_step_end(self.step, self.total_steps)
        return total

    def _knn(self) -> float:
        acc = float("nan")
        if self.rank == 0:
            acc = knn_eval(self.method.encoder, self.source, self.device, self.cfg.image_size, self.cfg.knn_k,
                           self.cfg.knn_t, self.cfg.channels_last)
        if self.world > 1:
            dist.barrier()
        return acc

    @torch.no_grad()
    def _diagnose(self, views: List[torch.Tensor]) -> None:
        """Collapse diagnostics of this step's first two views (eval mode, no gradient, rank 0 only)."""
        m = self.method
        was = m.training
        m.eval()
        try:
            r0, r1 = m.encoder(views[0]).float(), m.encoder(views[1]).float()
            emb = {"representation": r0}
            proj = getattr(m, "projector", None)
            if isinstance(proj, nn.Module):
                emb["projection"] = proj(r0).float()
            self.diagnostics.on_step(self.step, embeddings=emb, views=(r0, r1), model=m)
        finally:
            m.train(was)
            self._diag_views = None

    def _stop_requested(self) -> bool:
        if self.world == 1:
            return self._interrupt
        flag = torch.tensor([1.0 if self._interrupt else 0.0], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def fit(self) -> Dict[str, Any]:
        """Train (or continue) to the configured number of steps. Returns a summary dict."""
        cfg = self.cfg
        self._setup()
        resumed = self._maybe_resume()
        rank0 = self.rank == 0
        if rank0:
            os.makedirs(cfg.run_dir, exist_ok=True)
        if cfg.knn and "knn_init" not in self.metrics and self.step == 0:
            self.metrics["knn_init"] = self._knn()
            self.logger.log_eval({"step": 0, "epoch": 0, "knn_acc": self.metrics["knn_init"], "elapsed_s": 0.0})
        old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                old[s] = signal.signal(s, self._signal)
        fault_step = int(os.environ.get("SSL_FAST_FAULT_STEP", "0") or 0)
        fault_rank = int(os.environ.get("SSL_FAST_FAULT_RANK", "0") or 0)
        first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0
        stop_at = min(self.total_steps, cfg.stop_at_step or self.total_steps)
        bar = None
        if cfg.progress and rank0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.method}", dynamic_ncols=True,
                       file=sys.stderr)
        t0 = time.perf_counter()
        t_log, step_log = t0, self.step
        interrupted = False
        last_loss = float("nan")
        self.method.train()
        try:
            while self.step < stop_at and not interrupted:
                epoch = self.step // self.steps_per_epoch
                start = self.step % self.steps_per_epoch
                for x in self.source.train_batches(self.local_batch, cfg.seed, epoch, start, self.rank, self.world):
                    loss = self._train_step(x)
                    self.loss_history.append(loss)
                    if bar is not None:
                        bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == stop_at:
                        last_loss = float(loss)
                        if not math.isfinite(last_loss):
                            raise FloatingPointError(f"loss became {last_loss} at step {self.step}: lower --lr or "
                                                     f"use --precision fp32")
                        now = time.perf_counter()
                        ips = (self.step - step_log) * cfg.batch_size / max(now - t_log, 1e-9)
                        t_log, step_log = now, self.step
                        mem = peak_memory_mb(self.device)
                        self.logger.log_train({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                                               "loss": last_loss, "lr": self.scheduler.get_last_lr()[0],
                                               "images_per_s": ips, "memory_mb": mem, "elapsed_s": now - t0})
                        if bar is not None:
                            bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{ips:.0f}", mem=f"{mem:.0f}MiB")
                    if self._diag_views is not None:
                        self._diagnose(self._diag_views)
                    if self.step % cfg.ckpt_every == 0 and self.step < stop_at:
                        self.save()
                    if fault_step and self.step == fault_step and first_attempt and self.rank == fault_rank:
                        os._exit(13)  # test hook: die like a killed worker
                    if self._stop_requested():
                        interrupted = True
                        break
                    if self.step >= stop_at:
                        break
                else:
                    if cfg.knn and cfg.knn_every and (epoch + 1) % cfg.knn_every == 0 and self.step < stop_at:
                        acc = self._knn()
                        self.logger.log_eval({"step": self.step, "epoch": epoch + 1, "knn_acc": acc,
                                              "elapsed_s": time.perf_counter() - t0})
        finally:
            if bar is not None:
                bar.close()
            for s, h in old.items():
                signal.signal(s, h)
        elapsed = time.perf_counter() - t0
        path = self.save()
        if interrupted:
            self.logger.close()
            self._teardown()
            raise TrainingInterrupted(path, self.step)
        done = self.step >= self.total_steps
        if cfg.knn and done:
            self.metrics["knn_final"] = self._knn()
            self.logger.log_eval({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                                  "knn_acc": self.metrics["knn_final"], "elapsed_s": elapsed})
        if done and rank0:
            sd = {k: v.detach().cpu() for k, v in self.method.encoder.state_dict().items()}
            torch.save(sd, os.path.join(cfg.run_dir, "backbone.pt"))
        self.logger.close()
        out = {"method": cfg.method, "steps": self.step, "total_steps": self.total_steps,
               "epochs": self.step / self.steps_per_epoch, "time_s": elapsed, "final_loss": last_loss,
               "knn_init": self.metrics.get("knn_init"), "knn_final": self.metrics.get("knn_final"),
               "checkpoint": path, "run_dir": cfg.run_dir, "resumed": resumed, "done": done,
               "rank": self.rank, "world_size": self.world}
        self._teardown()
        return out

    def losses(self) -> List[float]:
        """Per-step training losses of this process (one host sync, after training)."""
        return torch.stack(self.loss_history).tolist() if self.loss_history else []

    def _teardown(self) -> None:
        """End of a distributed run: a last barrier, so that no rank leaves (and closes its connections) while
        another still writes rank 0's files or waits in a collective, then ``destroy_process_group``.

        The group's threads may outlive this: a process group that DDP wrapped is still referenced from C++
        after ``destroy_process_group`` (torch 2.14: gloo's two ``pt_gloo_runloop`` threads and its
        ``gloo_tcp_loop`` thread run until the process ends). The ``ssl-fast train`` program therefore ends a
        distributed run with ``os._exit`` after flushing (``ssl_fast._train_cli.finish``)."""
        if getattr(self, "owns_pg", False) and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owns_pg = False

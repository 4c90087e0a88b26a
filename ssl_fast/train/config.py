"""The training configuration: one flat dataclass whose fields are also the ``ssl-fast train`` flags.

Precedence: field defaults < the method's recipe for the data (``ssl_fast.methods.recipe``) < ``--config``
YAML file < command-line flags. ``validate`` rejects impossible combinations with a ValueError naming them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    method: str = _f("simclr", "method: simclr | directclr | moco | byol | simsiam | swav", choices=(
        "simclr", "directclr", "moco", "byol", "simsiam", "swav"))
    data: str = _f("digits", "'digits' (embedded scikit-learn digits, no download) or a folder: CIFAR-10/100 "
                   "(extracted python release) or an ImageFolder tree (root/train/<class>/*, root/val/<class>/*)")
    dataset: Optional[str] = _f(None, "force the data kind: digits | cifar10 | cifar100 | imagefolder "
                                "(default: detected from --data)")
    recipe: str = _f("auto", "base recipe: auto (digits for the embedded data, imagenet otherwise) | digits | "
                     "imagenet | imagenet_v3 (MoCo v3)", choices=("auto", "digits", "imagenet", "imagenet_v3"))
    backbone: str = _f("resnet50", "encoder: small_cnn | resnet18 | resnet50",
                       choices=("small_cnn", "resnet18", "resnet50"))
    small_stem: bool = _f(False, "ResNet with a 3x3 stride-1 stem and no max-pool (32-96 px images)")
    width: int = _f(16, "small_cnn stem width (representation = 8 x width)")
    image_size: int = _f(224, "side of the global views in pixels")
    load_size: Optional[int] = _f(None, "ImageFolder: side of the decoded square the crops are taken from "
                                  "(default 256 / 224 x image_size)")
    # schedule and optimizer
    epochs: int = _f(100, "training epochs")
    max_steps: Optional[int] = _f(None, "cap on optimizer steps (the schedule then spans max_steps)")
    stop_at_step: Optional[int] = _f(None, "stop after this step with a checkpoint, keeping the full schedule "
                                     "(resume later with --resume)")
    batch_size: int = _f(256, "global batch size (all ranks together)")
    accum_steps: int = _f(1, "gradient accumulation: micro-batches per optimizer step (each micro-batch's loss "
                          "sees only its own negatives)")
    grad_cache_chunk: Optional[int] = _f(None, "gradient caching (GradCache / Inf-CL large batches; SimCLR, "
                                         "DirectCLR): embed the views in chunks of N images without a graph, take "
                                         "the loss of the whole batch, replay each chunk with its cached embedding "
                                         "gradient: every negative of the batch at the activation memory of N "
                                         "images. The chunks split the 2 x B images of both views; BatchNorm "
                                         "normalizes per chunk (N >= 2B: exactly the plain step)")
    optimizer: str = _f("lars", "sgd | lars | adamw", choices=("sgd", "lars", "adamw"))
    lr: float = _f(0.3, "base learning rate, scaled by batch_size / 256 unless --lr-scaling none")
    lr_scaling: str = _f("linear", "linear (lr x B/256) | sqrt | none", choices=("linear", "sqrt", "none"))
    weight_decay: float = _f(1e-6, "weight decay (not applied to biases and norm parameters)")
    momentum: float = _f(0.9, "SGD / LARS momentum")
    lars_eta: float = _f(0.001, "LARS trust coefficient")
    warmup_epochs: float = _f(10, "linear warmup length in epochs")
    min_lr_ratio: float = _f(0.0, "cosine floor as a fraction of the peak learning rate")
    fix_pred_lr: bool = _f(False, "the predictor keeps the peak learning rate (no warmup, no cosine decay), as "
                           "the official SimSiam --fix-pred-lr (on in the SimSiam ImageNet recipe); methods with a "
                           "predictor: simsiam, byol, moco v3")
    # method hyperparameters
    temperature: float = _f(0.1, "contrastive / SwAV temperature")
    proj_hidden_dim: int = _f(2048, "projector hidden width")
    proj_dim: int = _f(128, "projector output width")
    pred_hidden_dim: int = _f(4096, "predictor hidden width (BYOL, SimSiam, MoCo v3)")
    d0: int = _f(360, "DirectCLR: representation dimensions the loss sees (<= representation size)")
    directclr_variant: str = _f("official", "DirectCLR loss: official (symmetric cross-view InfoNCE) | ntxent",
                                choices=("official", "ntxent"))
    moco_version: str = _f("v2", "MoCo: v2 (queue) | v3 (predictor, symmetric in-batch)", choices=("v2", "v3"))
    shuffle_bn: bool = _f(False, "MoCo: shuffle-BN of the key encoder (official MoCo v1/v2; on in the v2 ImageNet "
                          "recipe): keys are encoded on a random permutation of every rank's batch, split per "
                          "rank, then un-permuted. One process and --shuffle-bn-groups 1: nothing to do")
    shuffle_bn_groups: int = _f(1, "MoCo shuffle-BN: BatchNorm groups of the permuted key batch per rank (G > 1 "
                                "emulates G GPUs' per-GPU statistics on one process)")
    queue_size: int = _f(65536, "MoCo v2 / SwAV queue length (0 = none)")
    queue_start_epoch: float = _f(15, "SwAV: epoch from which the queue is used")
    ema_momentum: float = _f(0.996, "teacher momentum (BYOL tau_base, MoCo m)")
    ema_final_momentum: float = _f(1.0, "teacher momentum at the end (cosine schedule; = ema_momentum: constant)")
    fused_ema_step: bool = _f(True, "BYOL / MoCo: the teacher's EMA runs inside the optimizer step (ssl_fast.optim: "
                              "one pass over the parameters, the same weights as the unfused path in fp32 with sgd "
                              "/ adamw); a step the fp16 gradient scaler skips skips the EMA too. "
                              "--no-fused-ema-step: optimizer step, then the EMA")
    n_prototypes: int = _f(3000, "SwAV prototypes")
    sinkhorn_iterations: int = _f(3, "SwAV Sinkhorn sweeps")
    sinkhorn_epsilon: float = _f(0.05, "SwAV Sinkhorn epsilon")
    freeze_prototypes_epochs: float = _f(1, "SwAV: prototypes frozen for this many epochs")
    n_local_crops: int = _f(6, "SwAV: low-resolution crops (multi-crop)")
    local_size: int = _f(96, "SwAV: side of the low-resolution crops")
    gather_distributed: bool = _f(True, "DDP: negatives / Sinkhorn over every rank's batch where supported")
    # performance and numerics
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (torchrun sets the local GPU)")
    precision: str = _f("fp32", "fp32 | bf16 | fp16 (autocast, fp32 weights; fp16 with a gradient scaler, on "
                        "CUDA and CPU)",
                        choices=("fp32", "bf16", "fp16"))
    channels_last: bool = _f(False, "channels_last memory format for the convolutions")
    compile: bool = _f(False, "torch.compile the backbone (inductor; the first steps pay the compilation)")
    sync_bn: bool = _f(False, "DDP on CUDA: convert BatchNorm to SyncBatchNorm (torch has no CPU SyncBatchNorm: "
                       "a ValueError under DDP on CPU; nothing to do on one process)")
    seed: int = _f(0, "seed of weights, data order and augmentations")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms (slower on GPU)")
    workers: int = _f(8, "ImageFolder decoding workers")
    decode: str = _f("auto", "ImageFolder decoding: auto (gpu on a CUDA device, else pil) | pil (PIL decode + "
                     "bicubic resize in the workers) | gpu (workers read the bytes; JPEGs decoded in batches "
                     "on the GPU by nvJPEG, torchvision.io.decode_jpeg; other formats and CPU runs by "
                     "torchvision.io.decode_image on the CPU; resize + center crop on the device)",
                     choices=("auto", "pil", "gpu"))
    threads: Optional[int] = _f(None, "CPU threads for torch (default: torch's choice)")
    # outputs
    run_dir: str = _f("runs/default", "run directory: checkpoints, metrics.csv, tensorboard/, backbone.pt")
    resume: Optional[str] = _f(None, "'auto' (newest good checkpoint in run_dir, if any) or a checkpoint path")
    ckpt_every: int = _f(500, "checkpoint every N steps (and at the end, at --stop-at-step and on Ctrl-C)")
    keep_checkpoints: int = _f(2, "checkpoints kept in run_dir (the newest ones)")
    log_every: int = _f(10, "CSV / TensorBoard logging every N steps")
    knn_every: int = _f(0, "kNN monitor every N epochs (0 = only before and after training)")
    knn: bool = _f(True, "kNN accuracy on the held-out split before and after training")
    knn_k: int = _f(20, "kNN neighbours")
    knn_t: float = _f(0.07, "kNN temperature of the similarity weights")
    progress: bool = _f(True, "tqdm progress bar")
    diagnostics_every: int = _f(0, "collapse diagnostics (ssl_fast.diagnostics: covariance spectrum, effective "
                                "rank, alignment, uniformity, normalized std) every N steps to diagnostics.csv "
                                "(0 = off)")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def make_config(overrides: Optional[Dict[str, Any]] = None, yaml_values: Optional[Dict[str, Any]] = None
                ) -> TrainConfig:
    """Resolve a config: defaults < recipe(method, data) < yaml_values < overrides.

    Raises:
        ValueError: an unknown key (naming it), or an impossible configuration (see ``validate``).
    """
    merged: Dict[str, Any] = {}
    for src_name, src in (("config file", yaml_values or {}), ("overrides", overrides or {})):
        for k, v in src.items():
            key = k.replace("-", "_")
            if key not in FIELDS:
                raise ValueError(f"unknown config key {k!r} in {src_name}")
            merged[key] = v
    from ..methods import METHODS, recipe

    method = merged.get("method", TrainConfig.method)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    data = merged.get("data", "digits")
    which = merged.get("recipe", "auto")
    if which == "auto":
        which = "digits" if (data == "digits" or merged.get("dataset") == "digits") else "imagenet"
    values = recipe(method, which)
    values.update(merged)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError for an impossible configuration (the message names the option)."""
    def bad(msg):
        raise ValueError(msg)

    for name, f in FIELDS.items():
        ch = f.metadata.get("choices")
        if ch and getattr(cfg, name) not in ch:
            bad(f"--{name.replace('_', '-')} must be one of {', '.join(ch)}, got {getattr(cfg, name)!r}")
    if cfg.batch_size < 2:
        bad(f"--batch-size must be >= 2 (views of one image need other images), got {cfg.batch_size}")
    if cfg.accum_steps < 1 or cfg.batch_size % cfg.accum_steps:
        bad(f"--batch-size {cfg.batch_size} must be a multiple of --accum-steps {cfg.accum_steps}")
    if cfg.grad_cache_chunk is not None:
        from ..methods import CLASSES

        if isinstance(cfg.grad_cache_chunk, bool) or not isinstance(cfg.grad_cache_chunk, int) \
                or cfg.grad_cache_chunk < 1:
            bad(f"--grad-cache-chunk must be a positive int, got {cfg.grad_cache_chunk!r}")
        if not CLASSES[cfg.method].supports_grad_cache:
            ok = ", ".join(m for m, c in CLASSES.items() if c.supports_grad_cache)
            bad(f"--grad-cache-chunk is not supported by --method {cfg.method} (its loss is not a function of "
                f"two views' embeddings alone: momentum keys / queue / predictor / prototypes); supported: {ok}")
        if cfg.accum_steps != 1:
            bad(f"--grad-cache-chunk replaces --accum-steps (got --accum-steps {cfg.accum_steps}): gradient "
                f"caching already bounds the memory, with the whole batch's negatives")
    if cfg.epochs < 1 and not cfg.max_steps:
        bad("--epochs must be >= 1")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        bad("--max-steps must be >= 1")
    if cfg.lr <= 0:
        bad(f"--lr must be > 0, got {cfg.lr}")
    if cfg.temperature <= 0:
        bad(f"--temperature must be > 0, got {cfg.temperature}")
    if not 0 <= cfg.ema_momentum <= 1 or not 0 <= cfg.ema_final_momentum <= 1:
        bad("--ema-momentum and --ema-final-momentum must be in [0, 1]")
    if cfg.d0 < 1:
        bad(f"--d0 must be >= 1, got {cfg.d0}")
    if cfg.fix_pred_lr and not (cfg.method in ("simsiam", "byol") or (cfg.method == "moco" and cfg.moco_version == "v3")):
        bad(f"--fix-pred-lr needs a method with a predictor (simsiam, byol, moco v3), not --method {cfg.method}"
            + (f" --moco-version {cfg.moco_version}" if cfg.method == "moco" else ""))
    if (cfg.shuffle_bn or cfg.shuffle_bn_groups != 1) and cfg.method != "moco":
        bad(f"--shuffle-bn / --shuffle-bn-groups apply to --method moco only, not {cfg.method}")
    if isinstance(cfg.shuffle_bn_groups, bool) or not isinstance(cfg.shuffle_bn_groups, int) \
            or cfg.shuffle_bn_groups < 1:
        bad(f"--shuffle-bn-groups must be a positive int, got {cfg.shuffle_bn_groups!r}")
    if cfg.queue_size < 0:
        bad("--queue-size must be >= 0")
    if cfg.ckpt_every < 1 or cfg.log_every < 1:
        bad("--ckpt-every and --log-every must be >= 1")
    if cfg.image_size < 8:
        bad(f"--image-size must be >= 8, got {cfg.image_size}")

"""``ssl-fast train | eval | linear-probe | diagnose``: argument parsing and error reporting (the work is in
ssl_fast.train and ssl_fast.diagnostics).

Every ``TrainConfig`` field is a flag of ``train`` (``--batch-size``, ``--channels-last`` / ``--no-channels-last``
...). Values come from: defaults < the method's recipe < ``--config file.yaml`` < flags. Errors (missing data
path, unknown method, impossible configuration, unreadable checkpoint) print one line and exit non-zero:
2 for usage / configuration / data, 1 for a checkpoint that cannot be used, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

TRAIN_EPILOG = """examples:
  ssl-fast train --method simclr                           # embedded digits, CPU, a few minutes
  ssl-fast train --method byol --epochs 10 --run-dir runs/byol
  ssl-fast train --config my.yaml --lr 0.5                 # YAML keys are the flag names (- or _)
  torchrun --nproc-per-node 8 -m ssl_fast.cli train --method simclr --data /data/imagenet
  ssl-fast train --method simclr --run-dir runs/x --resume auto   # continue the newest good checkpoint

recipes: with --data digits the CPU-sized recipe of the method is the base; with a folder, the paper's
ImageNet recipe (--recipe imagenet_v3 for MoCo v3). Any flag overrides the recipe."""

_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[str]": str,
          "Optional[float]": float}


def _train_parser(sub):
    from .train.config import TrainConfig

    p = sub.add_parser("train", help="self-supervised training (see ssl-fast train --help)",
                       description="Train a self-supervised encoder. Each option's default is shown; the "
                       "method's recipe for the data replaces it unless the option is given.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE.yaml", help="YAML mapping of option names to values "
                   "(flags given on the command line win)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata['help']} (default: {f.default})"
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        else:
            kw = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
            p.add_argument(flag, type=_TYPES[str(f.type)], help=help_, metavar=f.name.upper() if not kw else None, **kw)
    return p


def add_parsers(sub) -> None:
    _train_parser(sub)
    e = sub.add_parser("eval", help="kNN accuracy of a checkpoint's encoder; --export its backbone",
                       description="Weighted kNN accuracy (held-out split) of the encoder of a training "
                       "checkpoint, and optionally export its backbone state_dict (torchvision key names "
                       "for the ResNets: load with strict=False, fc is absent).")
    e.add_argument("--checkpoint", required=True, help="a ckpt_*.pt written by ssl-fast train")
    e.add_argument("--data", help="data to evaluate on (default: the checkpoint's)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    e.add_argument("--knn-k", type=int, default=20, help="neighbours (default: 20)")
    e.add_argument("--knn-t", type=float, default=0.07, help="similarity temperature (default: 0.07)")
    e.add_argument("--export", metavar="OUT.pt", help="write the backbone's state_dict here")
    lp = sub.add_parser("linear-probe", help="logistic regression on a checkpoint's frozen features",
                        description="Train a linear classifier on frozen, un-augmented features of the "
                        "training split and report its accuracy on the held-out split.")
    lp.add_argument("--checkpoint", required=True, help="a ckpt_*.pt written by ssl-fast train")
    lp.add_argument("--data", help="data (default: the checkpoint's)")
    lp.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    lp.add_argument("--epochs", type=int, default=100, help="probe epochs (default: 100)")
    lp.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: 0.1)")
    lp.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (default: 1e-4)")


def _err(cmd: str, msg: str, code: int) -> int:
    print(f"ssl-fast {cmd}: error: {msg}", file=sys.stderr)
    return code


def _load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of option names to values")
    return values


def _lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process of the job is gone."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(s in text for s in ("gloo/transport", "Connection reset by peer", "Connection closed by peer",
                                   "Broken pipe", "NCCL communicator was aborted"))


def _lost_peer_message(trainer, exc: BaseException) -> str:
    from .train.checkpoint import list_checkpoints

    why = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0]).split(". This is typically")[0]
    found = list_checkpoints(trainer.cfg.run_dir)
    last = (f"the last checkpoint is {found[0]}" if found else
            f"there is no checkpoint in {trainer.cfg.run_dir} yet")
    return (f"rank {trainer.rank} lost contact with the other processes at step {trainer.step + 1} (a process or a "
            f"node died, or the network failed): {why[:300]}. {last[0].upper()}{last[1:]}; under torchrun "
            f"--max-restarts (with --resume auto) the job continues from it once every node is back, otherwise "
            f"run the same command again with --resume auto")


_distributed_run = False  # set by _train when this process was one rank of several


def finish(code: int) -> int:
    """The end of the ``ssl-fast`` program (not of a ``main([...])`` call): after a distributed ``train``, flush
    and leave with ``os._exit(code)``; otherwise return ``code``.

    Why: a rank that had finished and written everything was seen to abort at exit ("terminate called without
    an active exception", SIGABRT: 1 of 6 two-node gloo runs), so torchrun reported the job failed (and with
    --max-restarts would restart a finished job). At that point the gloo group a DDP model used is still alive
    with its threads (``Trainer._teardown``: DDP keeps it referenced after ``destroy_process_group``), and they
    run while the interpreter finalizes and the C++ runtime destroys its statics. That message is what
    libstdc++ prints when a thread is torn down under a noexcept frame (a thread that asks for the GIL after
    finalization began is ended with a forced unwind) or a joinable std::thread is destroyed. ``os._exit``
    skips both phases, and nothing is left to do in them: every file is closed, rank 0's last checkpoint and
    backbone.pt are written and every rank has passed the final barrier (after an error, this rank's
    message is printed and flushed). tests/test_distributed.py's workers leave the same way for the same
    signature. The abort did not reproduce on the 2-core test machine (see tests/_multinode.py repeat).
    """
    if not _distributed_run:
        return code
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _train(args) -> int:
    global _distributed_run
    try:
        return _train_impl(args)
    finally:
        _distributed_run = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _train_impl(args) -> int:
    from .train import CheckpointError, Trainer, TrainingInterrupted, make_config

    values = vars(args).copy()
    values.pop("command")
    config_file = values.pop("config", None)
    trainer = None
    try:
        cfg = make_config(values, _load_yaml(config_file) if config_file else None)
        trainer = Trainer(cfg)
        out = trainer.fit()
    except TrainingInterrupted as exc:
        print(f"\ninterrupted at step {exc.step}; checkpoint {exc.checkpoint}. Continue with the same command "
              f"plus --resume auto", file=sys.stderr)
        return 130
    except CheckpointError as exc:
        return _err("train", str(exc), 1)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        return _err("train", str(exc), 2)
    except RuntimeError as exc:  # after CheckpointError (a RuntimeError)
        if trainer is None or getattr(trainer, "world", 1) < 2 or not _lost_peer(exc):
            raise
        return _err("train", _lost_peer_message(trainer, exc), 1)
    if out["rank"] == 0:
        data = "digits" if cfg.data == "digits" else cfg.data
        print(f"{cfg.method} on {data}: {out['steps']} steps ({out['epochs']:.1f} epochs, batch {cfg.batch_size}) "
              f"in {out['time_s']:.1f} s, final loss {out['final_loss']:.4f}")
        if out["knn_final"] is not None:
            init = out["knn_init"]
            init_s = f"{100 * init:.1f}%" if init is not None else "n/a"
            print(f"kNN accuracy (held-out split, k={cfg.knn_k}): {init_s} at initialization -> "
                  f"{100 * out['knn_final']:.1f}% trained")
        print(f"run directory: {cfg.run_dir} (metrics.csv, eval.csv, checkpoints, backbone.pt)")
    return 0


def _restore(cmd: str, args):
    """(Restored, None) or (None, exit code) for the checkpoint of ``eval`` / ``linear-probe``."""
    from .train import CheckpointError, restore

    try:
        return restore(args.checkpoint, data=args.data, device=args.device), None
    except CheckpointError as exc:
        return None, _err(cmd, str(exc), 1)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        return None, _err(cmd, str(exc), 2)


def _eval(args) -> int:
    import torch

    from .train import knn_eval

    run, code = _restore("eval", args)
    if run is None:
        return code
    enc, source, dev = run.method.encoder, run.source, run.device
    acc = knn_eval(enc, source, dev, run.cfg.image_size, args.knn_k, args.knn_t)
    print(f"kNN accuracy (held-out split of {source.name}, k={args.knn_k}): {100 * acc:.2f}%")
    if args.export:
        torch.save({k: v.detach().cpu() for k, v in enc.state_dict().items()}, args.export)
        print(f"backbone state_dict -> {args.export}")
    return 0


def _linear_probe(args) -> int:
    from .train import extract_features, linear_probe

    run, code = _restore("linear-probe", args)
    if run is None:
        return code
    enc, source, dev = run.method.encoder, run.source, run.device
    tr = extract_features(enc, source, "train", dev, run.cfg.image_size)
    te = extract_features(enc, source, "test", dev, run.cfg.image_size)
    if te[0].numel() == 0:
        return _err("linear-probe", "the data has no held-out split (an ImageFolder needs val/)", 2)
    acc_tr, acc_te = linear_probe(*tr, *te, num_classes=source.num_classes, epochs=args.epochs, lr=args.lr,
                                  weight_decay=args.weight_decay)
    print(f"linear probe on frozen features ({tr[0].shape[1]} dims): train {100 * acc_tr:.2f}%, "
          f"held-out {100 * acc_te:.2f}%")
    return 0


def add_diagnose_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="collapse diagnostics of a run, a checkpoint or saved embeddings",
                       description="Compute collapse diagnostics (covariance spectrum, effective rank, alignment, "
                                   "uniformity, normalized-output std, kNN) on held-out data and write report.md, "
                                   "spectrum.png and spectrum.csv. PATH: an ssl-fast train run directory, a "
                                   "checkpoint ckpt_*.pt, or a .pt file holding an (N, D) tensor or a dict of them.")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--out", default=None, help="output folder (default: <run>/diagnose, or next to the .pt file)")
    p.add_argument("--device", default="cpu", help="device for the encoder (default cpu)")
    p.add_argument("--max-samples", type=int, default=4096, help="held-out images used at most (default 4096)")


def _diagnose(args) -> int:
    import torch

    from .diagnostics.diagnose import diagnose_embeddings

    path = args.path
    if not os.path.exists(path):
        print(f"ssl-fast diagnose: {path!r} does not exist", file=sys.stderr)
        return 2
    obj = None
    if os.path.isfile(path):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            print(f"ssl-fast diagnose: cannot read {path!r}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            return 2
    is_embeddings = isinstance(obj, torch.Tensor) or (
        isinstance(obj, dict) and obj and "step" not in obj and all(isinstance(v, torch.Tensor) for v in obj.values()))
    if is_embeddings:
        emb = {"embedding": obj} if isinstance(obj, torch.Tensor) else obj
        bad = [k for k, v in emb.items() if v.dim() < 2 or v.shape[0] < 2 or not v.is_floating_point()]
        if bad:
            print(f"ssl-fast diagnose: {', '.join(map(str, bad))}: need floating (N, D) tensors with N >= 2",
                  file=sys.stderr)
            return 2
        out = args.out or os.path.splitext(path)[0] + "_diagnose"
        report, summaries = diagnose_embeddings({k: v[: args.max_samples] for k, v in emb.items()}, out,
                                                notes=f"Embeddings from `{os.path.basename(path)}`.")
    else:
        from .train import diagnose_checkpoint

        try:
            report, summaries = diagnose_checkpoint(path, args.out, device=args.device, max_samples=args.max_samples)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            print(f"ssl-fast diagnose: {exc}", file=sys.stderr)
            return 2
    for name, s in summaries.items():
        print(f"{name}: {s['state']}  effective rank {s['effective_rank']:.2f} / rank at 1e-3 {s['rank_at_1e-3']} "
              f"of {s['dim']}, std x sqrt(d) {s['std_sqrt_d']:.3f}, uniformity {s['uniformity']:.3f}"
              + (f", alignment {s['alignment']:.3f}" if "alignment" in s else "")
              + (f", kNN {s['knn_accuracy']:.3f}" if "knn_accuracy" in s else ""))
    print(f"report: {report}")
    return 0


def run(args, parser) -> int:
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "linear-probe":
        return _linear_probe(args)
    if args.command == "diagnose":
        return _diagnose(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2

"""Data sources: the embedded digits default, CIFAR-10/100 from a local folder, an ImageFolder tree (ImageNet).

Nothing is ever downloaded. Each source yields uint8 image batches (B, C, H, W) of one size; the random
augmentations run afterwards on the batch's device (``ssl_fast.data.augment``), so the CPU only reads and
decodes files (ImageFolder) or indexes an in-memory tensor (digits, CIFAR).

ImageFolder decoding (``decode``): ``"pil"`` decodes and resizes in the DataLoader workers (PIL, bicubic);
``"gpu"`` has the workers only read the files' bytes (``torchvision.io.read_file``) and decodes the JPEGs of
a batch in one call on the GPU (nvJPEG, ``torchvision.io.decode_jpeg(device="cuda")``), other formats (and
every file when the device is a CPU, or a JPEG nvJPEG rejects) with ``torchvision.io.decode_image`` on the
CPU; the shorter-side resize (bicubic, antialiased) and the center crop then run on the device. ``"auto"``:
``gpu`` on a CUDA device, ``pil`` otherwise. On the CPU, ``decode_image`` gives PIL's pixels (PNG: always;
JPEG: both use libjpeg-turbo, identical in the tested build); nvJPEG's JPEG pixels differ from libjpeg's by
IDCT rounding (a few levels). The two resizes (PIL's bicubic and torch's antialiased bicubic) differ by at
most about one gray level.

Data order: epoch e visits ``randperm(N)`` of a generator seeded with ``(seed, e)``; rank r of W takes
every W-th index (as ``DistributedSampler``), the last incomplete batch is dropped. A run resumed at step
s of epoch e therefore continues with exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
DECODERS = ("auto", "pil", "gpu")

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's sample order for an epoch (see module doc)."""
    g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    perm = torch.randperm(n, generator=g)
    per_rank = n // world
    return perm[rank::world][:per_rank]


@dataclass
class Source:
    """A data set: training images for SSL and a labelled train/held-out split for evaluation.

    Attributes:
        name: data set name.
        channels, size: image channels and the side of the stored (uint8) images.
        mean, std: normalization statistics.
        num_classes: label count (for kNN / linear probe).
    """

    name: str
    channels: int
    size: int
    mean: Sequence[float]
    std: Sequence[float]
    num_classes: int

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int:
        return (len(self) // world) // batch_size

    def train_batches(self, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                      world: int = 1) -> Iterator[torch.Tensor]:
        """uint8 batches (batch_size, C, H, W) of this rank for ``epoch``, from batch index ``start``."""
        raise NotImplementedError  # pragma: no cover

    def eval_batches(self, split: str, batch_size: int = 512) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) of ``split`` in {"train", "test"} in a fixed order, no augmentation."""
        raise NotImplementedError  # pragma: no cover


class TensorSource(Source):
    """An in-memory data set: ``train_x``/``test_x`` uint8 (N, C, H, W), labels int64."""

    def __init__(self, name, train_x, train_y, test_x, test_y, mean, std, num_classes):
        super().__init__(name, train_x.shape[1], train_x.shape[-1], mean, std, num_classes)
        self.train_x, self.train_y, self.test_x, self.test_y = train_x, train_y, test_x, test_y

    def __len__(self) -> int:
        return self.train_x.shape[0]

    def train_batches(self, batch_size, seed, epoch, start=0, rank=0, world=1):
        order = epoch_order(len(self), seed, epoch, rank, world)
        for i in range(start, order.numel() // batch_size):
            yield self.train_x[order[i * batch_size:(i + 1) * batch_size]]

    def eval_batches(self, split, batch_size=512):
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]


def load_digits(size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> TensorSource:
    """scikit-learn's digits (1797 grayscale 8x8 images, 10 classes), upscaled bilinearly to ``size``.

    A fixed stratified-by-shuffle split keeps ``test_fraction`` of the images as the held-out set of the kNN
    monitor and the linear probe; SSL training uses only the training part.
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the embedded default data set needs scikit-learn: pip install scikit-learn") from exc
    d = _load()
    x = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    x = (x * 255).round_().to(torch.uint8)
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * x.shape[0]))
    te, tr = perm[:n_test], perm[n_test:]
    return TensorSource("digits", x[tr].contiguous(), y[tr], x[te].contiguous(), y[te], (0.5,), (0.5,), 10)


def load_cifar(root: str, name: str = "cifar10") -> TensorSource:
    """CIFAR-10 / CIFAR-100 from ``root`` (the python-pickle release extracted there), never downloaded.

    Raises:
        FileNotFoundError: the folder or the extracted batches are missing.
    """
    import torchvision

    sub = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    if not os.path.isdir(root) or not os.path.isdir(os.path.join(root, sub)):
        raise FileNotFoundError(f"{name}: expected the extracted python release at {os.path.join(root, sub)!r} "
                                f"(ssl-fast does not download data)")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        tr, te = cls(root, train=True, download=False), cls(root, train=False, download=False)
    except RuntimeError as exc:
        raise FileNotFoundError(f"{name} under {root!r} is incomplete or corrupted: {exc}") from exc

    def conv(ds):
        return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.long))

    (xa, ya), (xb, yb) = conv(tr), conv(te)
    return TensorSource(name, xa, ya, xb, yb, CIFAR_MEAN, CIFAR_STD, 10 if name == "cifar10" else 100)


class _Decoded(torch.utils.data.Dataset):
    """Reads and decodes an image file to uint8 (3, S, S): shorter side resized to S, center crop (CPU work)."""

    def __init__(self, samples, size):
        self.samples, self.size = samples, size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        import numpy as np
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
            nw, nh, left, top = _square_geometry(*im.size, self.size)
            im = im.resize((nw, nh), Image.BICUBIC)
            im = im.crop((left, top, left + self.size, top + self.size))
            img = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        return img, label


def _square_geometry(w: int, h: int, size: int) -> Tuple[int, int, int, int]:
    """(new width, new height, left, top): shorter side resized to ``size``, then a centered size x size crop."""
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


class _FileBytes(torch.utils.data.Dataset):
    """Reads an image file's bytes (uint8 1-D tensor); decoding happens in the main process (``decode_images``)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        import torchvision

        path, label = self.samples[i]
        return torchvision.io.read_file(path), label


def _collate_bytes(batch):
    """One flat uint8 tensor of every file's bytes + their lengths + labels: a worker sends one storage per
    batch (a list of B small tensors, one shared-memory file descriptor each, has been seen to fail with
    EBADF in the worker's queue feeder)."""
    return (torch.cat([b for b, _ in batch]), torch.tensor([b.numel() for b, _ in batch], dtype=torch.long),
            torch.tensor([label for _, label in batch], dtype=torch.long))


def is_jpeg(data: torch.Tensor) -> bool:
    """Whether the encoded bytes (a CPU uint8 tensor) start with the JPEG SOI marker FF D8 FF."""
    return data.numel() >= 3 and data[:3].tolist() == [0xFF, 0xD8, 0xFF]


def decode_images(datas: Sequence[torch.Tensor], device="cpu") -> list:
    """Decode encoded images (CPU uint8 1-D tensors) to RGB uint8 (3, H, W) tensors on ``device``.

    On a CUDA device the JPEGs are decoded in one batched nvJPEG call (``torchvision.io.decode_jpeg``);
    other formats, and JPEGs nvJPEG cannot decode (e.g. CMYK), by ``torchvision.io.decode_image`` on the
    CPU, then copied. On a CPU device everything goes through ``decode_image``.
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    device = torch.device(device)
    out: list = [None] * len(datas)
    if device.type == "cuda":
        jpg = [i for i, d in enumerate(datas) if is_jpeg(d)]
        if jpg:
            try:
                for i, img in zip(jpg, decode_jpeg([datas[i] for i in jpg], mode=ImageReadMode.RGB, device=device)):
                    out[i] = img
            except RuntimeError:  # one file nvJPEG rejects: the CPU decoder for the batch's JPEGs
                pass
    for i, d in enumerate(datas):
        if out[i] is None:
            out[i] = decode_image(d, mode=ImageReadMode.RGB).to(device, non_blocking=True)
    return out


def resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, size, size): shorter side to ``size`` (bicubic, antialiased), center crop
    (the geometry of the PIL path)."""
    from torchvision.transforms.v2 import functional as TF
    from torchvision.transforms import InterpolationMode

    h, w = img.shape[-2:]
    nw, nh, left, top = _square_geometry(w, h, size)
    if (nh, nw) != (h, w):
        img = TF.resize(img, [nh, nw], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return img[:, top:top + size, left:left + size]


class ImageFolderSource(Source):
    """An ImageFolder tree: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (ImageNet layout).

    Files are decoded into ``load_size`` squares (shorter side resized, center crop): by the DataLoader
    workers (``decode="pil"``) or, with ``decode="gpu"``, on ``device`` from the bytes the workers read (see
    the module docstring); the random resized crops are then taken from these on the device. ``root``
    without ``train/`` is used as the training folder itself (no held-out split: the kNN monitor is then
    skipped).
    """

    def __init__(self, root: str, load_size: int = 256, workers: int = 8, eval_subset: Optional[int] = 10000,
                 decode: str = "pil", device="cpu"):
        import torchvision

        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {', '.join(DECODERS)}, got {decode!r}")
        device = torch.device(device)
        if decode == "auto":
            decode = "gpu" if device.type == "cuda" else "pil"
        self.decode, self.device = decode, device

        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder {root!r} does not exist")
        train_dir = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
        val_dir = os.path.join(root, "val") if os.path.isdir(os.path.join(root, "val")) else None
        try:
            tr = torchvision.datasets.ImageFolder(train_dir)
            te = torchvision.datasets.ImageFolder(val_dir) if val_dir else None
        except (FileNotFoundError, RuntimeError) as exc:
            raise FileNotFoundError(f"no ImageFolder layout (<class>/<image>) under {train_dir!r}: {exc}") from exc
        super().__init__("imagefolder", 3, load_size, IMAGENET_MEAN, IMAGENET_STD, len(tr.classes))
        wrap = (lambda s: _FileBytes(s)) if decode == "gpu" else (lambda s: _Decoded(s, load_size))
        self.train = wrap(tr.samples)
        self.test = wrap(te.samples) if te is not None else None
        self.workers, self.eval_subset = workers, eval_subset

    def __len__(self) -> int:
        return len(self.train)

    def _loader(self, ds, batches):
        raw = self.decode == "gpu"
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=self.workers,
                                             pin_memory=torch.cuda.is_available() and not raw,
                                             collate_fn=_collate_bytes if raw else None,
                                             persistent_workers=False, prefetch_factor=4 if self.workers else None)
        for item in loader:
            if raw:
                flat, lengths, y = item
                datas = torch.split(flat, lengths.tolist())  # CPU tensors: no device sync
                x = torch.stack([resize_center_crop(img, self.size) for img in decode_images(datas, self.device)])
            else:
                x, y = item
            yield x, y

    def train_batches(self, batch_size, seed, epoch, start=0, rank=0, world=1):
        order = epoch_order(len(self), seed, epoch, rank, world).tolist()
        batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(start, len(order) // batch_size)]
        for x, _ in self._loader(self.train, batches):
            yield x

    def eval_batches(self, split, batch_size=256):
        if self.test is None:
            return
        ds = self.train if split == "train" else self.test
        n = len(ds) if self.eval_subset is None else min(len(ds), self.eval_subset)
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[:n].tolist()
        yield from self._loader(ds, [idx[i:i + batch_size] for i in range(0, n, batch_size)])


def build_source(data: str, dataset: Optional[str] = None, load_size: Optional[int] = None, workers: int = 8,
                 image_size: int = 32, decode: str = "pil", device="cpu") -> Source:
    """The data source for ``data`` (``"digits"`` or a path) and an optional explicit ``dataset`` kind.

    ``decode`` and ``device``: how an ImageFolder's files are decoded (``ImageFolderSource``; ignored for the
    in-memory data sets).

    With ``dataset`` None a path is CIFAR-10 when it contains ``cifar-10-batches-py``, CIFAR-100 when it
    contains ``cifar-100-python``, otherwise an ImageFolder tree.

    Raises:
        FileNotFoundError: ``data`` is a path that does not exist (or lacks the expected files).
        ValueError: unknown ``dataset``.
    """
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if data == "digits" or dataset == "digits":
        return load_digits(size=image_size)
    if not os.path.exists(data):
        raise FileNotFoundError(f"data path {data!r} does not exist (use --data digits for the embedded "
                                f"default, or a CIFAR / ImageFolder directory; nothing is downloaded)")
    if dataset is None:
        if os.path.isdir(os.path.join(data, "cifar-10-batches-py")):
            dataset = "cifar10"
        elif os.path.isdir(os.path.join(data, "cifar-100-python")):
            dataset = "cifar100"
        else:
            dataset = "imagefolder"
    if dataset in ("cifar10", "cifar100"):
        return load_cifar(data, dataset)
    return ImageFolderSource(data, load_size=load_size or 256, workers=workers, decode=decode, device=device)

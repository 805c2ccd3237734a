"""Real datasets used by the demo, tests and benchmarks, held as uint8 arrays.

Images live as ``uint8`` arrays of shape (N, H, W, C) so that attacks can be applied
once, reproducibly, and decoding happens once (CIFAR-10 JPEGs are cached as ``.npz``).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from torch.utils.data import Dataset

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
ARCHIVE_ENV = "GUARD_CIFAR10_ARCHIVE"
CACHE_ENV = "GUARD_CACHE_DIR"


@dataclass
class ArraySplit:
    """Images (N, H, W, C) uint8 and integer labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def subset(self, indices: np.ndarray) -> "ArraySplit":
        return ArraySplit(self.images[indices], self.labels[indices])


def cache_dir() -> Path:
    """Directory for decoded-array caches (``$GUARD_CACHE_DIR`` or ``~/.cache/layerguard``)."""
    path = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "layerguard"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_cifar10_archive(path: str | os.PathLike | None = None) -> Path | None:
    """Locate ``cifar10-jpg.tar.gz``: the explicit ``path``, else ``$GUARD_CIFAR10_ARCHIVE``."""
    candidates: list[Path] = []
    if path is not None:
        candidates.append(Path(path))
    if os.environ.get(ARCHIVE_ENV):
        candidates.append(Path(os.environ[ARCHIVE_ENV]))
    for c in candidates:
        if c.is_file():
            return c
    return None


def _decode_archive(archive: Path) -> dict[str, ArraySplit]:
    from PIL import Image

    split_imgs: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    split_lbls: dict[str, list[int]] = {"train": [], "test": []}
    class_index = {name: i for i, name in enumerate(CIFAR10_CLASSES)}
    logger.info("decoding CIFAR-10 JPEG archive {} (once; cached afterwards)", archive)
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")),
                         key=lambda m: m.name)
        for m in members:
            parts = Path(m.name).parts
            split, cls = parts[-3], parts[-2]
            if split not in split_imgs or cls not in class_index:
                continue
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
            split_imgs[split].append(img)
            split_lbls[split].append(class_index[cls])
    out = {}
    for split in ("train", "test"):
        if not split_imgs[split]:
            raise ValueError(f"archive {archive} has no {split}/<class>/*.jpg images; "
                             "expected the layout described in shared/data/README.md")
        out[split] = ArraySplit(np.stack(split_imgs[split]), np.asarray(split_lbls[split], dtype=np.int64))
    return out


def load_cifar10(archive: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                 download: bool = False) -> dict[str, ArraySplit]:
    """CIFAR-10 train/test as uint8 arrays.

    Reads the JPEG archive (``archive`` or ``$GUARD_CIFAR10_ARCHIVE``) and caches the decoded arrays
    (keyed by the archive's name, size and first MiB, so the same file reached by another path is
    decoded once); falls back to torchvision's loader at ``root`` (with ``download``).
    """
    found = find_cifar10_archive(archive)
    if found is not None:
        with open(found, "rb") as f:
            head = f.read(2**20)
        digest = hashlib.sha1(f"{found.name}:{found.stat().st_size}:".encode() + head).hexdigest()[:12]
        cached = cache_dir() / f"cifar10-{digest}.npz"
        if cached.is_file():
            z = np.load(cached)
            return {s: ArraySplit(z[f"{s}_x"], z[f"{s}_y"]) for s in ("train", "test")}
        splits = _decode_archive(found)
        # a name of this process's own: two processes (DDP ranks, parallel runs) may decode at once
        tmp = cached.with_name(f"{cached.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npz")
        try:
            np.savez(tmp, **{f"{s}_x": v.images for s, v in splits.items()},
                     **{f"{s}_y": v.labels for s, v in splits.items()})
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
        return splits
    if root is None and not download:
        raise FileNotFoundError(
            "CIFAR-10 not found: set $GUARD_CIFAR10_ARCHIVE to cifar10-jpg.tar.gz, or pass "
            "root=<folder> (and download=True to fetch it with torchvision)")
    import torchvision

    out = {}
    for split, train in (("train", True), ("test", False)):
        ds = torchvision.datasets.CIFAR10(root=str(root or cache_dir()), train=train, download=download)
        out[split] = ArraySplit(np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64))
    return out


def load_image_folder(root: str | os.PathLike) -> dict[str, ArraySplit]:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` images (one size, RGB) as uint8 arrays;
    classes are the sorted folder names of ``train``, indexed from 0."""
    from PIL import Image

    root = Path(root)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise FileNotFoundError(f"image folder {root} needs train/<class>/ and test/<class>/ sub-folders")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    out = {}
    for split in ("train", "test"):
        imgs, labels = [], []
        for i, cls in enumerate(classes):
            for f in sorted((root / split / cls).glob("*")) if (root / split / cls).is_dir() else []:
                if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"):
                    imgs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8))
                    labels.append(i)
        shapes = {im.shape for im in imgs}
        if not imgs or len(shapes) != 1:
            raise ValueError(f"{root / split}: expected images of one size under <class>/ folders, found "
                             f"{len(imgs)} images of shapes {sorted(shapes)[:3]}")
        out[split] = ArraySplit(np.stack(imgs), np.asarray(labels, dtype=np.int64))
    return out


def load_digits() -> dict[str, ArraySplit]:
    """scikit-learn's digits (1,797 real 8x8 images shipped inside the wheel), split 75/25.

    Upscaled to 16x16 grey images (H, W, 1) so a 4x4 trigger stays small relative to the digit.
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise ImportError("data 'digits' comes with scikit-learn: pip install 'layerguard[demo]'") from None

    d = _load()
    img = (d.images / 16.0 * 255.0).astype(np.uint8)            # (N, 8, 8)
    img = img.repeat(2, axis=1).repeat(2, axis=2)[..., None]      # (N, 16, 16, 1)
    labels = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(0.75 * len(labels))
    return {"train": ArraySplit(img[order[:cut]], labels[order[:cut]]),
            "test": ArraySplit(img[order[cut:]], labels[order[cut:]])}


class ArrayImageDataset(Dataset):
    """(x, y) items from uint8 (N, H, W, C) images: float CHW tensor, normalised; optional
    random-crop (pad 4, reflected) + horizontal-flip augmentation for training, written as users write
    it: a torchvision ``transform`` (which :func:`guard.scan_view` switches off). ``strong`` adds
    torchvision's classification-reference steps after them: ``TrivialAugmentWide``, then
    ``Normalize`` and ``RandomErasing(p=0.1)`` (erasing after normalisation, as there), all in the
    ``transform``."""

    def __init__(self, split: ArraySplit, mean: tuple[float, ...], std: tuple[float, ...],
                 augment: bool = False, seed: int = 0, strong: bool = False) -> None:
        if len(split.images) == 0:
            raise ValueError("ArrayImageDataset got 0 images")
        self.images = torch.from_numpy(np.ascontiguousarray(split.images)).permute(0, 3, 1, 2)
        self.labels = split.labels.astype(np.int64)
        self.targets = self.labels.tolist()
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment, self.strong = augment or strong, strong
        self.transform = None
        if self.augment:
            from torchvision.transforms import v2

            steps = [v2.RandomCrop(list(self.images.shape[2:]), padding=4, padding_mode="reflect"),
                     v2.RandomHorizontalFlip()]
            if strong:
                steps += [v2.TrivialAugmentWide(), v2.Normalize(list(mean), list(std)), v2.RandomErasing(p=0.1)]
            self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        if not self.strong:                   # (strong: the transform normalises)
            x = (x - self.mean) / self.std
        return x, int(self.labels[i])


def stratified_indices(labels: np.ndarray, per_class: int | Sequence[int], seed: int,
                       exclude: np.ndarray | None = None) -> np.ndarray:
    """``per_class`` random indices of each class (sorted; a sequence gives each class its own
    count, in class order), optionally avoiding ``exclude``."""
    rng = np.random.default_rng(seed)
    mask = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        mask[exclude] = False
    out = []
    for i, c in enumerate(np.unique(labels)):
        k = per_class if isinstance(per_class, (int, np.integer)) else int(per_class[i])
        pool = np.flatnonzero((labels == c) & mask)
        if len(pool) < k:
            raise ValueError(f"class {c} has {len(pool)} samples, fewer than the {k} requested")
        out.append(rng.choice(pool, k, replace=False))
    return np.sort(np.concatenate(out))

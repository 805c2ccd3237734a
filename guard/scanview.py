"""What a scan reads when no ``scan_dataset`` is given: the training data with its random transforms off.

A scan compares samples with each other and with the trusted ones, and the input views look for a
pattern shared by poisoned images; a random crop moves a trigger between reads, a flip mirrors it.
So scans read the data without augmentation. Users write augmentation as torchvision transforms in
the Dataset (``transform=v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), ...])``),
and :func:`scan_view` gives the same dataset with those steps made deterministic, the way an
evaluation transform is written:

* ``RandomResizedCrop(s)`` -> ``Resize(s)`` then ``CenterCrop(s)``; ``RandomCrop(s)`` -> ``CenterCrop(s)``
  (the output size of a training read is kept);
* every other random step (``Random*``, ``ColorJitter``, ``RandAugment``, ``AutoAugment``,
  ``TrivialAugmentWide``, ``AugMix``, ``GaussianBlur``, ``GaussianNoise``, ``ElasticTransform``,
  ``JPEG``, ``ScaleJitter``) is left out;
* everything else (``ToImage``, ``ToDtype``, ``Normalize``, ``Resize``, your own callables) stays.

It looks for a ``transform`` attribute holding a torchvision transform (torchvision's datasets and
most hand-written ones keep it there), through ``Subset`` and ``ConcatDataset``. The training
dataset is never changed: the view is a shallow copy with its own transform. Randomness the function
cannot see (augmentation written inside ``__getitem__``, an unfamiliar library) is left as is;
:func:`reads_differ` tells whether a dataset still returns different data for the same index, and
:class:`~guard.GuardedDataset` warns when it does.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from guard.errors import GuardWarning
from guard.hooks import preserve_rng

_RANDOM = {"ColorJitter", "RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix", "GaussianBlur",
           "GaussianNoise", "ElasticTransform", "JPEG", "ScaleJitter"}      # and every Random* step


def _torchvision(step: Any) -> bool:
    return type(step).__module__.startswith("torchvision.transforms")


def _family(step: Any) -> Any:
    """torchvision's ``transforms.v2`` or ``transforms``, whichever ``step`` comes from."""
    import torchvision.transforms as v1
    import torchvision.transforms.v2 as v2

    return v2 if type(step).__module__.startswith("torchvision.transforms.v2") else v1


def _deterministic(step: Any, off: list[str]) -> list[Any]:
    """``step`` as zero or more deterministic steps; the names of what was switched off go to ``off``."""
    if not _torchvision(step):
        return [step]
    name, tv = type(step).__name__, _family(step)
    if name == "Compose":
        steps = [s for child in step.transforms for s in _deterministic(child, off)]
        return [tv.Compose(steps)] if steps else []
    if name == "RandomResizedCrop":          # as evaluation transforms do: the shorter side, then the centre
        off.append(name)
        h, w = step.size
        return [tv.Resize(h if h == w else [h, w]), tv.CenterCrop([h, w])]
    if name == "RandomCrop":
        off.append(name)
        return [tv.CenterCrop(list(step.size))]
    if name.startswith("Random") or name in _RANDOM:
        off.append(name)
        return []
    return [step]


def _view_transform(transform: Any, off: list[str]) -> Any:
    steps = _deterministic(transform, off)
    if len(steps) == 1:
        return steps[0]
    return _family(transform).Compose(steps) if steps else _unchanged


def _unchanged(x: Any) -> Any:
    """The transform of a view whose every step was random."""
    return x


def scan_view(dataset: Dataset) -> tuple[Dataset, tuple[str, ...]]:
    """``(view, switched_off)``: ``dataset`` with the random steps of its torchvision transforms made
    deterministic (module docstring), and the names of those steps. Where there are none, the
    dataset itself and ``()``. ``dataset`` is not changed; pass the view as ``scan_dataset``::

        view, off = guard.scan_view(train_ds)
        gds = GuardedDataset(train_ds, model, scan_dataset=view)   # what GuardedDataset does by default
    """
    off: list[str] = []
    view = _view(dataset, off)
    return (view, tuple(off)) if off else (dataset, ())


def _view(ds: Dataset, off: list[str]) -> Dataset:
    if isinstance(ds, Subset):
        inner = _view(ds.dataset, off)
        return ds if inner is ds.dataset else Subset(inner, ds.indices)
    if isinstance(ds, ConcatDataset):
        parts = [_view(d, off) for d in ds.datasets]
        return ds if all(p is d for p, d in zip(parts, ds.datasets)) else ConcatDataset(parts)
    transform = getattr(ds, "transform", None)
    if transform is None or not _torchvision(transform):
        return ds
    mine: list[str] = []
    new = _view_transform(transform, mine)
    if not mine:
        return ds
    off.extend(mine)
    view = copy.copy(ds)
    view.transform = new
    standard = getattr(ds, "transforms", None)          # torchvision's VisionDataset applies this pair
    if type(standard).__name__ == "StandardTransform":
        from torchvision.datasets.vision import StandardTransform

        view.transforms = StandardTransform(new, getattr(ds, "target_transform", None))
    return view


def what_scans_read(dataset: Dataset, scan_dataset: Dataset | None, trusted: Dataset | None, view: bool
                    ) -> tuple[Dataset | None, Dataset | None, str, bool]:
    """``(scan_dataset, trusted, description, trusted_random)`` as :class:`~guard.GuardedDataset` scans
    them: with ``view``, the :func:`scan_view` of ``dataset`` where no ``scan_dataset`` is given, and of
    the trusted set. What scans read that still returns different data for the same index is a
    :class:`~guard.GuardWarning` (four samples read twice); ``trusted_random`` says the trusted set does."""
    given = scan_dataset is not None
    said = "scan_dataset" if given else "dataset"
    if scan_dataset is None and view:
        copy_, off = scan_view(dataset)
        if off:
            scan_dataset, said = copy_, f"the dataset with {', '.join(dict.fromkeys(off))} off (guard.scan_view)"
    if trusted is not None and view:
        trusted, off = scan_view(trusted)
        if off:
            said += f"; the trusted set with {', '.join(dict.fromkeys(off))} off"
    read = ("scan_dataset" if given else "dataset", scan_dataset if scan_dataset is not None else dataset)
    trusted_random = False
    for name, ds in (read, ("trusted set", trusted)):
        if ds is not None and _random(ds):
            trusted_random = trusted_random or ds is trusted
            said += f"; the {name} augmented (it returns different data for the same index)"
            warnings.warn(
                f"the {name} returns different data for the same index (random augmentation the guard cannot "
                "switch off), so scans read augmented samples: the input views cannot see a trigger that moves "
                "between reads, and the layers see noisier features. Pass scan_dataset=<the same samples in the "
                "same order without random augmentation> (and a trusted set without it); torchvision transforms "
                "in a `transform` attribute are switched off by guard.scan_view.", GuardWarning, stacklevel=3)
    return scan_dataset, trusted, said, trusted_random


def _random(ds: Dataset) -> bool:
    try:
        return reads_differ(ds, np.linspace(0, len(ds) - 1, min(len(ds), 4)).astype(int))
    except Exception:  # noqa: BLE001 - data that cannot be read fails the set-up checks next, with their errors
        return False


def reads_differ(dataset: Dataset, indices: Sequence[int]) -> bool:
    """Whether reading ``indices`` twice gives different inputs (random augmentation left in). The
    random states of ``torch``, ``random`` and ``numpy`` are restored afterwards, so a training run's
    sample order and augmentation are the same as without the check."""
    with preserve_rng():
        return any(not _same(dataset[int(i)], dataset[int(i)]) for i in indices)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a truth value compare as different reads
        return False

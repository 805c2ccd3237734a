"""Set-up checks shared by :class:`~guard.GuardedDataset` and :class:`~guard.InputFilter`: the
model's layers and classes, the scan device, and the trusted set. Each error says what to change."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from guard.batches import BatchAdapter
from guard.config import GuardConfig
from guard.discover import discover_layers
from guard.errors import GuardError
from guard.hooks import check_layers, scan_mode, unwrap_model

PROBE_ITEMS = 4     # items run through the model once at set-up (layers, output shape)


def length(ds: Any, what: str) -> int:
    try:
        return len(ds)
    except TypeError as e:
        raise GuardError(f"{what} of type {type(ds).__name__} has no len(); the guard needs a map-style "
                         "Dataset with __len__ and __getitem__") from e


def collate(items: list, what: str) -> Any:
    try:
        return default_collate(items)
    except (RuntimeError, TypeError) as e:
        raise GuardError(f"items of {what} cannot be batched ({e}); items must have equal shapes and be "
                         "tensors/numbers (resize or pad them in the dataset's transform)") from e


def dataset_labels(ds: Dataset, adapter: BatchAdapter, what: str, indices: list[int] | None = None) -> np.ndarray:
    """Labels of (the ``indices`` of) a dataset, read through the same unpacking as scans."""
    idx = list(range(length(ds, what))) if indices is None else [int(i) for i in indices]
    out = []
    for start in range(0, len(idx), 256):
        _, y = adapter.split(collate([ds[i] for i in idx[start:start + 256]], what))
        out.append(y.numpy())
    return np.concatenate(out) if out else np.empty(0, np.int64)


def check_device(wanted: str | None, model: nn.Module) -> torch.device:
    """The scan device: the model's, or ``wanted`` if it is usable and of the model's kind."""
    params = list(model.parameters())
    if not params:
        raise GuardError(f"model {type(model).__name__} has no parameters; pass the model being trained")
    model_device = params[0].device
    if wanted is None:
        return model_device
    try:
        device = torch.device(wanted)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise GuardError(f"scan device {wanted!r} is not usable here ({str(e).splitlines()[0]}); set "
                         "GuardConfig(device=None) to scan where the model is") from None
    if device.type != model_device.type:
        raise GuardError(f"GuardConfig(device={wanted!r}) but the model's parameters are on {model_device}; "
                         "move the model there first, or leave device=None")
    return device


def layers_and_classes(model: nn.Module, source: Dataset, adapter: BatchAdapter, cfg: GuardConfig,
                       device: torch.device) -> tuple[list[str], int]:
    """The layers to analyse (``cfg.layers`` checked, or discovered) and the number of classes, from one
    forward pass over the first items of ``source``."""
    items = [source[i] for i in range(min(PROBE_ITEMS, length(source, "dataset")))]
    inputs, _ = adapter.split(collate(items, "dataset"))
    inputs = adapter.move(inputs, device, cfg.channels_last)
    inner = unwrap_model(model)
    logits: list[torch.Tensor] = []

    def call() -> None:
        logits.append(adapter.forward(unwrap_model(model, keep_data_parallel=True), inputs))

    with scan_mode(model):
        if cfg.layers is not None:
            layers = check_layers(inner, cfg.layers)
            call()
        else:
            layers = discover_layers(inner, call)
    out = logits[0]
    if cfg.num_classes is not None:
        return layers, cfg.num_classes
    if out.dim() == 2 and out.shape[1] >= 2:
        return layers, int(out.shape[1])
    raise GuardError(f"cannot infer the number of classes from model output of shape {tuple(out.shape)}; "
                     "set GuardConfig(num_classes=...)")


def check_trusted(trusted: Dataset, adapter: BatchAdapter, num_classes: int, min_per_class: int,
                  n_train: int | None = None) -> np.ndarray:
    """The trusted set's labels, after checking it covers every class with ``min_per_class`` samples
    (and is not larger than a training set of ``n_train``)."""
    labels = dataset_labels(trusted, adapter, "trusted")
    if len(labels) == 0:
        raise GuardError("trusted set is empty; pass trusted=None for trust-free mode")
    if (labels < 0).any() or (labels >= num_classes).any():
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise GuardError(f"trusted label {bad} is outside [0, {num_classes})")
    counts = np.bincount(labels, minlength=num_classes)
    missing = np.flatnonzero(counts == 0).tolist()
    if missing:
        raise GuardError(f"trusted set has no samples of classes {missing}; add at least {min_per_class} verified "
                         "samples of each class (or pass trusted=None for the weaker trust-free mode)")
    few = {int(c): int(counts[c]) for c in np.flatnonzero(counts < min_per_class)}
    if few:
        raise GuardError(f"trusted set has too few samples for classes {few} (need min_trusted_per_class="
                         f"{min_per_class}; about 100 per class is recommended)")
    if n_train is not None and len(labels) > n_train:
        raise GuardError(f"trusted set ({len(labels)}) is larger than the training set ({n_train}); "
                         "swap them, or use a smaller verified subset as trusted")
    return labels

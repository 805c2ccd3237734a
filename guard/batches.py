"""How the guard reads items and batches: ``(x, y, ...)`` tuples or HF-style dicts.

Keys can be named in the config; a custom ``unpack(batch) -> (model_input, labels)`` callable
covers anything else. A dict ``model_input`` is passed as keyword arguments.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from guard.errors import GuardError

Unpack = Callable[[Any], tuple[Any, torch.Tensor]]
_LABEL_KEYS = ("labels", "label", "y", "target", "targets")


@functools.cache
def cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX, as torch reads it). Elsewhere
    (AVX2 CPUs, most laptops) bf16 is emulated, and a forward under bf16 autocast runs 10-25x slower than
    in float32 (a width-16 ResNet-18 on an AVX2 EPYC; with the instructions it runs about 2.5x faster)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def autocast(device: torch.device, enabled: bool, training: bool = False) -> contextlib.AbstractContextManager:
    """The guard's own passes under autocast (``GuardConfig.amp``): bf16 where the device computes it
    natively (:func:`cpu_bf16` on a CPU; ``torch.cuda.is_bf16_supported`` on a GPU); else on a GPU fp16
    for forward-only passes and float32 for ``training`` ones (unlearning), which fp16 would need a
    gradient scaler for, and float32 on a CPU, where fp16 is emulated too."""
    if not enabled:
        return contextlib.nullcontext()
    if (device.type == "cpu" and cpu_bf16()) or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if training or device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16)


class BatchAdapter:
    """Splits a collated batch into model input and integer labels, and runs the model."""

    def __init__(self, input_key: str | list[str] | None = None, label_key: str | None = None,
                 unpack: Unpack | None = None) -> None:
        self.input_key, self.label_key, self.unpack = input_key, label_key, unpack

    def split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if self.unpack is not None:
            inputs, labels = self.unpack(batch)
        elif isinstance(batch, Mapping):
            inputs, labels = self._split_dict(batch)
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            inputs, labels = batch[0], batch[1]
        else:
            raise GuardError(f"cannot unpack a batch of type {type(batch).__name__}: items must be (x, y, ...) "
                             "tuples or dicts with a label key; otherwise pass unpack=lambda batch: (inputs, labels)")
        return inputs, self.check_labels(labels)

    def _split_dict(self, batch: Mapping) -> tuple[Any, Any]:
        label_key = self.label_key or next((k for k in _LABEL_KEYS if k in batch), None)
        if label_key is None or label_key not in batch:
            raise GuardError(f"batch dict has keys {sorted(batch)} but no label key; set "
                             f"GuardConfig(label_key=...) (tried {list(_LABEL_KEYS)})")
        if isinstance(self.input_key, str):
            if self.input_key not in batch:
                raise GuardError(f"input_key {self.input_key!r} not in batch keys {sorted(batch)}")
            return batch[self.input_key], batch[label_key]
        keys = self.input_key or [k for k in batch if k != label_key]
        missing = [k for k in keys if k not in batch]
        if missing:
            raise GuardError(f"input keys {missing} not in batch keys {sorted(batch)}")
        return {k: batch[k] for k in keys}, batch[label_key]

    @staticmethod
    def check_labels(labels: Any) -> torch.Tensor:
        if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], str):
            raise GuardError(f"labels are strings (e.g. {labels[0]!r}); map them to integer class indices 0..C-1")
        if not isinstance(labels, torch.Tensor):
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError) as e:
                raise GuardError(f"labels of type {type(labels).__name__} cannot be read as integers: {e}") from e
        if labels.dim() == 2 and labels.shape[1] > 1:
            raise GuardError(f"labels have shape {tuple(labels.shape)} (one-hot or soft labels?); the guard "
                             "needs integer class indices: use labels.argmax(1)")
        labels = labels.reshape(-1)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise GuardError(f"labels have dtype {labels.dtype}; the guard needs integer class indices "
                             "(e.g. torch.long): convert with int(label)")
        return labels.long()

    @staticmethod
    def move(inputs: Any, device: torch.device, channels_last: bool = False) -> Any:
        if isinstance(inputs, Mapping):
            return {k: BatchAdapter.move(v, device, channels_last) for k, v in inputs.items()}
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.to(device, non_blocking=True)
            if channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            return inputs
        raise GuardError(f"model input of type {type(inputs).__name__} is not a tensor or dict of tensors; "
                         "pass unpack=... returning a tensor input")

    @staticmethod
    def forward(model: nn.Module, inputs: Any) -> torch.Tensor:
        """Run the model and return its logits (tensor, ``.logits`` of a ModelOutput, or first element)."""
        out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
        logits = getattr(out, "logits", None)
        if logits is None:
            from guard.hooks import first_tensor

            logits = first_tensor(out)
        if logits is None:
            raise GuardError(f"model returned {type(out).__name__} with no tensor; return logits")
        return logits


@dataclass(frozen=True)
class Feed:
    """How the guard runs a model: unpacking and moving batches, on ``device``, in ``channels_last``
    memory format (4-D inputs) and under autocast (``amp``)."""

    adapter: BatchAdapter
    device: torch.device
    channels_last: bool = False
    amp: bool = False

    def logits(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The model's logits for a batch of (unmoved) inputs, in the guard's autocast."""
        with autocast(self.device, self.amp):
            return self.adapter.forward(model, self.adapter.move(inputs, self.device, self.channels_last))

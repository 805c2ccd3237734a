"""Step 6: make the final model clean after poison is found.

Dropping poison stops the backdoor from being learned further, but a backdoor learned during
warm-up stays. ``unlearn`` trains briefly on a mix of kept samples (their labels, cross-entropy)
and quarantined samples pushed *away* from the label they carry (``-log(1 - p_label)``, a
bounded loss, unlike gradient ascent), until almost none of the quarantined samples is still
predicted as its label. ``restart`` reloads the weights the model had when it was wrapped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from loguru import logger
from torch import nn
from torch.utils.data import Dataset, default_collate

from guard.batches import BatchAdapter
from guard.config import GuardConfig

STOP_FIT = 0.02


def _batch(dataset: Dataset, idx: np.ndarray) -> Any:
    return default_collate([dataset[int(i)] for i in idx])


def _cat(a: Any, b: Any) -> Any:
    """Concatenate two model inputs (tensors or dicts of tensors) along the batch dimension, so
    batch-norm layers see one ordinary mixed batch."""
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def away_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean ``-log(1 - p_label)``, computed as ``logsumexp(all) - logsumexp(all but label)`` so that
    even a saturated prediction (p_label = 1 - 1e-9) still gets a gradient."""
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)).mean()


def unlearn(model: nn.Module, dataset: Dataset, kept: np.ndarray, quarantined: np.ndarray,
            adapter: BatchAdapter, cfg: GuardConfig, device: torch.device, seed: int,
            channels_last: bool = False) -> tuple[float, float]:
    """Unlearn what the quarantined samples taught. Returns the share of quarantined samples
    predicted as their (possibly poisoned) label before and after."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or len(quarantined) == 0 or len(kept) == 0:
        return float("nan"), float("nan")
    opt = torch.optim.SGD(params, lr=cfg.unlearn_lr, momentum=0.9)
    rng = np.random.default_rng(seed)
    half = max(cfg.batch_size // 4, 8)
    was_training = [(m, m.training) for m in model.modules()]
    first = last = float("nan")
    fits: list[float] = []
    accs: list[float] = []
    try:
        model.train()
        with torch.enable_grad():
            for step in range(cfg.unlearn_steps):
                q_inputs, q_labels = adapter.split(_batch(dataset, rng.choice(quarantined, min(half, len(quarantined)),
                                                                              replace=False)))
                k_inputs, k_labels = adapter.split(_batch(dataset, rng.choice(kept, half, replace=len(kept) < half)))
                logits = adapter.forward(model, adapter.move(_cat(q_inputs, k_inputs), device, channels_last))
                q_logits, k_logits = logits[:len(q_labels)], logits[len(q_labels):]
                q_labels, k_labels = q_labels.to(device), k_labels.to(device)
                loss = nn.functional.cross_entropy(k_logits.float(), k_labels) + away_loss(q_logits.float(), q_labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                fits.append(float((q_logits.argmax(1) == q_labels).float().mean()))
                accs.append(float((k_logits.argmax(1) == k_labels).float().mean()))
                if step == 0:
                    first = fits[0]
                last = float(np.mean(fits[-4:]))
                # stop once the quarantined samples are unlearned and the kept ones are fitted as before
                if (step + 1 >= max(cfg.unlearn_steps // 3, 4) and last <= STOP_FIT
                        and np.mean(accs[-4:]) >= np.mean(accs[:4]) - 0.02):
                    break
    finally:
        for m, f in was_training:
            m.training = f
        opt.zero_grad(set_to_none=True)
    logger.info("unlearn: {} steps, quarantined predicted as their label {:.1%} -> {:.1%}, kept batch accuracy "
                "{:.1%} -> {:.1%}", step + 1, first, last, np.mean(accs[:4]), np.mean(accs[-4:]))
    return first, last


def restart(model: nn.Module, initial_state: dict[str, torch.Tensor]) -> None:
    """Reload the weights the model had when the guard wrapped it."""
    model.load_state_dict(initial_state)
    logger.info("restart: model weights reset to their initial values; training continues on the kept data")

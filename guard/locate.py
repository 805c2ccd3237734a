"""Step 3: locate the critical layer of each class.

Two rules, both re-run at every scan because the critical layer moves as the model trains:

* ``paper_window`` -- Jebreel et al. (PAKDD 2023): the layer right after the largest rise of
  benign within-class cosine similarity, searched in the second half of the network; the
  score sums the cosines of the 3 layers ending there.
* ``guard_layers`` -- ours: the layer where the class's training samples fall furthest outside
  the benign (trusted, held-out) spread, measured as the share of samples below ``-tau``
  benign standard deviations in excess of the share the benign samples themselves show.
  A backdoor shows up exactly where poisoned and benign features differ, so the rule looks
  there directly instead of inferring it from the benign similarity curve. The score then uses
  the two layers with the largest excess.
"""

from __future__ import annotations

import numpy as np


def paper_window(benign_similarity: np.ndarray, width: int = 3) -> list[int]:
    """Layer indices (ascending) of the paper's window for one class.

    ``benign_similarity``: (L,) mean cosine of benign samples to their class mean per layer.
    """
    sim = np.asarray(benign_similarity, dtype=np.float64)
    n = len(sim)
    if n == 1:
        return [0]
    start = max(n // 2, 1)
    rises = np.diff(sim)                   # rises[i] = sim[i + 1] - sim[i]
    crit = start + int(np.argmax(rises[start - 1:]))
    return list(range(max(crit - width + 1, 0), crit + 1))


def excess_share(z_train: np.ndarray, z_benign: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: (share of training samples with z < -tau) - (same share among benign samples),
    and the benign share (the calibrated false-alarm rate)."""
    benign = (z_benign < -tau).mean(0)
    return (z_train < -tau).mean(0) - benign, benign


def guard_layers(excess: np.ndarray, window: int = 2) -> list[int]:
    """Our critical layers: the ``window`` layers with the largest excess, the critical one first."""
    return [int(i) for i in np.argsort(-np.asarray(excess), kind="stable")[:window]]

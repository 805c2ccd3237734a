"""Scan stage 4b, read across classes: do the trusted samples look like the training data at all?

Every trusted test (:mod:`guard.direction`, :mod:`guard.gate`, :mod:`guard.elsewhere`) holds its
false-alarm rate on one assumption: a clean class's training samples and its trusted samples are
exchangeable. A trusted set from another source than the training data (another compression,
camera or resizing) breaks it in every class at once: each holds more of its samples beyond its
trusted samples than the bound allows, and the class where that share happens to be largest can be
acted on although it is clean. Poison in many classes (all-to-all, an adaptive attack's cover
samples) looks the same from inside one class.

The classes together show it. At each layer (and input view) the direction test read, the p-values
of the classes the scan did not act on, each corrected for the test's sides only, are combined
by Fisher's method; the smallest combined p, times the layers combined, is the scan's mismatch p.

Calibrated without a model of the features: were the classes clean and exchangeable with their
trusted samples, each class's p-value is uniform or larger (:func:`guard.decide.beyond_reference_p`),
the classes are separate samples, and Fisher's combination holds its level (as far as the classes
are independent: they share the model and the coarse view's whitening; BENCHMARKS.md measures the
check on clean data, where it is conservative). The scan cannot tell a
source shift from poison everywhere, so it acts on neither; below ``max_false_alarm`` it says that its
bound does not hold here (:attr:`guard.report.ScanReport.trusted_mismatch_p`, and a warning).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import scipy.stats


@dataclass(frozen=True)
class Mismatch:
    """The most significant layer's combination."""

    p: float        # Fisher's combination at that layer, corrected for the layers combined
    layer: int      # position among the layers the direction test read (model layers, then input views)
    classes: int    # classes combined there


def mismatch(layer_p: dict[int, dict[int, float]]) -> Mismatch | None:
    """``layer_p``: per class the scan did not act on, its direction test's p at each layer position
    (corrected for the sides only). None where no layer has two classes to combine."""
    by_layer: dict[int, list[float]] = defaultdict(list)
    for ps in layer_p.values():
        for layer, p in ps.items():
            by_layer[layer].append(p)
    combined = {layer: float(scipy.stats.combine_pvalues(np.clip(ps, 1e-300, 1.0), method="fisher").pvalue)
                for layer, ps in by_layer.items() if len(ps) >= 2}
    if not combined:
        return None
    layer = min(combined, key=lambda k: (combined[k], k))
    return Mismatch(min(1.0, combined[layer] * len(combined)), layer, len(by_layer[layer]))

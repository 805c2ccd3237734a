"""Scan stage 5b: what one class's catch found, sought in the other classes.

A trigger that poisons several classes (all-to-all, several targets) leaves in each a cluster that
carries it. Once one class's cluster is caught, its probe (:mod:`guard.probe`: per-layer weights and
the source class's own calibration) is a fixed direction in the model's features, fitted without any
sample of the other classes. Held against another class's trusted samples, the count of that class's
screen beyond every one of them is then Beta-binomial with *all* its trusted samples
(:func:`guard.decide.beyond_reference_p`): no cross-fitting is needed, so with 100 trusted a class,
12 % of a screen of 512 beyond all of them has p = 1e-5 (10 %: 7e-5), where the class's own gate (a
direction its trusted samples choose, :mod:`guard.gate`) needs 19 % beyond a half of them and its main
direction (:mod:`guard.direction`) needs the cluster to be the class's largest variation.

Calibrated as the other trusted tests are: were the class clean (its training samples exchangeable with
its trusted ones), the bound holds whatever the probes, since they never saw the class. Several catches
in one feature space are held as one direction, their mean score; the scan corrects for the feature
spaces it tries (the model's layers, each input view). Deterministic, so every rank of a distributed
run agrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from guard.decide import beyond_reference_p
from guard.probe import Probe


@dataclass(frozen=True)
class CaughtTest:
    """One class held against the other classes' catches."""

    p: float              # beyond_reference_p of the count beyond
    sources: list[int]    # the classes whose catches' probes were averaged
    share: float          # share of the screen beyond every trusted sample along them
    beyond: np.ndarray    # (n,) bool: screened samples beyond every trusted one
    z: np.ndarray         # (n,) their score in the trusted samples' standard deviations


def along_catches(units: list[torch.Tensor], ref: list[torch.Tensor], probes: dict[int, Probe]) -> CaughtTest | None:
    """Test one class: ``units`` are its screened samples' unit features at the probe layers, ``ref``
    its trusted samples' at the same layers, ``probes`` the other classes' catches (class -> probe, at
    those layers). The score is the mean of the catches' probe scores: one direction, so nothing to
    correct for; what one trigger put in several classes adds up there, what each class's own look put
    in its probe averages out. None without a screen, with fewer than 2 trusted samples, or without a
    catch."""
    if not probes or len(units[0]) == 0 or len(ref[0]) < 2:
        return None
    sources = sorted(probes)
    x = np.mean([probes[s].raw(units) for s in sources], 0)
    r = np.mean([probes[s].raw(ref) for s in sources], 0)
    beyond = x > r.max()
    return CaughtTest(beyond_reference_p(int(beyond.sum()), len(x), len(r)), sources, float(beyond.mean()), beyond,
                      (x - r.mean()) / max(float(r.std()), 1e-12))

"""guard: find and drop backdoor-poisoned training samples while the model trains.

One line in an existing loop::

    gds = GuardedDataset(train_ds, model, GuardConfig(warmup_epochs=2, scan_every=2), trusted=trusted_ds)
    loader = DataLoader(gds, batch_size=128, sampler=gds.sampler)   # then train as usual

The names below are imported on first use, so ``import guard`` (and ``guard --help``) stays quick.

Module map (one line each: what it owns)::

    guarded      GuardedDataset: the wrapper; quarantine records, scan schedule, remedy, state; detect()
    sampler      GuardSampler: hands out the kept indices per epoch (calls an epoch-start hook, nothing else)
    schedule     ScanSchedule: which epochs scan (warm-up, every k, at most n) and which did
    setup        set-up checks shared by GuardedDataset and InputFilter (layers, classes, device, trusted set)
    discover     which layers to analyse, from the traced forward pass of any nn.Module
    hooks        forward hooks (FeatureTap), scan_mode (eval, no grad, states restored), unwrapping DDP/compile
    extract      Extractor: streams pooled per-layer features over a dataset (the only model forward of a scan)
    batches      reading items and batches (tuples, dicts, unpack=), Feed: device, channels_last, autocast
    scanview     scan_view: what scans read without scan_dataset (the dataset, its random transforms off)
    scan         Scanner: one scan as named stages over one ScanState; every model pass counted in Passes
    calibrate    stage 1: the benign reference and its spread per class and layer (trusted or trust-free)
    reference    streaming class sums of unit features; cosine and leave-one-out scores
    score        stage 2 per batch on the model's device: cosines, out-of-spread sums, predictions
    keep         KeptFeatures: the scoring pass's features kept (within keep_mb) for the later stages
    locate       the critical-layer rules (the paper's window, the guard's largest excess)
    decide       the per-class decision: decide(stats, thresholds) -> (Verdict, reason); the per-class cap
    cluster      the suspect-vs-benign centroid discriminant of the confirm and follow-up stages
    probe        the self-trained shrinkage-LDA probe that sharpens a confirmed cluster
    thresholds   Thresholds: every tuned number of the decisions, each with its rule
    config       GuardConfig: every setting, validated (thresholds is one of its sections)
    remedy       unlearning (or restart) after quarantines, judged on held-out quarantined samples
    report       GuardReport and its parts: JSON, CSV, per-sample and per-class DataFrames, summary
    filter       InputFilter: flag inputs at inference (the paper's own setting)
    distributed  torch.distributed helpers: sharding, gathers, rank agreement, broadcasts
    errors       GuardError, GuardWarning
    progress     progress bars (tqdm.auto) or log lines of long passes
    cli          the ``guard`` command; runconfig: its YAML/JSON run files
    experiment   red-team runs (poison, train with and without the guard, measure); attacks, datasets,
                 models, archs: the data, triggers and models those runs and the tests use
    plots        figures of a report
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:  # pragma: no cover
    from guard.config import GuardConfig  # noqa: F401
    from guard.discover import discover_layers  # noqa: F401
    from guard.errors import GuardError, GuardWarning  # noqa: F401
    from guard.filter import InputFilter  # noqa: F401
    from guard.guarded import GuardedDataset, detect  # noqa: F401
    from guard.report import GuardReport  # noqa: F401
    from guard.sampler import GuardSampler  # noqa: F401
    from guard.scanview import scan_view  # noqa: F401

_LAZY = {"GuardConfig": "guard.config", "GuardError": "guard.errors", "GuardWarning": "guard.errors",
         "GuardReport": "guard.report", "GuardSampler": "guard.sampler", "GuardedDataset": "guard.guarded",
         "InputFilter": "guard.filter", "detect": "guard.guarded", "discover_layers": "guard.discover",
         "scan_view": "guard.scanview"}
__all__ = [*_LAZY, "enable_logging"]

try:
    __version__ = _version("layerguard")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"

logger.disable("guard")      # a library is quiet until asked (loguru's advice); see enable_logging


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'guard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def enable_logging(level: str | None = None, sink: Any = sys.stderr) -> int | None:
    """Let the guard's log through loguru (it is off after ``import guard``). Without ``level`` the
    records go to the handlers you have (loguru's default prints everything to stderr); with it, a
    handler for the guard's records at that level is added to ``sink``, and its id returned
    (``logger.remove(id)`` removes it). ``logger.disable("guard")`` turns the log off again."""
    logger.enable("guard")
    if level is None:
        return None
    return logger.add(sink, level=level, filter="guard", format="{time:HH:mm:ss} guard: {message}")

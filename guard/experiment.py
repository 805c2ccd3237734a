"""Red-team runs: poison a real dataset, train with and without the guard, measure everything.

Used by ``make demo``, the benchmark and the end-to-end tests; also a template for users who
want to check the guard on their own pipeline. The guarded and unguarded runs share the warm-up
(same seed, same sample order, same weights) and branch at the first scan, so their
differences come from the guard alone; after it they train in lockstep, epoch by epoch, so that
their wall times see the same machine load.
"""

from __future__ import annotations

import copy
import importlib
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from torch import nn
from torch.utils.data import DataLoader, Sampler

from guard.attacks import ATTACKS, Attack, make_attack
from guard.batches import BatchAdapter, Feed
from guard.config import GuardConfig
from guard.datasets import (CIFAR10_MEAN, CIFAR10_STD, ArrayImageDataset, ArraySplit, load_cifar10, load_digits,
                            load_image_folder, stratified_indices)
from guard.guarded import GuardedDataset
from guard.hooks import preserve_rng, rng_state, set_rng_state
from guard.models import CifarResNet18, SmallCNN
from guard.progress import Progress
from guard.remedy import predictions


@dataclass
class RunSpec:
    data: str = "digits"                 # digits | cifar10
    attack: str | None = "badnets"       # a key of guard.attacks.ATTACKS, "zoo:SEED:INDEX", or None
    rate: float = 0.1
    attack_kwargs: dict[str, Any] = field(default_factory=dict)   # further attack fields, e.g. cover_rate
    target: int = 0
    n_train: int | None = None           # per-class subset size x classes (None: all)
    n_test: int | None = None            # stratified test subset, per-class size x classes (None: all)
    imbalance: float = 1.0               # with n_train: long-tailed, class c gets n_train/C * imbalance^(-c/(C-1))
    trusted_per_class: int = 100
    trust_free: bool = False
    epochs: int = 6
    lr: float = 0.01
    batch_size: int = 128
    width: int = 16
    augment: bool = False
    recipe: str = "plain"                # plain | strong: torchvision's reference recipe (see _Step)
    optimizer: str = "sgd"               # sgd (momentum 0.9, weight decay 5e-4) | adamw (weight decay 0.05)
    scan_dataset: bool = True            # hand the guard the data without augmentation (False: it finds its own view)
    seed: int = 0
    archive: str | None = None           # cifar10: the JPEG archive; imagefolder: the root folder
    download: bool = False               # cifar10 through torchvision when no archive is found
    model: str = "auto"                  # auto | a torchvision.models name | "package.module:callable"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    guard: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"                  # where the model trains ("cuda" on a GPU); the guard follows it
    give_optimizer: bool = True          # GuardedDataset(optimizer=opt): unlearning steps at its current learning rate
    label_noise: float = 0.0             # share of training labels set to another class at random (before poisoning)
    train_jpeg: int | None = None        # re-encode the training images as JPEG at this quality (the trusted set stays)
    classes: list[int] | None = None     # only these classes (train and test), relabelled 0, 1, ... in this order


@dataclass
class Prepared:
    train: ArrayImageDataset
    scan: ArrayImageDataset
    trusted: ArrayImageDataset
    test: ArrayImageDataset
    triggered: ArrayImageDataset | None
    attack: Attack | None
    poisoned: np.ndarray
    labels: np.ndarray
    num_classes: int
    make_model: Any
    cover: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))   # triggered, label kept
    noisy: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))   # label_noise: labels changed


def prepare(spec: RunSpec) -> Prepared:
    """Load, split (train subset / disjoint trusted set / test), poison and wrap the data."""
    if spec.data == "cifar10":
        splits = load_cifar10(spec.archive, download=spec.download)
        mean, std, C = CIFAR10_MEAN, CIFAR10_STD, 10
        default = lambda: CifarResNet18(num_classes=C, width=spec.width)  # noqa: E731
    elif spec.data == "digits":
        splits = load_digits()
        mean, std, C = (0.3,), (0.35,), 10
        default = lambda: SmallCNN(num_classes=C, in_channels=1, width=spec.width)  # noqa: E731
    elif spec.data == "imagefolder":
        if spec.archive is None:
            raise ValueError("data 'imagefolder' needs archive=<root folder with train/ and test/>")
        splits = load_image_folder(spec.archive)
        mean, std, C = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), int(splits["train"].labels.max()) + 1
        default = lambda: CifarResNet18(num_classes=C, width=spec.width)  # noqa: E731
    else:
        raise ValueError(f"unknown data {spec.data!r}; use 'digits', 'cifar10' or 'imagefolder'")
    if spec.classes is not None:
        splits, C = {k: _only(v, spec.classes, C) for k, v in splits.items()}, len(spec.classes)
    build = default if spec.model == "auto" else (lambda: build_model(spec.model, C, spec.model_kwargs))
    make_model = lambda: build().to(spec.device)  # noqa: E731
    full, test = splits["train"], splits["test"]
    if spec.n_test is not None:
        if spec.n_test < C:
            raise ValueError(f"n_test={spec.n_test} leaves no test image of some of the {C} classes; use at least {C}")
        test = test.subset(stratified_indices(test.labels, spec.n_test // C, seed=spec.seed + 2))
    if spec.n_train is not None:
        head = spec.n_train // C
        per = [int(round(head * spec.imbalance ** (-c / (C - 1)))) for c in range(C)] if spec.imbalance > 1 else head
        train_idx = stratified_indices(full.labels, per, seed=spec.seed)
    else:
        counts = np.bincount(full.labels, minlength=C)
        take = counts - spec.trusted_per_class
        rng = np.random.default_rng(spec.seed)
        train_idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(full.labels == c), take[c], replace=False)
                                            for c in range(C)]))
    trusted_idx = stratified_indices(full.labels, spec.trusted_per_class, seed=spec.seed + 1, exclude=train_idx)
    train, trusted = full.subset(train_idx), full.subset(trusted_idx)
    train, noisy = _degrade(train, spec, C)
    poisoned = cover = np.empty(0, np.int64)
    triggered = atk = None
    if spec.attack:
        atk = make_attack(spec.attack, target=spec.target, rate=spec.rate, seed=spec.seed, **spec.attack_kwargs)
        res = atk.poison(train.images, train.labels)
        train, poisoned, cover = ArraySplit(res.images, res.labels), res.poisoned, res.cover
        triggered = ArrayImageDataset(ArraySplit(*atk.triggered_test(test.images, test.labels)), mean, std)
    if spec.recipe not in ("plain", "strong"):
        raise ValueError(f"unknown recipe {spec.recipe!r}; use 'plain' or 'strong'")
    mk = lambda s, a=False: ArrayImageDataset(s, mean, std, augment=a, strong=a and spec.recipe == "strong")  # noqa: E731
    return Prepared(mk(train, spec.augment or spec.recipe == "strong"), mk(train), mk(trusted), mk(test), triggered,
                    atk, poisoned, train.labels, C, make_model, cover, noisy)


def _only(split: ArraySplit, classes: list[int], num_classes: int) -> ArraySplit:
    """The samples of ``classes`` (distinct labels below ``num_classes``), relabelled by their position there."""
    if len(set(classes)) != len(classes) or len(classes) < 2 or not all(0 <= c < num_classes for c in classes):
        raise ValueError(f"classes must be at least 2 distinct labels in [0, {num_classes}); got {classes}")
    new = np.full(num_classes, -1, np.int64)
    new[list(classes)] = np.arange(len(classes))
    keep = np.flatnonzero(new[split.labels] >= 0)
    return ArraySplit(split.images[keep], new[split.labels[keep]])


def _degrade(train: ArraySplit, spec: RunSpec, num_classes: int) -> tuple[ArraySplit, np.ndarray]:
    """The training split as data from a less careful source than the trusted set: ``train_jpeg``
    re-encodes every image (PIL, that quality); ``label_noise`` gives that share of the samples another
    class's label, uniformly among the others. Returns the split and the indices whose label changed."""
    if not 0 <= spec.label_noise < 1:
        raise ValueError(f"label_noise is a share of the training labels, in [0, 1); got {spec.label_noise}")
    images, labels = train.images, train.labels.copy()
    if spec.train_jpeg is not None:
        import io

        from PIL import Image

        def jpeg(img: np.ndarray) -> np.ndarray:
            buf = io.BytesIO()
            Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buf, "JPEG", quality=spec.train_jpeg)
            out = np.asarray(Image.open(buf), dtype=np.uint8)
            return out.reshape(img.shape)
        images = np.stack([jpeg(im) for im in images])
    noisy = np.empty(0, np.int64)
    if spec.label_noise:
        rng = np.random.default_rng([spec.seed, 11])
        noisy = np.sort(rng.choice(len(labels), int(round(spec.label_noise * len(labels))), replace=False))
        labels[noisy] = (labels[noisy] + rng.integers(1, num_classes, len(noisy))) % num_classes
    return ArraySplit(images, labels), noisy


def build_model(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """A torchvision model by name (``resnet18``, ``mobilenet_v2``, ...; ``num_classes`` is passed) or
    any ``package.module:callable`` (called with ``kwargs`` only)."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"model {name!r} cannot be imported ({e}); use 'package.module:callable'") from None
        return fn(**kwargs)
    import torchvision

    try:
        return torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    except ValueError as e:
        raise ValueError(f"model {name!r}: {e}; use a torchvision.models name or 'package.module:callable'") from None


class EpochPermutation(Sampler[int]):
    """The order ``GuardSampler`` uses when nothing is quarantined, for the unguarded twin run."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        self.epoch += 1
        return iter(order.tolist())


def predict(model: nn.Module, ds: ArrayImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode predictions and labels of a whole dataset (:func:`guard.remedy.predictions`)."""
    return predictions(model, ds, np.arange(len(ds)), Feed(BatchAdapter(), next(model.parameters()).device))


def _success(atk: Attack, plain: np.ndarray, labels: np.ndarray,
             triggered: np.ndarray) -> tuple[float, float, float]:
    """Attack success over the test images not already of their target; among those the model
    classifies correctly without the trigger (which removes the floor plain misclassification
    sets); and how often the same images are predicted as their target *without* the trigger
    (that floor itself: attack success minus it is what the trigger adds). ``plain``: predictions
    on all test images; ``triggered``: on ``atk.triggered_test``."""
    keep = atk.test_mask(labels)
    target = atk.targets(labels[keep])
    hit, ok = triggered == target, plain[keep] == labels[keep]
    return float(hit.mean()), float(hit[ok].mean()) if ok.any() else float("nan"), float((plain[keep] == target).mean())


def measure(model: nn.Module, data: Prepared) -> dict[str, float]:
    """Clean accuracy, attack success, attack success among correctly classified images, and the
    rate at which the same images are predicted as the target without the trigger."""
    p, y = predict(model, data.test)
    out = {"clean_acc": float((p == y).mean()), "attack_success": float("nan"),
           "attack_success_correct": float("nan"), "target_rate_clean": float("nan")}
    if data.attack is not None and data.triggered is not None:
        pt, _ = predict(model, data.triggered)
        out["attack_success"], out["attack_success_correct"], out["target_rate_clean"] = _success(data.attack, p, y, pt)
    return out


def trigger_floor(model: nn.Module, data: Prepared, spec: RunSpec, names: Sequence[str] | None = None,
                  aim: Callable[[str], int] | None = None) -> dict[str, dict[str, float]]:
    """Attack success of every image trigger on a model that never saw it: the share of triggered
    test images it predicts as their target anyway ("all"), the same among the images it
    classifies correctly without the trigger ("correct"), and the share of those images predicted
    as the target without the trigger ("clean"). What a model that never learned the trigger gives;
    only one taught to avoid the trigger goes lower. ``names``: the triggers (default every attack
    of :data:`ATTACKS`, aimed at ``spec.target``; a zoo trigger ``"zoo:S:I"`` keeps its own target);
    ``aim(name)``: each trigger's target instead."""
    images, labels = data.test.images.permute(0, 2, 3, 1).numpy(), data.test.labels
    mean, std = data.test.mean.flatten().tolist(), data.test.std.flatten().tolist()
    plain, _ = predict(model, data.test)
    out = {}
    for name in ATTACKS if names is None else names:
        target = {"target": aim(name)} if aim else {} if name.startswith("zoo:") else {"target": spec.target}
        atk = make_attack(name, **target, rate=0.0, seed=spec.seed)
        try:
            triggered = ArraySplit(*atk.triggered_test(images, labels))
        except ValueError as e:           # a trigger that does not fit these images (e.g. too small)
            logger.warning("no trigger floor for {}: {}", name, e)
            continue
        pred, _ = predict(model, ArrayImageDataset(triggered, mean, std))
        a, c, clean = _success(atk, plain, labels, pred)
        out[name] = {"all": a, "correct": c, "clean": clean}
    return out


def make_optimizer(model: nn.Module, spec: RunSpec) -> torch.optim.Optimizer:
    """The run's optimizer at ``spec.lr``: SGD with momentum 0.9 and weight decay 5e-4, or AdamW
    with weight decay 0.05."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9, weight_decay=5e-4)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.05)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}; use 'sgd' or 'adamw'")


class _Step:
    """The training step's batch mixing and loss. ``recipe="plain"``: cross-entropy on the batch as
    loaded. ``"strong"``: torchvision's classification-reference recipe, label smoothing 0.1 and, per
    batch, MixUp (alpha 0.2) or CutMix (alpha 1.0), drawn at random (``transforms.v2``; soft targets)."""

    def __init__(self, spec: RunSpec, num_classes: int) -> None:
        self.smoothing, self.mix = 0.0, None
        if spec.recipe == "strong":
            from torchvision.transforms import v2

            self.smoothing = 0.1
            self.mix = v2.RandomChoice([v2.MixUp(alpha=0.2, num_classes=num_classes),
                                        v2.CutMix(alpha=1.0, num_classes=num_classes)])

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.mix is not None:
            x, y = self.mix(x, y)
        return nn.functional.cross_entropy(model(x), y, label_smoothing=self.smoothing)


def _epoch(model: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader, desc: str = "train",
           step: _Step | None = None) -> float:
    device = next(model.parameters()).device
    model.train()
    t = time.perf_counter()
    with Progress(len(loader), desc, min_total=50, every=30.0, unit="batches") as progress:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            x, y = x.to(device), y.to(device)
            loss = step.loss(model, x, y) if step is not None else nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            progress.update(1)
    return time.perf_counter() - t


def detection(flagged: np.ndarray, poisoned: np.ndarray, n: int, cover: np.ndarray | None = None) -> dict[str, float]:
    """TPR over poisoned samples, FPR over all benign samples (cover samples count as benign),
    precision and F1; with ``cover``, also the share of the cover samples flagged."""
    f = np.zeros(n, bool)
    f[flagged] = True
    p = np.zeros(n, bool)
    p[poisoned] = True
    tp, fp = int((f & p).sum()), int((f & ~p).sum())
    tpr = tp / p.sum() if p.any() else float("nan")
    prec = tp / f.sum() if f.any() else float("nan")
    f1 = 2 * prec * tpr / (prec + tpr) if p.any() and f.any() and prec + tpr > 0 else 0.0
    out = {"tpr": tpr, "fpr": fp / max((~p).sum(), 1), "precision": prec, "f1": f1,
           "flagged": int(f.sum()), "poisoned": int(p.sum())}
    if cover is not None and len(cover):
        out["cover_flagged"] = float(f[cover].mean())
    return out


class _Twin:
    """The unguarded run, branched from the guarded one when the warm-up ends (same weights, optimizer
    and schedule state, same sample order) and trained in lockstep with it, one epoch after each
    guarded epoch, so that both see the same machine load: their wall times compare. It draws its
    random augmentation from its own copy of the global RNG states taken at the branch, so while the
    guard has quarantined nothing the two runs see the same crops and stay identical (the guard's
    scans leave the RNGs as they were): a difference between them is the guard's doing."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, data: Prepared, spec: RunSpec,
                 cfg: GuardConfig) -> None:
        self.rng = rng_state()
        with preserve_rng():                  # a fresh model's initialisation draws from the RNG
            self.model = data.make_model()
        self.model.load_state_dict(copy.deepcopy(model.state_dict()))
        self.opt = make_optimizer(self.model, spec)
        self.opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=spec.epochs)
        self.sched.load_state_dict(copy.deepcopy(sched.state_dict()))
        sampler = EpochPermutation(len(data.labels), cfg.seed)
        sampler.epoch = cfg.warmup_epochs
        self.loader = DataLoader(data.train, batch_size=spec.batch_size, sampler=sampler)
        self.step = _Step(spec, data.num_classes)
        self.times: list[float] = []

    def epoch(self, desc: str) -> None:
        with preserve_rng():
            set_rng_state(self.rng)
            self.times.append(_epoch(self.model, self.opt, self.loader, desc, self.step))
            self.rng = rng_state()
        self.sched.step()


def run(spec: RunSpec, compare: bool = True, out_dir: str | Path | None = None,
        data: Prepared | None = None, on_scan: Any = None, trace_memory: bool = False) -> dict[str, Any]:
    """Train with the guard (and, with ``compare``, the unguarded twin, in lockstep) and measure.
    With ``out_dir``, the guard's files (report.json, quarantine.csv, samples.csv) and checkpoint.pt
    (model and guard state) are written there. ``data``: ``prepare(spec)`` when the caller has it
    already. ``on_scan(gds, data)``: called after each scan, outside the timings; what it returns
    is kept in ``out["on_scan"]``. ``trace_memory``: record the run's peak Python allocation
    (``tracemalloc``, which slows Python-side work, the scan's analysis most: off for timings)."""
    torch.manual_seed(spec.seed)
    data = prepare(spec) if data is None else data
    cfg = GuardConfig(**{"seed": spec.seed, **spec.guard})
    model = data.make_model()
    opt = make_optimizer(model, spec)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs)
    step = _Step(spec, data.num_classes)
    gds = GuardedDataset(data.train, model, cfg, trusted=None if spec.trust_free else data.trusted,
                         scan_dataset=data.scan if spec.scan_dataset else None,
                         optimizer=opt if spec.give_optimizer else None)
    loader = DataLoader(gds, batch_size=spec.batch_size, sampler=gds.sampler)
    out: dict[str, Any] = {"spec": asdict(spec), "n_train": len(data.labels), "layers": gds.layers}
    epoch_times: list[float] = []
    paper: list[dict[str, float]] = []
    twin: _Twin | None = None
    if trace_memory:
        tracemalloc.start()
    for epoch in range(spec.epochs):
        if epoch == cfg.warmup_epochs and compare:
            twin = _Twin(model, opt, sched, data, spec, cfg)
            with preserve_rng():
                out["warmup"] = measure(model, data)
        t0 = time.perf_counter()
        gds.sampler.set_epoch(epoch)
        n_scans = len(gds.report.scans)
        gds.scan_if_due()                 # a due scan runs here, before the epoch's timing
        scan_time = time.perf_counter() - t0
        epoch_times.append(_epoch(model, opt, loader, f"train epoch {epoch + 1}/{spec.epochs}", step))
        sched.step()
        scanned = len(gds.report.scans) > n_scans
        if scanned:
            paper.append(detection(gds.last_result.paper_flagged, data.poisoned, len(data.labels)))
            if on_scan is not None:
                with preserve_rng():
                    out.setdefault("on_scan", []).append(on_scan(gds, data))
        logger.info("epoch {}/{}: {:.1f}s{}, {:,} samples quarantined", epoch + 1, spec.epochs, epoch_times[-1],
                    f" after a {scan_time:.1f}s scan" if scanned else "", len(gds.quarantined))
        if twin is not None:
            twin.epoch(f"unguarded epoch {epoch + 1}/{spec.epochs}")
    peak = float("nan")
    if trace_memory:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    out["guarded"] = {**measure(model, data),
                      **detection(gds.quarantined, data.poisoned, len(data.labels), data.cover)}
    if spec.attack is None:
        out["trigger_floor"] = trigger_floor(model, data, spec)
    scans = gds.report.scans
    out["scans"] = [s.model_dump() for s in scans]
    out["paper_rule"] = paper
    out["guard_scan_memory_mb"] = max((s.memory_bytes for s in scans), default=0) / 2**20
    out["scan_seconds"] = [s.seconds for s in scans]            # detection only; remedy_seconds apart
    out["epoch_seconds_median"] = float(np.median(epoch_times))
    out["epoch_seconds"] = epoch_times
    out["guard_peak_python_mb"] = peak / 2**20
    out["report"] = gds.report
    if out_dir is not None:
        gds.save(out_dir)
        torch.save({"model": model.state_dict(), "guard": gds.state_dict(), "spec": asdict(spec)},
                   Path(out_dir) / "checkpoint.pt")
    if twin is not None:
        out["unguarded"] = {**measure(twin.model, data), "epoch_seconds_median": float(np.median(twin.times)),
                            "epoch_seconds": twin.times}
    return out

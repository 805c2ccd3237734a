"""Every detector on the same poisoned model at the same moment: the guard against its peers.

For each cell (attack x rate x model) one poisoned training run is trained up to the first of the
guard's default scans (epochs 2, 4, 6 of 8) where the attack is learned (attack success >= 80 %;
the last one where it never is, the first one without an attack), and every detector scores that
one checkpoint:

- the guard (default configuration) and its trust-free mode;
- the paper's rule on training samples (layer after the largest rise of benign within-class
  cosine similarity, 3 layers, in-sample mean - 2.5 std), as the guard's scan computes it;
- IBM ART 1.20.1 ``ActivationDefence`` and ``SpectralSignatureDefense`` wrapped the way ART's
  docs show (``PyTorchClassifier``; both read the classifier's last layer): defaults, and a tuned
  setting (the penultimate features; Spectral told the true poisoning rate; for ActivationDefence
  the best F1 of its cluster analyses, chosen with the ground truth: an upper bound for it);
- loss isolation in the style of Anti-Backdoor Learning: the lowest-loss 1 % (its default
  isolation ratio) and, tuned, the lowest-loss share equal to the true poisoning rate.

Per detector: TPR, FPR (over all benign training samples), precision, F1, AUROC where it gives
scores, wall time and peak traced memory (numpy/Python allocations; torch's own CPU allocator is
not traced). The cost cells are also trained whole, with the guard's default configuration and
without it: training wall time, the guard's overhead, scan time against epoch time, and the final
clean accuracy and attack success of both models.

The work runs as ``--jobs`` single-thread processes (default 2), each pinned to a core.

    python benchmarks/bench_peers.py                  # the committed quick suite -> results/peers_quick.json
    python benchmarks/bench_peers.py --suite full     # every cell -> results/peers_full.json
    python benchmarks/bench_peers.py --cells badnets:0.1 --cost --jobs 1 --out /tmp/x.json   # one cell
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from loguru import logger
from torch.utils.data import DataLoader

from guard import GuardConfig, GuardedDataset
from guard.experiment import EpochPermutation, Prepared, RunSpec, _epoch, detection, measure, prepare, run

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))                  # bench_guard beside this file, also when imported from elsewhere
from bench_guard import fields, fmt, per_layer_auroc, render_benchmarks  # noqa: E402
# the quick suite: every attack at the rates these 8-epoch CPU runs learn (WaNet at its strongest rate), and the
# control; the full suite adds the rates and the architecture they do not learn
QUICK_CELLS = ["badnets:0.05", "badnets:0.1", "blended:0.05", "blended:0.1", "wanet:0.1", "none:0"]
FULL_CELLS = QUICK_CELLS + ["badnets:0.01", "blended:0.01", "wanet:0.05", "badnets:0.1:mobilenet_v2"]
# whole training runs with the guard (defaults, SCHEDULE) and without it, for the cost and the final model:
# no attack (what insurance costs) and the costliest attack cell (learned late, then unlearned)
COST_CELLS = ["none:0", "badnets:0.05"]
# the scan schedule the published peers_*.json were measured with (GuardConfig's default warm-up was 2
# then; it is 3 now, see guard/config.py): kept so a rerun reproduces them
SCHEDULE = {"warmup_epochs": 2, "scan_every": 2}


def timed(fn: Callable[[], tuple[np.ndarray, np.ndarray | None]]) -> tuple[np.ndarray, np.ndarray | None, float, float]:
    """Run a detector; its flagged indices, scores (higher = more suspicious), seconds, peak MB."""
    gc.collect()                           # the previous detector's garbage is not this one's peak
    tracemalloc.start()
    try:
        t = time.perf_counter()
        flagged, scores = fn()
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:                               # a failing detector must not leave tracing on
        tracemalloc.stop()
    return np.asarray(flagged, dtype=np.int64), scores, seconds, peak


def arrays(data: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """The un-augmented training images as ART takes them: (N, C, H, W) float32, one-hot labels."""
    x = torch.stack([data.scan[i][0] for i in range(len(data.scan))]).numpy()
    return x, np.eye(int(data.labels.max()) + 1, dtype=np.float32)[data.labels]


class Penultimate(nn.Module):
    """The model up to the input of its last linear layer, so that ART's "last layer" is the
    penultimate features (ART's detectors have no layer argument)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._head = ([m for m in model.modules() if isinstance(m, nn.Linear)][-1],)   # not a second submodule
        self.features = nn.Identity()          # ART hooks its last named layer: this one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats: list[torch.Tensor] = []
        h = self._head[0].register_forward_hook(lambda _m, inp, _out: feats.append(inp[0]))
        try:
            self.model(x)
        finally:
            h.remove()
        return self.features(feats[0])


def art_classifier(model: nn.Module, shape: tuple[int, ...], classes: int):
    from art.estimators.classification import PyTorchClassifier
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=shape, nb_classes=classes)


def activation_defence(model: nn.Module, x: np.ndarray, y: np.ndarray, analysis: str = "smaller"):
    from art.defences.detector.poison import ActivationDefence
    clf = art_classifier(model, x.shape[1:], y.shape[1])
    _, clean = ActivationDefence(clf, x, y).detect_poison(nb_clusters=2, nb_dims=10, reduce="PCA",
                                                          cluster_analysis=analysis)
    return np.flatnonzero(np.asarray(clean) == 0), None


def spectral(model: nn.Module, x: np.ndarray, y: np.ndarray, expected: float = 0.33):
    from art.defences.detector.poison import SpectralSignatureDefense
    clf = art_classifier(model, x.shape[1:], y.shape[1])
    defence = SpectralSignatureDefense(clf, x, y, batch_size=128, eps_multiplier=1.5, expected_pp_poison=expected)
    _, clean = defence.detect_poison()
    # its per-sample scores (ART reports them for the flagged ones only): the same statistic for all
    feats = clf.get_activations(x, layer=len(clf.layer_names) - 1, batch_size=128).reshape(len(x), -1)
    scores = np.zeros(len(x))
    labels = y.argmax(1)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        scores[rows] = SpectralSignatureDefense.spectral_signature_scores(feats[rows]).ravel()
    return np.flatnonzero(np.asarray(clean) == 0), scores


def losses(model: nn.Module, data: Prepared) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for x, y in DataLoader(data.scan, batch_size=512):
            out.append(nn.functional.cross_entropy(model(x), y, reduction="none"))
    model.train()
    return torch.cat(out).numpy()


def loss_isolation(model: nn.Module, data: Prepared, share: float):
    """ABL-style: the lowest-loss ``share`` of the training set (a learned trigger makes its
    samples the easiest ones)."""
    loss = losses(model, data)
    k = max(1, int(round(share * len(loss))))
    return np.argsort(loss)[:k], -loss


def guard_scan(model: nn.Module, data: Prepared, trust_free: bool, seed: int, rule: str = "guard",
               keep: list | None = None):
    cfg = GuardConfig(remedy="none", seed=seed, critical_rule=rule)
    gds = GuardedDataset(data.train, model, cfg, trusted=None if trust_free else data.trusted, scan_dataset=data.scan)
    gds.scan()
    if keep is not None:
        keep.append(gds)
    res = gds.last_result
    scores = np.zeros(len(data.labels))
    scores[res.scanned] = res.suspicion
    return (gds.quarantined, scores) if rule == "guard" else (res.paper_flagged, None)


def plot_cell(gds: GuardedDataset, data: Prepared, target: int, path: Path) -> None:
    """Two panels for one poisoned checkpoint: per layer, the AUROC of poison against benign samples
    of the target class (cosine to the trusted class mean, the paper's score), the guard's critical
    layers and the paper's window marked; and the guard's suspicion scores in the target class,
    poison and benign apart, with its threshold."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = np.flatnonzero(data.labels == target)
    truth = np.isin(rows, data.poisoned)
    auroc = per_layer_auroc(gds, data, rows)
    verdict = next(v for v in gds.report.scans[-1].classes if v.cls == target)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    x = np.arange(len(gds.layers))
    a1.plot(x, auroc, "o-", color="tab:blue")
    for name in verdict.critical_layers:
        if name in gds.layers:
            a1.axvline(gds.layers.index(name), color="tab:red", ls="--", lw=1)
    a1.set_xticks(x, gds.layers, rotation=60, ha="right", fontsize=7)
    a1.set_ylim(0.4, 1.02)
    a1.set_ylabel(f"AUROC, poison vs benign in class {target}")
    a1.set_title("per-layer separation (red: the guard's critical layers)")
    res = gds.last_result
    pos = np.searchsorted(res.scanned, rows)
    sus, thr = res.suspicion[pos], float(np.median(res.threshold[pos]))
    bins = np.linspace(np.percentile(sus, 0.5), np.percentile(sus, 99.5), 60)
    a2.hist(sus[~truth], bins=bins, alpha=0.6, label=f"benign ({(~truth).sum()})")
    a2.hist(sus[truth], bins=bins, alpha=0.6, label=f"poison ({truth.sum()})")
    a2.axvline(thr, color="k", ls="--", lw=1, label=f"threshold {thr:.1f}")
    a2.set_xlabel("guard suspicion (higher = more suspicious)")
    a2.set_title(f"class {target}: {verdict.verdict}")
    a2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def score(flagged: np.ndarray, scores: np.ndarray | None, seconds: float, peak: float, data: Prepared) -> dict:
    d = detection(flagged, data.poisoned, len(data.labels), data.cover)
    truth = np.zeros(len(data.labels), bool)
    truth[data.poisoned] = True
    auroc = float(roc_auc_score(truth, scores)) if scores is not None and truth.any() else float("nan")
    return {**d, "auroc": auroc, "seconds": seconds, "peak_mb": peak}


def cell(attack: str | None, rate: float, model_name: str, a: argparse.Namespace, kwargs: dict | None = None) -> dict:
    # scans when epochs 2, 4, 6 start (SCHEDULE); the checkpoint is the first of them where the attack
    # is learned (the last one otherwise): there every detector has its best chance
    kwargs = kwargs or {}
    scans = list(range(SCHEDULE["warmup_epochs"], a.epochs, SCHEDULE["scan_every"]))
    spec = RunSpec(data="cifar10", attack=attack, rate=rate, n_train=a.n_train, epochs=a.epochs, width=a.width,
                   lr=a.lr, seed=a.seed, model=model_name, attack_kwargs=kwargs)
    torch.manual_seed(spec.seed)
    data = prepare(spec)
    model = data.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs)
    sampler = EpochPermutation(len(data.labels), spec.seed)
    loader = DataLoader(data.train, batch_size=spec.batch_size, sampler=sampler)
    epoch_s = []
    for epoch in range(scans[-1]):
        epoch_s.append(_epoch(model, opt, loader, f"epoch {epoch + 1}/{scans[-1]}"))
        sched.step()
        if epoch + 1 in scans:
            checkpoint = measure(model, data)
            if attack is None or checkpoint["attack_success"] >= 0.8:
                break
    at = len(epoch_s)
    x, y = arrays(data)
    pen = Penultimate(model)
    kept: list[GuardedDataset] = []
    detectors: dict[str, Callable[[], tuple[np.ndarray, np.ndarray | None]]] = {
        "guard": lambda: guard_scan(model, data, False, spec.seed, keep=kept),
        "guard trust-free": lambda: guard_scan(model, data, True, spec.seed),
        "paper rule": lambda: guard_scan(model, data, False, spec.seed, rule="paper"),
        "ART activation (default)": lambda: activation_defence(model, x, y),
        "ART spectral (default)": lambda: spectral(model, x, y),
        "ART spectral (tuned)": lambda: spectral(pen, x, y, expected=max(rate, 0.01)),
        "loss isolation (1 %)": lambda: loss_isolation(model, data, 0.01),
        "loss isolation (tuned)": lambda: loss_isolation(model, data, max(rate, 0.01)),
    }
    out = {}
    for name, fn in detectors.items():
        out[name] = score(*timed(fn), data)
    tuned = {}
    for k in ("smaller", "distance", "silhouette-scores", "relative-size"):
        try:
            tuned[k] = score(*timed(lambda k=k: activation_defence(pen, x, y, k)), data)
        except ValueError as e:            # ART 1.20.1's relative-size analysis fails on recent numpy
            logger.warning("ART ActivationDefence cluster_analysis={!r} failed: {}", k, e)
    best = max(tuned, key=lambda k: tuned[k]["f1"])
    out["ART activation (tuned)"] = {**tuned[best], "setting": best}
    if a.plots and attack is not None:
        extra = "".join(f"_{k}{re.sub(r'[^0-9A-Za-z.]+', '-', str(v)).strip('-')}" for k, v in kwargs.items())
        name = f"{attack}_{round(100 * rate)}{'' if model_name == 'auto' else '_' + model_name}{extra}.png"
        plot_cell(kept[0], data, spec.target, Path(a.plots) / name)
    return {"attack": attack, "rate": rate, "model": model_name, "attack_kwargs": kwargs, "n_train": len(data.labels),
            "checkpoint_epoch": at, "checkpoint": checkpoint, "learned": checkpoint["attack_success"] >= 0.8,
            "epoch_seconds_median": float(np.median(epoch_s)), "detectors": out}


def table(cells: dict[str, dict]) -> str:
    names = list(next(iter(cells.values()))["detectors"])
    head = "| cell | epoch | ASR % | " + " | ".join(f"{n} F1 % (TPR/FPR)" for n in names) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, c in cells.items():
        vals = []
        for n in names:
            d = c["detectors"][n]
            f1 = "-" if np.isnan(d["f1"]) else f"{100 * d['f1']:.1f}"
            tpr = "-" if np.isnan(d["tpr"]) else f"{100 * d['tpr']:.1f}"
            vals.append(f"{f1} ({tpr}/{100 * d['fpr']:.1f})")
        learned = "" if c["learned"] or c["attack"] is None else " (not learned)"
        asr = c["checkpoint"]["attack_success"]
        lines.append(f"| {key}{learned} | {c['checkpoint_epoch']} | {'-' if np.isnan(asr) else f'{100 * asr:.1f}'} | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines)


def cost_table(cells: dict[str, dict]) -> str:
    names = list(next(iter(cells.values()))["detectors"])
    head = "| cell | epoch s | " + " | ".join(f"{n} s / MB / AUROC" for n in names) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, c in cells.items():
        vals = [f"{d['seconds']:.1f} / {d['peak_mb']:.0f} / " + ("-" if np.isnan(d["auroc"]) else f"{d['auroc']:.3f}")
                for d in (c["detectors"][n] for n in names)]
        lines.append(f"| {key} | {c['epoch_seconds_median']:.1f} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def verdict(cells: dict[str, dict]) -> list[str]:
    """Where the guard's F1 beats every ART detector (default and tuned) and the paper rule."""
    lines = []
    for key, c in cells.items():
        if not c["learned"] or c["attack"] is None:
            continue
        d = c["detectors"]
        rivals = {n: v["f1"] for n, v in d.items() if n.startswith("ART") or n == "paper rule"}
        best = max(rivals, key=rivals.get)
        won = d["guard"]["f1"] > rivals[best]
        lines.append(f"- {key}: guard F1 {100 * d['guard']['f1']:.1f} % vs best peer {best} "
                     f"{100 * rivals[best]:.1f} %: {'wins' if won else 'DOES NOT WIN'}")
    return lines


def parse_cell(item: str) -> tuple[str, str | None, float, str, dict]:
    """``attack:rate[:model][:FIELD=VALUE ...]`` -> (table key, attack or None, rate, model, attack fields).

    >>> parse_cell("adaptive_blend:0.1:cover_rate=0.1:alpha=0.25")
    ('adaptive_blend 10% cover_rate=0.1 alpha=0.25', 'adaptive_blend', 0.1, 'auto', {'cover_rate': 0.1, 'alpha': 0.25})
    """
    attack, rate, *rest = item.split(":")
    extra = [x for x in rest if "=" in x]
    model_name = next((x for x in rest if "=" not in x), "auto")
    key = "no attack" if attack == "none" else f"{attack} {float(rate):.0%}"
    key += ("" if model_name == "auto" else f" {model_name}") + "".join(f" {x}" for x in extra)
    return key, None if attack == "none" else attack, float(rate), model_name, fields(extra)


def cost(attack: str | None, rate: float, a: argparse.Namespace, kwargs: dict | None = None) -> dict:
    """One whole training run with the guard (defaults but ``SCHEDULE``) and its unguarded twin (same
    warm-up): what the guard costs and what the final models look like."""
    spec = RunSpec(data="cifar10", attack=attack, rate=rate, n_train=a.n_train, epochs=a.epochs, width=a.width,
                   lr=a.lr, seed=a.seed, guard=dict(SCHEDULE), attack_kwargs=kwargs or {})
    r = run(spec, compare=True)
    g, u = r["guarded"], r["unguarded"]
    scans = [s["seconds"] for s in r["scans"]]
    remedies = [s["remedy_seconds"] for s in r["scans"]]
    warm = r["epoch_seconds"][:len(r["epoch_seconds"]) - len(u["epoch_seconds"])]
    epoch = float(np.median(warm + u["epoch_seconds"]))           # an unguarded epoch: all samples, no guard
    return {"attack": attack, "rate": rate, "epochs": spec.epochs, "scan_seconds": scans,
            "remedy_seconds": remedies, "epoch_seconds_unguarded_median": epoch,
            "epoch_seconds_guarded": r["epoch_seconds"], "epoch_seconds_twin": u["epoch_seconds"],
            # the guard's own work over the unguarded training time (median epochs: robust to noise on a
            # shared machine; shorter guarded epochs after a quarantine are not credited)
            "overhead": (sum(scans) + sum(remedies)) / (spec.epochs * epoch),
            # plain wall clock, guarded run against its twin (warm-up shared)
            "wall_guarded": sum(r["epoch_seconds"]) + sum(scans) + sum(remedies),
            "wall_unguarded": sum(warm) + sum(u["epoch_seconds"]),
            "scan_over_epoch": float(np.median(scans)) / epoch if scans else float("nan"),
            "guarded": g, "unguarded": {k: v for k, v in u.items() if k != "epoch_seconds"}}


def cost_runs_table(runs: dict[str, dict]) -> str:
    lines = ["| run (whole training) | epochs | unguarded epoch s | scans s | remedy s | guard overhead % | "
             "wall guarded / unguarded | scan / epoch | TPR % | FPR % | acc no guard -> guard % | "
             "ASR no guard -> guard % |", "|" + "---|" * 12]
    for key, c in runs.items():
        g, u = c["guarded"], c["unguarded"]
        lines.append(
            f"| {key} | {c['epochs']} | {c['epoch_seconds_unguarded_median']:.1f} | "
            f"{' + '.join(f'{s:.1f}' for s in c['scan_seconds'])} | {sum(c['remedy_seconds']):.1f} | "
            f"**{fmt(c['overhead'])}** | {c['wall_guarded'] / c['wall_unguarded']:.2f} | {c['scan_over_epoch']:.2f} | "
            f"{fmt(g['tpr'])} | {fmt(g['fpr'])} | {fmt(u['clean_acc'])} -> {fmt(g['clean_acc'])} | "
            f"{fmt(u['attack_success'])} -> {fmt(g['attack_success'])} |")
    return "\n".join(lines)


def spawn(a: argparse.Namespace, argv: list[str]) -> int:
    """Run the cells and cost runs as ``a.jobs`` single-thread processes, each pinned to its own core
    where the machine allows (faster than one process using every core: small convolutions scale badly
    across threads), then merge their results into ``a.out``."""
    weight = {k: 2.0 if "mobilenet" in k else 1.5 if k in ("badnets:0.01", "blended:0.01", "wanet:0.05",
                                                           "wanet:0.1", "badnets:0.05") else 1.0 for k in a.cells}
    work = sorted([(weight[c], "cells", c) for c in a.cells] + [(2.0, "cost", c) for c in a.cost],
                  key=lambda w: -w[0])
    jobs: list[dict[str, list[str] | float]] = [{"cells": [], "cost": [], "load": 0.0} for _ in range(a.jobs)]
    for w, kind, c in work:                            # longest first, onto the least loaded job
        j = min(jobs, key=lambda j: j["load"])
        j[kind].append(c)
        j["load"] += w
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    tmp = Path(tempfile.mkdtemp(prefix="bench_peers."))      # not in results/, which is rendered as a whole
    procs, parts = [], []
    for i, j in enumerate(jobs):
        part = tmp / f"part{i}.json"
        cmd = [sys.executable, __file__, *argv, "--jobs", "1", "--out", str(part), "--no-render",
               "--cells", *j["cells"], "--cost", *j["cost"]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        pin = (lambda core=cores[i]: os.sched_setaffinity(0, {core})) if len(cores) >= a.jobs else None
        logger.info("job {}: cells {}, whole runs {}", i, j["cells"], j["cost"])
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=pin))
        parts.append(part)
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a benchmark job failed (exit codes {codes}); its log is above")
    merge(parts, Path(a.out))
    shutil.rmtree(tmp)
    return 0


def merge(paths: list[Path], out: Path) -> None:
    parts = [json.loads(Path(p).read_text()) for p in paths]
    write(out, {"meta": {"parts": [p["meta"] for p in parts]},
                "cells": {k: v for p in parts for k, v in p["cells"].items()},
                "cost": {k: v for p in parts for k, v in p.get("cost", {}).items()}})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["quick", "full"], default="quick",
                    help="quick: the cells in QUICK_CELLS (about 30 minutes on 2 cores); full: FULL_CELLS")
    ap.add_argument("--cells", nargs="*", help="attack:rate[:model][:FIELD=VALUE ...] (attack none: no attack; FIELD=VALUE: "
                         "further attack fields, JSON values); default: the suite's")
    ap.add_argument("--cost", nargs="*", default=COST_CELLS,
                    help="attack:rate cells also trained whole, with the guard and without, for the cost")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="parallel single-thread processes (1: this process, with torch's default threads)")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=8, help="the schedule's length (cosine LR)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="result JSON (default: benchmarks/results/peers_<suite>.json)")
    ap.add_argument("--plots", default=str(HERE / "results" / "plots"), help="folder for per-cell PNGs ('' : none)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge result files of parallel runs into --out")
    ap.add_argument("--no-render", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.out = a.out or str(HERE / "results" / f"peers_{a.suite}.json")
    a.cells = FULL_CELLS if a.cells is None and a.suite == "full" else QUICK_CELLS if a.cells is None else a.cells
    if a.merge:
        merge([Path(p) for p in a.merge], Path(a.out))
        return 0
    warmup = SCHEDULE["warmup_epochs"]
    if a.epochs <= warmup:
        raise SystemExit(f"--epochs {a.epochs} leaves no scan after the guard's {warmup}-epoch warm-up; "
                         f"use --epochs {warmup + 1} or more")
    if a.jobs > 1:
        return spawn(a, strip(sys.argv[1:] if argv is None else argv, ("--cells", "--cost", "--jobs", "--out")))
    t0 = time.time()
    cells, costs = {}, {}
    for item in a.cells:
        key, attack, rate, model_name, kwargs = parse_cell(item)
        cells[key] = cell(attack, rate, model_name, a, kwargs)
        print(table({key: cells[key]}).splitlines()[-1], flush=True)
    for item in a.cost:
        key, attack, rate, _, kwargs = parse_cell(item)
        costs[key] = cost(attack, rate, a, kwargs)
        print(cost_runs_table({key: costs[key]}).splitlines()[-1], flush=True)
    meta = {"machine": platform.platform(), "processor": platform.processor(), "python": sys.version.split()[0],
            "torch": torch.__version__, "threads": torch.get_num_threads(), "seed": a.seed, "n_train": a.n_train,
            "epochs": a.epochs, "width": a.width, "lr": a.lr, "suite": a.suite, "wall_seconds": time.time() - t0}
    result = {"meta": meta, "cells": cells, "cost": costs}
    if a.no_render:
        Path(a.out).write_text(json.dumps(result, indent=1, default=float))
    else:
        write(Path(a.out), result)
    return 0


def strip(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without the given options and their values (the parent sets them per job)."""
    out, skip = [], False
    for x in argv:
        if x.startswith("--"):
            skip = x.split("=")[0] in options
        if not skip:
            out.append(x)
    return out


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    cells, costs = result["cells"], result.get("cost")
    md = "\n\n".join(([table(cells), cost_table(cells), "\n".join(verdict(cells))] if cells else [])
                       + ([cost_runs_table(costs)] if costs else []))
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    render_benchmarks()


if __name__ == "__main__":
    raise SystemExit(main())

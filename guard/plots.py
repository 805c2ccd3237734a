"""PNG plots of a run, for a person to look at (needs the ``plots`` extra: matplotlib).

* ``separation.png`` -- per class, the share of its samples outside the benign spread at each
  layer (beyond the benign rate), at the scan that quarantined most; critical layers marked.
* ``scores.png`` -- suspicion scores of kept and quarantined training samples and of the trusted
  reference samples (last scan), with the thresholds.
* ``quarantine_per_class.png`` -- quarantined samples per class.
* ``suspicious.png`` -- the most suspicious quarantined images (image data only), so the trigger
  can be seen.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from guard.report import GuardReport


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'layerguard[plots]'") from e
    return plt


def render(run_dir: str | Path, images: np.ndarray | None = None, top: int = 16) -> list[Path]:
    """Write the plots of ``run_dir`` (its report.json and samples.csv) and return their paths.
    ``images``: the training images as uint8 (N, C, H, W) or (N, H, W, C), for the suspicious grid."""
    plt = _plt()
    run_dir = Path(run_dir)
    report = GuardReport.load_json(run_dir / "report.json")
    with open(run_dir / "samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    status = np.array([r["status"] for r in rows])
    score = np.array([float(r["score"]) for r in rows])
    out: list[Path] = []

    scan = max(report.scans, key=lambda s: s.new_quarantined, default=None)
    fig, ax = plt.subplots(figsize=(8, 4))
    if scan is not None:
        for c in scan.classes:
            ax.plot(c.layer_excess, marker=".", label=f"class {c.cls}", alpha=0.9 if c.n_flagged else 0.4)
            crit = [report.layers.index(n) for n in c.critical_layers if n in report.layers]
            ax.scatter(crit, [c.layer_excess[i] for i in crit], s=80, facecolors="none", edgecolors="k")
        ax.set_title(f"scan {scan.scan} (epoch {scan.epoch}): share outside the benign spread; o = critical layers")
    ax.set_xticks(range(len(report.layers)), report.layers, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("excess share")
    ax.legend(fontsize=6, ncol=2)
    out.append(_save(fig, run_dir / "separation.png", plt))

    fig, ax = plt.subplots(figsize=(7, 4))
    finite = np.isfinite(score)
    bins = np.linspace(score[finite].min(), score[finite].max(), 60) if finite.any() else 10
    for name, color in (("kept", "tab:blue"), ("quarantined", "tab:red"), ("restored", "tab:orange")):
        m = (status == name) & finite
        if m.any():
            ax.hist(score[m], bins=bins, alpha=0.6, color=color, label=f"{name} ({int(m.sum()):,})", log=True)
    ref = np.asarray(report.scans[-1].reference_scores if report.scans else [])
    if len(ref):
        ax.hist(ref, bins=bins, histtype="step", lw=1.5, color="tab:green", log=True,
                label=f"trusted reference, last scan ({len(ref):,})")
    for t in sorted({round(r.threshold, 3) for r in report.quarantine}):
        ax.axvline(t, color="k", ls="--", lw=1)
    ax.set_xlabel("suspicion (benign standard deviations; dashed: thresholds)")
    ax.legend()
    out.append(_save(fig, run_dir / "scores.png", plt))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    counts = np.bincount([r.label for r in report.quarantine], minlength=report.num_classes)
    ax.bar(range(report.num_classes), counts, color="tab:red")
    ax.set_xlabel("class")
    ax.set_ylabel("quarantined")
    ax.set_title(f"{len(report.quarantine):,} of {report.n_samples:,} quarantined")
    out.append(_save(fig, run_dir / "quarantine_per_class.png", plt))

    if images is not None and report.quarantine and images.ndim == 4:
        recs = sorted(report.quarantine, key=lambda r: -r.score)[:top]
        imgs = images if images.shape[-1] in (1, 3) else images.transpose(0, 2, 3, 1)
        n = int(np.ceil(np.sqrt(len(recs))))
        fig, axes = plt.subplots(n, n, figsize=(1.6 * n, 1.6 * n))
        for ax, r in zip(np.atleast_1d(axes).ravel(), recs):
            img = imgs[r.index]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
            ax.set_title(f"#{r.index} c{r.label} {r.score:.1f}", fontsize=6)
        for ax in np.atleast_1d(axes).ravel():
            ax.axis("off")
        out.append(_save(fig, run_dir / "suspicious.png", plt))
    return out


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

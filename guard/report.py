"""Step 7: what the guard did, as JSON-serialisable pydantic models, a per-sample table and a summary."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr

from guard.config import GuardConfig
from guard.decide import Verdict


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ClassReport(BaseModel):
    """One class in one scan (built by the scan's stages, see :mod:`guard.scan`)."""

    cls: int
    n_scanned: int
    verdict: Verdict = Field(description="clean | no separation yet | separate cluster | like quarantined | "
                                         "flagged by paper rule")
    critical_layers: list[str]
    excess: float = Field(description="share of the class outside the benign spread, beyond the benign rate")
    benign_rate: float
    p_value: float
    separation: float = Field(0.0, description="median discriminant z of the screened far-out samples")
    screen_share: float = Field(0.0, description="share of the screened samples far out")
    beyond_reference: float = Field(
        0.0, description="share of the screened samples beyond every reference sample (trusted: of a held-out half)")
    beyond_p: float = Field(1.0, description="p-value of that share for a clean class (guard.gate, decide.beyond_reference_p)")
    direction_p: float = Field(1.0, description="p-value of the class's main direction for a clean class (guard.direction)")
    caught_p: float = Field(1.0, description="p-value along another class's catch for a clean class (guard.elsewhere)")
    mirror_p: float = Field(1.0, description="p-value of its images against their mirror images if clean (guard.mirror)")
    threshold: float
    n_flagged: int = 0
    n_paper_flagged: int = Field(0, description="what the paper's rule would flag (baseline)")
    capped: bool = False
    n_quarantined_before: int = 0
    n_released: int = Field(0, description="earlier-quarantined samples given back (decide.give_back)")
    layer_excess: list[float] = []
    reason: str = Field("", description="why the decision came out so (the numbers it compared)")
    reference_fit: float = Field(float("nan"), description="share of its reference samples the model predicts as it")
    train_fit: float = Field(float("nan"), description="share of its scanned training samples predicted as it")



class SweepReport(BaseModel):
    """One class's unlearning sweep (:mod:`guard.sweep`)."""

    cls: int
    n: int = Field(description="kept samples of the class measured before and after unlearning")
    n_ref: int = Field(description="its trusted samples")
    beyond: int = Field(description="kept samples whose margin fell further than every trusted sample's")
    p: float = Field(description="p-value of that count for a clean class (see decide.beyond_reference_p)")
    taken: int = Field(description="quarantined: the samples beyond when p is under the bar, else 0")


class ScanReport(BaseModel):
    scan: int
    epoch: int
    time: str
    seconds: float
    seconds_by_step: dict[str, float]
    calibration: str
    rule: str
    n_scanned: int
    n_sampled: int = Field(
        0, description="scan_sample_per_class: the kept samples a sampled scan scored first (0: none); the scan "
                       "stood on them where it acted on nothing, else n_scanned is every kept sample")
    sample_acted_on: list[int] = Field(
        default=[], description="scan_sample_per_class: the classes the sample acted on, which made this a scan of "
                                "every kept sample (guard.sample.acting_classes)")
    new_quarantined: int
    total_quarantined: int
    released: list[int] = Field(
        default=[], description="earlier-quarantined samples given back: a later probe of their class put them "
                                "with its benign samples (decide.give_back)")
    paper_flagged: int
    memory_bytes: int = Field(0, description="guard's own arrays during the scan (scores, references, kept and read-back features)")
    passes: dict[str, int] = Field(default={}, description="samples each model pass of the scan forwarded")
    seconds_by_part: dict[str, float] = Field(
        default={}, description="the scan's time: data loading, model forward, hooks, transfer, analysis")
    classes: list[ClassReport]
    trusted_mismatch_p: float | None = Field(
        None, description="the classes the scan did not act on, their direction tests combined (guard.mismatch): "
                          "below max_false_alarm the trusted samples do not look like the training data")
    trusted_mismatch_at: str | None = Field(None, description="the layer or input view of that combination")
    mirror_symmetry_p: float | None = Field(
        None, description="mirror_images='auto': p of the trusted images (trust-free: the training images) against their mirror "
                          "images (guard.mirror.symmetry); the mirror test ran where at least thresholds.mirror_symmetry_p")
    warnings: list[str] = []
    remedy: str | None = None
    remedy_seconds: float = 0.0
    remedy_fit_before: float | None = Field(
        None, description="share of the held-out quarantined samples predicted as their label")
    remedy_fit_p: float | None = Field(
        None, description="one-sided binomial p of that fit were it chance; unlearning needs it below max_false_alarm")
    remedy_fit_class: int | None = Field(
        None, description="where the pooled fit did not start unlearning: the class whose held-out samples did "
                          "(remedy_fit_p is then that class's, corrected for the classes)")
    remedy_fit_after: float | None = None
    remedy_fit_allowed: float | None = Field(
        None, description="the fit that counts as unlearned: how often benign images of other classes are "
                          "predicted as those labels, plus two standard errors")
    remedy_steps: int = 0
    remedy_stopped: str | None = Field(
        None, description="why unlearning stopped: chance, no progress (unlearn_patience checks) or cap")
    remedy_scale_raised: int = Field(
        0, description="parameters whose squared-gradient estimate in your adaptive optimizer (Adam, RMSprop) was "
                       "raised to the unlearning's, so training does not at once undo it")
    remedy_bn_samples: int = Field(
        0, description="kept samples that re-estimated the BatchNorm running statistics after unlearning")
    remedy_accuracy_before: float | None = Field(
        None, description="accuracy before unlearning on the samples that set the chance rate (trusted, else kept)")
    remedy_accuracy_after: float | None = Field(
        None, description="their accuracy after unlearning, read with the statistics the model keeps")
    remedy_accuracy_p: float | None = Field(
        None, description="one-sided exact McNemar p that unlearning lowered that accuracy (pairs that changed)")
    sweep: list[SweepReport] = Field(
        default=[], description="after unlearning: the quarantined classes' kept samples tested by their margin's fall")
    reference_scores: list[float] = Field(
        default=[], description="suspicion of the benign reference samples on the same scale (for plots)")


class QuarantineRecord(BaseModel):
    index: int
    label: int
    scan: int
    epoch: int
    layer: str
    score: float = Field(description="suspicion (benign-calibrated standard deviations; higher is more suspicious)")
    threshold: float
    reason: str


SAMPLE_COLUMNS = ("index", "label", "status", "is_quarantined", "score", "threshold", "layer", "reason", "scan")
"""The per-sample table's columns (``GuardedDataset.table``, ``samples.csv``, ``GuardReport.to_pandas``)."""


def quarantined_row(r: QuarantineRecord) -> dict[str, Any]:
    """A quarantined sample's row of the per-sample table."""
    return {"index": r.index, "label": r.label, "status": "quarantined", "is_quarantined": True, "score": r.score,
            "threshold": r.threshold, "layer": r.layer, "reason": r.reason, "scan": r.scan}


class RestoreRecord(BaseModel):
    time: str
    epoch: int
    indices: list[int]


_MEANING = {
    "separate cluster": "part of the class sits apart from that class's benign samples in the model's features at "
                        "the named layers, as samples carrying a trigger do; that part was quarantined",
    "like quarantined": "samples that resemble ones already quarantined from the class, at the named layers",
    "exposed by unlearning": "kept samples of a quarantined class whose label the model fitted far less once what "
                             "the quarantined samples taught was unlearned (more than any trusted sample of the class)",
    "flagged by paper rule": "below the paper's similarity threshold at its critical layer (critical_rule='paper')",
}


class GuardReport(BaseModel):
    """Everything the guard did: every scan (per class, per layer), the quarantine and restores."""

    config: GuardConfig
    n_samples: int
    num_classes: int
    layers: list[str]
    layers_source: Literal["discovered", "named"] = Field(
        "discovered", description="found by guard.discover from the model's structure, or GuardConfig.layers")
    scan_source: str = Field("dataset", description="what scans read: scan_dataset, the dataset, or its scan view")
    scans: list[ScanReport] = []
    quarantine: list[QuarantineRecord] = Field(default=[], description="currently quarantined samples")
    restores: list[RestoreRecord] = []
    evaluation: dict[str, float] | None = Field(
        None, description="red-team runs only: detection and attack metrics against the known poison")

    _samples: Any = PrivateAttr(default=None)      # the GuardedDataset's per-sample table, while it lives

    def to_pandas(self, per: Literal["sample", "class"] = "sample") -> Any:
        """A pandas DataFrame: one row per sample (``index, label, status, is_quarantined, score,
        threshold, layer, reason, scan``; a report read back from JSON has the quarantined samples
        only), or with ``per="class"`` one row per class of the last scan (``cls, n_scanned, verdict,
        critical_layers, n_flagged, quarantined, separation, screen_share``). Needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("GuardReport.to_pandas needs pandas: pip install 'layerguard[pandas]'") from None
        if per == "class":
            last = self.scans[-1].classes if self.scans else []
            held = pd.Series([r.label for r in self.quarantine], dtype="int64").value_counts()
            return pd.DataFrame([{"cls": c.cls, "n_scanned": c.n_scanned, "verdict": str(c.verdict),
                                  "critical_layers": "/".join(c.critical_layers), "n_flagged": c.n_flagged,
                                  "quarantined": int(held.get(c.cls, 0)), "separation": c.separation,
                                  "screen_share": c.screen_share} for c in last])
        if self._samples is not None:
            return pd.DataFrame(self._samples(), columns=list(SAMPLE_COLUMNS)).set_index("index")
        rows = [quarantined_row(r) for r in self.quarantine]
        return pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS)).set_index("index")

    def summary(self) -> str:
        """A short human summary."""
        lines = [f"guard: {self.n_samples:,} samples, {self.num_classes} classes, {len(self.layers)} layers, "
                 f"{len(self.scans)} scans, "
                 f"{len(self.quarantine):,} quarantined ({len(self.quarantine) / max(self.n_samples, 1):.2%})",
                 f"  layers ({self.layers_source}, early to late): {', '.join(self.layers)}",
                 f"  scans read: {self.scan_source}"]
        for s in self.scans:
            acted = [c for c in s.classes if c.n_flagged]
            lines.append(f"  scan {s.scan} @ epoch {s.epoch}: {s.seconds:.1f}s, {s.calibration} reference, "
                         f"+{s.new_quarantined} quarantined" + "".join(
                             f"; class {c.cls}: {c.verdict} at {'/'.join(c.critical_layers)} ({c.n_flagged})"
                             for c in acted) + ("" if acted else "; nothing separates") + "".join(
                             f"; class {w.cls}: exposed by unlearning ({w.taken})" for w in s.sweep if w.taken))
            lines.extend(f"    warning: {w}" for w in s.warnings)
        if self.restores:
            lines.append(f"  restored: {sum(len(r.indices) for r in self.restores)} samples")
        said = {c.verdict for s in self.scans for c in s.classes if c.n_flagged}
        said |= {"exposed by unlearning" for s in self.scans for w in s.sweep if w.taken}
        lines.extend(f"  ({v}: {_MEANING[v]})" for v in sorted(said) if v in _MEANING)
        return "\n".join(lines)

    def save_json(self, path: str | os.PathLike) -> None:
        atomic_write(path, self.model_dump_json(indent=2))

    def save_csv(self, path: str | os.PathLike) -> None:
        """The quarantine as a CSV table (one row per quarantined sample)."""
        import io

        buf = io.StringIO()
        fields = list(QuarantineRecord.model_fields)
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        for r in self.quarantine:
            w.writerow(r.model_dump())
        atomic_write(path, buf.getvalue())

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> "GuardReport":
        return cls.model_validate(json.loads(Path(path).read_text()))

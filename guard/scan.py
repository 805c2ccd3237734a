"""One scan: extract -> locate -> score -> decide, as a pure computation.

Passes over the data:

1. *calibrate* -- features of the trusted set (or, trust-free, of a training subset cleaned by
   the loss cue) build the per-class benign reference; leave-one-out cosines give the benign
   spread per class and layer.
2. *score* -- every kept training sample gets its cosine to its class reference at every layer
   (an N x L table); samples far outside the benign spread are accumulated into per-class
   "suspect" centroids (C x D per layer, streaming).
3. *confirm* -- only for classes whose samples leave the benign spread more than benign samples
   do: a two-centroid discriminant (closer to the suspect centroid than to the benign one),
   calibrated on the trusted samples, at the critical layer window.

The result says what to quarantine; :class:`~guard.GuardedDataset` applies it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from loguru import logger
from scipy import stats
from torch.utils.data import Dataset

from guard.config import GuardConfig
from guard.distributed import gather_rows, shard, sum_tensors
from guard.errors import GuardError
from guard.extract import Extractor
from guard.hooks import scan_mode
from guard.locate import excess_share, guard_layers, paper_window
from guard.probe import Probe, self_train
from guard.reference import Reference, unit

_STD_FLOOR = 1e-4
_MIN_CLASS = 5           # a class with fewer scanned samples is never acted on
# A screened cluster holding at least _LARGE_SHARE of its class counts as separate at separation_z
# minus _LARGE_SLACK. Recorded screens (CIFAR-10 benchmarks): benign classes reached shares of at most
# 0.20 (trust-free, separation 3.9) and 0.12 (trusted); BadNets 10 % scanned trust-free after 3 epochs
# held half its class at a median separation of 5.4
_LARGE_SHARE = 0.3
_LARGE_SLACK = 1.0


def small_sample(n: int, z: float) -> float:
    """Widening of a benign spread estimated from ``n`` samples, so that a new benign sample passes
    ``z`` standard deviations as rarely as the normal tail says: Student's t quantile over the
    normal one, times the prediction-interval term sqrt(1 + 1/n). About 1.03 for n = 100 and 1.5
    for n = 10, where a handful of trusted samples would otherwise make a class's natural
    variety look like a separate cluster."""
    if n < 3:
        return 1.0
    q = stats.norm.cdf(z)
    return float(stats.t.ppf(q, n - 1) / z * np.sqrt(1.0 + 1.0 / n))


@dataclass
class Calibration:
    """Benign reference and the benign spread of scores per class and layer."""

    reference: Reference
    dataset: Dataset            # where the benign reference samples come from
    indices: np.ndarray | None  # which of its samples (None: all)
    labels: np.ndarray
    loo: np.ndarray             # (n, L) leave-one-out cosines
    in_sample: np.ndarray       # (n, L) in-sample cosines (the paper's calibration)
    mean: np.ndarray            # (C, L)
    std: np.ndarray             # (C, L)
    source: str

    def z(self, raw: np.ndarray, labels: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
        """float32 z-scores, filled in chunks of rows: at N = 1,000,000 a float64 result and its
        temporaries would each be N x L x 8 bytes."""
        mean, std = self.mean.astype(np.float32), self.std.astype(np.float32)
        out = np.empty(raw.shape, dtype=np.float32)
        for s in range(0, len(raw), chunk):
            lab = labels[s:s + chunk]
            np.subtract(raw[s:s + chunk], mean[lab], out=out[s:s + chunk])
            out[s:s + chunk] /= std[lab]
        return out


@dataclass
class ClassVerdict:
    cls: int
    n_scanned: int
    verdict: str                 # clean | no separation yet | separate cluster
    critical_layers: list[str]
    excess: float                # share out of benign spread, beyond the benign rate
    benign_rate: float
    p_value: float
    threshold: float             # on the suspicion score (higher = more suspicious)
    n_flagged: int
    n_paper_flagged: int
    separation: float = 0.0      # median discriminant z of the screened out-of-spread samples
    screen_share: float = 0.0    # share of the screened samples out of the benign spread
    capped: bool = False
    n_quarantined_before: int = 0   # samples of the class already quarantined by earlier scans
    layer_excess: list[float] = field(default_factory=list)


@dataclass
class ScanResult:
    scanned: np.ndarray          # dataset indices scanned (the kept ones)
    suspicion: np.ndarray        # (len(scanned),) higher = more suspicious
    threshold: np.ndarray        # (len(scanned),) per-sample threshold (its class's)
    labels: np.ndarray           # (len(scanned),) labels read during the scan
    layer: np.ndarray            # (len(scanned),) index of the (last) layer its score came from
    flagged: np.ndarray          # dataset indices to quarantine (active rule)
    paper_flagged: np.ndarray    # dataset indices the paper's rule flags (baseline, for comparison)
    classes: list[ClassVerdict]
    calibration_source: str
    seconds: dict[str, float]
    warnings: list[str]
    memory_bytes: int = 0
    reference_suspicion: np.ndarray | None = None   # the benign reference samples' suspicion, same scale


class Scanner:
    """Runs scans of ``model`` over a dataset; holds no quarantine state."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[str], extractor: Extractor,
                 config: GuardConfig) -> None:
        self.model, self.layers, self.extractor, self.cfg = model, list(layers), extractor, config
        self.C = extractor.num_classes

    # ---- pass 1 -------------------------------------------------------------------------
    def calibrate(self, trusted: Dataset | None, train: Dataset, kept: np.ndarray) -> Calibration:
        """Two streaming passes over the benign reference samples: class sums, then their
        leave-one-out and in-sample scores. Memory: C x D per layer, never n x D."""
        if trusted is not None:
            dataset, indices, source = trusted, None, "trusted"
        else:
            dataset, indices, source = train, self._trust_free_indices(train, kept), "trust-free"
        ref: Reference | None = None
        labels: list[np.ndarray] = []
        for b in self.extractor.stream(dataset, self.layers, indices, f"scan/{source}"):
            ref = ref or Reference([f.shape[1] for f in b.feats], self.C)
            ref.update(b.feats, b.labels)
            labels.append(b.labels.numpy())
        if ref is None:
            raise GuardError(f"the {source} reference is empty; pass a trusted set with samples of every class")
        lab = np.concatenate(labels)
        counts = np.bincount(lab, minlength=self.C)
        few = [int(c) for c in np.flatnonzero((counts > 0) & (counts < 2))]
        if few:
            raise GuardError(f"the {source} reference has fewer than 2 samples of classes {few} "
                             f"(counts {[int(counts[c]) for c in few]}); a class needs at least 2 to have a spread: "
                             + ("pass a trusted set with samples of these classes" if source == "trust-free"
                                else "add verified samples of these classes"))
        loo, ins = [], []
        for b in self.extractor.stream(dataset, self.layers, indices, f"scan/{source}-calibrate"):
            loo.append(ref.loo_score(b.feats, b.labels).numpy())
            ins.append(ref.score(b.feats, b.labels).numpy())
        loo_a, ins_a = np.concatenate(loo), np.concatenate(ins)
        mean = np.full((self.C, len(self.layers)), np.nan)
        std = np.full((self.C, len(self.layers)), np.nan)
        for c in np.flatnonzero(counts):
            mean[c] = loo_a[lab == c].mean(0)
            std[c] = np.maximum(loo_a[lab == c].std(0), _STD_FLOOR) * small_sample(int(counts[c]), self.cfg.threshold_z)
        return Calibration(ref, dataset, indices, lab, loo_a, ins_a, mean, std, source)

    def _trust_free_indices(self, train: Dataset, kept: np.ndarray) -> np.ndarray:
        """Trust-free reference: a random training subset, keeping per class the half the model
        fits worst. Poisoned samples are fitted fastest (their trigger is an easy shortcut), so
        the high-loss half of a class is mostly benign even when poison is a majority of it."""
        rng = np.random.default_rng(self.cfg.seed)
        n = min(len(kept), self.cfg.trust_free_per_class * self.C * 2)
        pool = np.sort(rng.choice(kept, n, replace=False))
        losses, labels = [], []
        for b in self.extractor.stream(train, self.layers[-1:], pool, "scan/trust-free-pool"):
            if b.logits is None or b.logits.dim() != 2 or b.logits.shape[1] != self.C:
                raise GuardError("trust-free mode needs the model to output (batch, num_classes) logits; "
                                 "pass a trusted set instead")
            losses.append(torch.nn.functional.cross_entropy(b.logits, b.labels, reduction="none").numpy())
            labels.append(b.labels.numpy())
        loss, lab = np.concatenate(losses), np.concatenate(labels)
        keep = np.zeros(len(lab), dtype=bool)
        for c in np.unique(lab):
            idx = np.flatnonzero(lab == c)
            keep[idx[loss[idx] >= np.median(loss[idx])]] = True
        return pool[keep]

    # ---- the scan -----------------------------------------------------------------------
    def run(self, train: Dataset, trusted: Dataset | None, kept: np.ndarray,
            prior: dict[int, np.ndarray] | None = None) -> ScanResult:
        """Scan the ``kept`` indices of ``train``. ``prior`` maps a class to its already quarantined
        indices: such a class is searched again for samples like them (see ``_follow_up``)."""
        cfg, L = self.cfg, len(self.layers)
        seconds: dict[str, float] = {}
        warnings: list[str] = []
        with scan_mode(self.model):
            t = time.monotonic()
            cal = self.calibrate(trusted, train, kept)
            seconds["calibrate"] = time.monotonic() - t

            # pass 2: per-sample cosines at every layer + suspect centroids (sharded across ranks)
            t = time.monotonic()
            mine = kept[shard(len(kept))]
            raw = np.empty((len(mine), L), dtype=np.float32)
            labels = np.empty(len(mine), dtype=np.int32)          # C < 2**31; 4 bytes a sample at N = 10**6
            suspects = Reference([s.shape[1] for s in cal.reference.sums], self.C)
            done = 0
            for b in self.extractor.stream(train, self.layers, mine, "scan/train"):
                n = len(b.labels)
                lab = b.labels.numpy()
                missing = np.flatnonzero(np.isnan(cal.mean[lab, 0]))
                if len(missing):
                    c = int(lab[missing[0]])
                    raise GuardError(f"class {c} (dataset index {int(b.positions[missing[0]])}) has no samples in "
                                     f"the {cal.source} reference; add trusted samples of class {c}")
                s = cal.reference.score(b.feats, b.labels).numpy()
                raw[done:done + n], labels[done:done + n] = s, lab
                z = cal.z(s, lab)
                for li, f in enumerate(b.feats):
                    m = torch.from_numpy(z[:, li] < -cfg.threshold_z)
                    if m.any():
                        suspects.sums[li].index_add_(0, b.labels[m], unit(f[m].double()))
                done += n
            if done != len(mine):
                raise GuardError(f"dataset yielded {done} samples for {len(mine)} indices; its length changed "
                                 "during the scan: keep len(dataset) constant while training")
            raw, labels = gather_rows(raw, len(kept)), gather_rows(labels, len(kept))
            sum_tensors(suspects.sums)
            seconds["score"] = time.monotonic() - t

            present = np.unique(labels)
            if len(present) < 2:
                raise GuardError(f"all {len(labels)} scanned samples have label {int(present[0])}: the guard judges "
                                 "each class against its benign reference and needs data of at least 2 classes; "
                                 "check the labels (or label_key) the guard reads")
            counts = np.bincount(labels, minlength=self.C)
            few = {int(c): int(counts[c]) for c in present if counts[c] < _MIN_CLASS}
            if few:
                msg = (f"classes {few} have fewer than {_MIN_CLASS} samples in this scan: too few to tell a cluster "
                       "from chance, so they are scored but never acted on; add data or merge such classes")
                logger.warning(msg)
                warnings.append(msg)
            foreign = sorted(set(np.unique(cal.labels).tolist()) - set(present.tolist()))
            if cal.source == "trusted" and foreign:
                raise GuardError(f"the trusted set has classes {foreign} that the training set lacks; it must use "
                                 "the training set's label mapping (same classes, same indices)")
            zb = cal.z(cal.loo, cal.labels)
            suspicion = np.zeros(len(kept), dtype=np.float32)
            threshold = np.full(len(kept), np.inf, dtype=np.float32)
            where = np.zeros(len(kept), dtype=np.int16)
            ref_susp = np.zeros(len(cal.labels), dtype=np.float32)
            flagged: list[np.ndarray] = []
            paper_flagged: list[np.ndarray] = []
            verdicts: list[ClassVerdict] = []
            confirm: dict[int, list[int]] = {}
            # z-scores one class at a time: only the out-of-spread flags (1 byte a layer) are kept for
            # all N, not an N x L float table besides the raw cosines
            out_of_spread = np.zeros(raw.shape, dtype=bool)
            for c in np.unique(labels):
                rows = np.flatnonzero(labels == c)
                z_c = cal.z(raw[rows], labels[rows])
                out_of_spread[rows] = z_c < -cfg.threshold_z
                ex, base = excess_share(z_c, zb[cal.labels == c], cfg.threshold_z)
                # paper baseline: in-sample mean - 2.5 std of summed cosines over its window
                win = paper_window(cal.in_sample[cal.labels == c].mean(0))
                ref_sum = cal.in_sample[cal.labels == c][:, win].sum(1)
                p_flag = raw[rows][:, win].sum(1) < ref_sum.mean() - 2.5 * ref_sum.std()
                paper_flagged.append(kept[rows[p_flag]])
                if cfg.critical_rule == "paper":
                    layer_idx = win
                else:
                    layer_idx = guard_layers(ex, cfg.window)
                li = layer_idx[0]
                rate = max(float(base[li]), 0.5 / max((cal.labels == c).sum(), 1))
                k = int(round((ex[li] + base[li]) * len(rows)))
                p_value = float(stats.binom.sf(k - 1, len(rows), rate))
                is_candidate = ex[li] >= cfg.min_cluster and p_value < 1e-4 and len(rows) >= _MIN_CLASS
                suspicion[rows] = -z_c[:, layer_idx].mean(1)
                ref_susp[cal.labels == c] = -zb[cal.labels == c][:, layer_idx].mean(1)
                threshold[rows] = cfg.threshold_z
                where[rows] = li
                v = ClassVerdict(int(c), len(rows), "clean", [self.layers[i] for i in layer_idx], float(ex[li]),
                                 float(base[li]), p_value, cfg.threshold_z, 0, int(p_flag.sum()),
                                 n_quarantined_before=len((prior or {}).get(int(c), ())),
                                 layer_excess=[round(float(e), 4) for e in ex])
                verdicts.append(v)
                if cfg.critical_rule == "paper":
                    v.verdict = "flagged by paper rule" if p_flag.any() else "clean"
                    v.threshold = float(ref_sum.mean() - 2.5 * ref_sum.std())
                    self._take(v, kept[rows[p_flag]], -raw[rows[p_flag]][:, win].sum(1), flagged, warnings)
                elif is_candidate:
                    confirm[int(c)] = layer_idx
                elif ex[li] > 0 and p_value < 1e-2:
                    v.verdict = "no separation yet"
            if confirm:
                t = time.monotonic()
                self._confirm(train, kept, labels, out_of_spread, cal, suspects, confirm, verdicts,
                              suspicion, threshold, flagged, warnings, ref_susp)
                seconds["confirm"] = time.monotonic() - t
            present = set(present.tolist())
            separate = {v.cls for v in verdicts if v.verdict == "separate cluster"}
            follow = {c: q for c, q in (prior or {}).items() if len(q) >= 2 and c in present and c not in separate}
            if follow:
                t = time.monotonic()
                self._follow_up(train, kept, labels, cal, follow, verdicts, suspicion, threshold, flagged, warnings,
                                ref_susp)
                seconds["follow_up"] = time.monotonic() - t
        memory = (raw.nbytes + out_of_spread.nbytes + labels.nbytes + suspicion.nbytes + threshold.nbytes + where.nbytes
                  + cal.loo.nbytes + cal.in_sample.nbytes
                  + 3 * sum(x.numel() * x.element_size() for x in cal.reference.sums))
        flat = np.unique(np.concatenate(flagged)) if flagged else np.empty(0, np.int64)
        paper = np.unique(np.concatenate(paper_flagged)) if paper_flagged else np.empty(0, np.int64)
        return ScanResult(kept, suspicion, threshold, labels, where, flat.astype(np.int64), paper.astype(np.int64),
                          verdicts, cal.source, seconds, warnings, memory, ref_susp)

    def _confirm(self, train, kept, labels, out_of_spread, cal, suspects, confirm, verdicts, suspicion,
                 threshold, flagged, warnings, ref_susp) -> None:
        """Pass 3 over candidate classes: a two-centroid discriminant (closer to the suspects' centroid
        than to the benign one), calibrated on the benign reference samples, then a linear probe.

        A screen of at most ``screen_per_class`` samples per candidate class decides whether the class
        holds a separate, far-out cluster. On the screen each sample is scored against the suspect
        centroid *without itself* (leave-one-out), so scattered benign outliers do not look like a
        cluster of one. For a class that passes, the discriminant's confident calls on the screen
        seed a self-trained LDA probe (:mod:`guard.probe`) that draws the cluster's edge sharply;
        a full pass over the class then scores every sample with it. Where the probe has too few
        calls to fit, centroids re-estimated from the screen's confident calls score instead.
        """
        cfg = self.cfg
        win_ids = sorted({i for ids in confirm.values() for i in ids})
        probe_ids = self._probe_layers()
        layer_ids = sorted(set(win_ids) | set(probe_ids))
        names = [self.layers[i] for i in layer_ids]
        at = {li: k for k, li in enumerate(layer_ids)}
        use_of = {c: np.array([li in confirm[c] for li in layer_ids]) for c in confirm}
        rng = np.random.default_rng([cfg.seed, 1])
        screen_rows = np.sort(np.concatenate([
            rng.choice(r, min(len(r), cfg.screen_per_class), replace=False)
            for r in (np.flatnonzero(labels == c) for c in confirm)]))
        t_feats, t_lab, t_rows = self._reference_feats(cal, confirm, names)

        def calibrate(sus, ben):
            t_d = self._discriminant(t_feats, t_lab, use_of, sus, ben, loo=True)
            return ({c: float(t_d[t_lab == c].mean()) for c in confirm},
                    {c: max(float(t_d[t_lab == c].std()), _STD_FLOOR)
                     * small_sample(int((t_lab == c).sum()), cfg.threshold_z) for c in confirm})

        def zscore(d, lab, mu, sd):
            return (d - np.array([mu[int(c)] for c in lab])) / np.array([sd[int(c)] for c in lab])

        sus = [suspects.sums[i] for i in layer_ids]
        ben = [cal.reference.sums[i] for i in layer_ids]
        mu, sd = calibrate(sus, ben)
        new_sus = [torch.zeros_like(x) for x in sus]
        new_ben = [x.clone() for x in ben]
        z1, lab1, screen_feats = [], [], []
        done = 0
        for b in self.extractor.stream(train, names, kept[screen_rows], "scan/screen", stop_early=True):
            bl = b.labels.numpy()
            own = out_of_spread[screen_rows[done:done + len(bl)]][:, layer_ids]
            done += len(bl)
            zb = zscore(self._discriminant(b.feats, bl, use_of, sus, ben, own_suspect=own), bl, mu, sd)
            hi, lo = torch.from_numpy(zb > cfg.threshold_z), torch.from_numpy(zb < 1.0)
            units = [unit(f.double()) for f in b.feats]
            for pos, u in enumerate(units):
                new_sus[pos].index_add_(0, b.labels[hi], u[hi])
                new_ben[pos].index_add_(0, b.labels[lo], u[lo])
            screen_feats.append([units[at[i]] for i in probe_ids])
            z1.append(zb)
            lab1.append(bl)
        z1, lab1 = np.concatenate(z1), np.concatenate(lab1)
        by_class = {v.cls: v for v in verdicts}
        separated = []
        for c in confirm:
            z = z1[lab1 == c]
            hit = z > cfg.threshold_z
            v = by_class[c]
            v.separation = float(np.median(z[hit])) if hit.any() else 0.0
            v.screen_share = float(hit.mean())
            # A trust-free reference is the hard half of each class, so the easy half sits apart from it
            # in every clean class (most at the logits): there only a far-out cluster counts, or one that
            # holds a large share of the class and is nearly as far out (_LARGE_SHARE; with a trusted
            # reference such a share counts alone).
            share = v.screen_share
            share_alone = cal.source == "trusted" and share >= cfg.cluster_share
            large = share >= _LARGE_SHARE and v.separation > cfg.separation_z - _LARGE_SLACK
            if share_alone or large or (share >= cfg.min_cluster and v.separation > cfg.separation_z):
                separated.append(c)
            else:
                v.verdict = "no separation yet"
        if not separated:
            return
        probes: dict[int, Probe] = {}
        screen_units = [torch.cat([f[k] for f in screen_feats]) for k in range(len(probe_ids))]
        for c in separated:
            sel = torch.from_numpy(lab1 == c)
            tsel = t_lab == c
            t_units = [unit(t_feats[at[i]][torch.from_numpy(tsel)].double()) for i in probe_ids]
            probe = self_train([u[sel] for u in screen_units], t_units, z1[lab1 == c],
                               cfg.threshold_z, 1.0, cfg.probe_shrinkage, cfg.window, rng_seed=cfg.seed)
            if probe is not None:
                probes[c] = probe
                by_class[c].critical_layers = [self.layers[probe_ids[k]] for k in probe.layers]
                ref_susp[t_rows[tsel]] = probe.z(t_units)
        mu, sd = calibrate(new_sus, new_ben)
        if any(c not in probes for c in separated):
            t_z = zscore(self._discriminant(t_feats, t_lab, use_of, new_sus, new_ben, loo=True), t_lab, mu, sd)
            for c in separated:
                if c not in probes:
                    ref_susp[t_rows[t_lab == c]] = t_z[t_lab == c]
        rows = np.flatnonzero(np.isin(labels, separated))
        z_all, done = np.zeros(len(rows)), 0
        for b in self.extractor.stream(train, names, kept[rows], "scan/confirm", stop_early=True):
            bl = b.labels.numpy()
            z_all[done:done + len(bl)] = zscore(self._discriminant(b.feats, bl, use_of, new_sus, new_ben), bl, mu, sd)
            if probes:
                self._apply_probes(probes, [unit(b.feats[at[i]].double()) for i in probe_ids], bl, z_all, done)
            done += len(bl)
        for c in separated:
            v, sel = by_class[c], labels[rows] == c
            r, z_d = rows[sel], z_all[sel]
            suspicion[r], threshold[r] = z_d, cfg.flag_z
            v.verdict, v.threshold = "separate cluster", cfg.flag_z
            hit = z_d > cfg.flag_z
            self._take(v, kept[r[hit]], z_d[hit], flagged, warnings)

    def _probe_layers(self) -> list[int]:
        """Layers the linear probe may use: all but the first (input-like) and the last (logits,
        too few dimensions to carry a trigger direction apart from the label)."""
        n = len(self.layers)
        return list(range(1, n - 1)) if n >= 4 else list(range(n))

    def _reference_feats(self, cal: Calibration, classes,
                         names: list[str]) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
        """Features at ``names`` of the benign reference samples of ``classes`` (a partial pass over the
        small reference set, so the reference's features need not be kept between passes), their
        labels, and their rows in ``cal.labels``."""
        tb = np.flatnonzero(np.isin(cal.labels, list(classes)))
        pos = tb if cal.indices is None else cal.indices[tb]
        chunks = list(self.extractor.stream(cal.dataset, names, pos, "scan/reference-layers", stop_early=True))
        return [torch.cat([b.feats[i] for b in chunks]) for i in range(len(names))], cal.labels[tb], tb

    def _stream_discriminant(self, train, indices, names, use_of, sus, ben, desc: str) -> np.ndarray:
        """The discriminant of ``indices`` (in order), from a pass that stops after the window layers."""
        d, done = np.zeros(len(indices)), 0
        for b in self.extractor.stream(train, names, indices, desc, stop_early=True):
            d[done:done + len(b.labels)] = self._discriminant(b.feats, b.labels.numpy(), use_of, sus, ben)
            done += len(b.labels)
        return d

    def _follow_up(self, train, kept, labels, cal, follow, verdicts, suspicion, threshold, flagged,
                   warnings, ref_susp) -> None:
        """Classes that already hold quarantined samples: poison left behind shares the trigger of the
        quarantined samples, so they are its labelled examples. A linear probe is fitted with (a sample
        of) them as the suspect side and a screen of the class's kept samples as the benign side, then
        refitted on its own out-of-fold calls (:func:`~guard.probe.self_train`), so leftovers in the
        screen move to the suspect side. This finds leftovers that no longer leave the benign spread by
        themselves (a backdoor that a few remaining samples keep alive). Where no probe can be fitted,
        the quarantined samples' centroid is the suspect centroid of a two-centroid discriminant."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 2])
        probe_ids = self._probe_layers()
        names = [self.layers[i] for i in probe_ids]
        q_take = {c: np.sort(rng.choice(q, min(len(q), cfg.screen_per_class), replace=False))
                  for c, q in follow.items()}
        s_take = {c: np.sort(rng.choice(np.flatnonzero(labels == c), min(int((labels == c).sum()),
                                                                           cfg.screen_per_class), replace=False))
                  for c in follow}
        order = np.concatenate([np.concatenate([q_take[c], kept[s_take[c]]]) for c in follow])
        chunks = [[unit(f.double()) for f in b.feats]
                  for b in self.extractor.stream(train, names, order, "scan/quarantined", stop_early=True)]
        units = [torch.cat([ch[k] for ch in chunks]) for k in range(len(names))]
        t_feats, t_lab, t_rows = self._reference_feats(cal, follow, names)
        by_class = {v.cls: v for v in verdicts}
        probes: dict[int, Probe] = {}
        start = 0
        for c in follow:
            nq, ns = len(q_take[c]), len(s_take[c])
            part = slice(start, start + nq + ns)
            start += nq + ns
            seed = np.concatenate([np.full(nq, cfg.threshold_z + 1.0), np.zeros(ns)])
            tsel = t_lab == c
            t_units = [unit(t[torch.from_numpy(tsel)].double()) for t in t_feats]
            probe = self_train([u[part] for u in units], t_units, seed,
                               cfg.threshold_z, 1.0, cfg.probe_shrinkage, cfg.window, rng_seed=cfg.seed)
            if probe is not None:
                probes[c] = probe
                by_class[c].critical_layers = [names[k] for k in probe.layers]
                ref_susp[t_rows[tsel]] = probe.z(t_units)
        if len(probes) < len(follow):
            self._follow_centroid(train, kept, labels, cal, {c: follow[c] for c in follow if c not in probes},
                                  by_class, suspicion, threshold, flagged, warnings, ref_susp)
        if not probes:
            return
        rows = np.flatnonzero(np.isin(labels, list(probes)))
        z_all, done = np.zeros(len(rows)), 0
        for b in self.extractor.stream(train, names, kept[rows], "scan/follow-up", stop_early=True):
            bl = b.labels.numpy()
            self._apply_probes(probes, [unit(f.double()) for f in b.feats], bl, z_all, done)
            done += len(bl)
        for c in probes:
            sel = labels[rows] == c
            self._flag_like_quarantined(by_class[c], kept, rows[sel], z_all[sel], suspicion, threshold, flagged,
                                        warnings)

    def _follow_centroid(self, train, kept, labels, cal, follow, by_class, suspicion, threshold, flagged,
                         warnings, ref_susp) -> None:
        """Fallback of the follow-up: the quarantined samples, seen through the current model, are the
        suspect centroid of a two-centroid discriminant over the layers where they sit furthest below
        the benign spread."""
        cfg = self.cfg
        q_idx = np.sort(np.concatenate(list(follow.values())))
        q_sums = Reference([s.shape[1] for s in cal.reference.sums], self.C)
        q_z: dict[int, list[np.ndarray]] = {c: [] for c in follow}
        for b in self.extractor.stream(train, self.layers, q_idx, "scan/quarantined-centroid"):
            q_sums.update(b.feats, b.labels)
            lab = b.labels.numpy()
            z = cal.z(cal.reference.score(b.feats, b.labels).numpy(), lab)
            for c in follow:
                q_z[c].append(z[lab == c])
        windows = {c: [int(i) for i in np.argsort(np.concatenate(q_z[c]).mean(0), kind="stable")[:cfg.window]]
                   for c in follow}
        layer_ids = sorted({i for w in windows.values() for i in w})
        names = [self.layers[i] for i in layer_ids]
        use_of = {c: np.array([li in windows[c] for li in layer_ids]) for c in follow}
        sus = [q_sums.sums[i] for i in layer_ids]
        ben = [cal.reference.sums[i] for i in layer_ids]
        t_feats, t_lab, t_rows = self._reference_feats(cal, follow, names)
        t_d = self._discriminant(t_feats, t_lab, use_of, sus, ben, loo=True)
        rows = np.flatnonzero(np.isin(labels, list(follow)))
        d = self._stream_discriminant(train, kept[rows], names, use_of, sus, ben, "scan/follow-up-centroid")
        for c in follow:
            tc = t_d[t_lab == c]
            sel = labels[rows] == c
            by_class[c].critical_layers = [self.layers[i] for i in windows[c]]
            z_d = (d[sel] - tc.mean()) / max(tc.std(), _STD_FLOOR)
            ref_susp[t_rows[t_lab == c]] = (tc - tc.mean()) / max(tc.std(), _STD_FLOOR)
            self._flag_like_quarantined(by_class[c], kept, rows[sel], z_d, suspicion, threshold, flagged, warnings)

    def _flag_like_quarantined(self, v: ClassVerdict, kept, r, z_d, suspicion, threshold, flagged,
                               warnings) -> None:
        # leftovers are few: the stricter out-of-spread threshold keeps benign look-alikes in
        suspicion[r], threshold[r] = z_d, self.cfg.threshold_z
        hit = z_d > self.cfg.threshold_z
        v.verdict, v.threshold = "like quarantined", self.cfg.threshold_z
        self._take(v, kept[r[hit]], z_d[hit], flagged, warnings)

    @staticmethod
    def _apply_probes(probes: dict[int, Probe], units: list[torch.Tensor], labels: np.ndarray, out: np.ndarray,
                      offset: int) -> None:
        """Write each class's probe z for a batch (``units``: its unit features per probe layer)."""
        for c, probe in probes.items():
            m = np.flatnonzero(labels == c)
            if len(m):
                out[offset + m] = probe.z([u[torch.from_numpy(m)] for u in units])

    @staticmethod
    def _discriminant(feats, lab, use_of, sus, benign, loo: bool = False,
                      own_suspect: np.ndarray | None = None) -> np.ndarray:
        """Sum over each sample's window of cos(x, suspect centroid) - cos(x, benign centroid).

        ``loo``: the samples are part of the benign centroid; ``own_suspect`` (B x layers): where a
        sample is part of the suspect centroid. Either way it is left out of that centroid."""
        labels = torch.from_numpy(np.asarray(lab))
        use = np.stack([use_of[int(c)] for c in lab]) if len(lab) else np.zeros((0, len(feats)), bool)
        out = torch.zeros(len(lab), dtype=torch.float64)
        for pos, f in enumerate(feats):
            u = unit(f.double())
            mb = benign[pos][labels] - (u if loo else 0)
            ms = sus[pos][labels]
            if own_suspect is not None:
                ms = ms - u * torch.from_numpy(own_suspect[:, pos]).double()[:, None]
            d = (u * unit(ms)).sum(1) - (u * unit(mb)).sum(1)
            out += torch.where(torch.from_numpy(use[:, pos]), d, torch.zeros_like(d))
        return out.numpy()

    def _take(self, v: ClassVerdict, idx: np.ndarray, susp: np.ndarray, flagged: list, warnings: list) -> None:
        """Apply the per-class cap (keeping the most suspicious; samples of the class quarantined
        earlier count towards it) and the loud warning."""
        cfg = self.cfg
        already = v.n_quarantined_before
        total = v.n_scanned + already
        cap = max(int(np.floor(cfg.class_drop_cap * total)) - already, 0)
        if len(idx) > cap:
            msg = (f"class {v.cls}: {len(idx)} of {v.n_scanned} samples flagged, above class_drop_cap="
                   f"{cfg.class_drop_cap}; quarantining only the {cap} most suspicious")
            logger.warning(msg)
            warnings.append(msg)
            idx = idx[np.argsort(-susp, kind="stable")[:cap]]
            v.capped = True
        if len(idx) and len(idx) + already > cfg.class_drop_warn * total:
            msg = (f"class {v.cls}: quarantining {len(idx)} more of {v.n_scanned} samples "
                   f"({(len(idx) + already) / total:.0%} of the class in all), more than "
                   f"class_drop_warn={cfg.class_drop_warn}: "
                   "check this class (a poisoned target class looks like this)")
            logger.warning(msg)
            warnings.append(msg)
        v.n_flagged = len(idx)
        flagged.append(np.sort(idx))
